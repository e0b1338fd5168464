"""Triton GPU kernel for additive-codebook weights: dequantize-in-the-tile matrix product.

Each program owns a (BLOCK_T tokens x BLOCK_O outputs) tile of y and walks the input in BLOCK_I
chunks: it rebuilds that chunk of the weight from the codes (M gathers from the fp16/fp32
codebooks, summed) in registers and multiplies it with the input chunk by `tl.dot`; the per-row
scale and the bias are applied once at the end. The dense weight never exists in GPU memory. For
few tokens the same kernel runs with the smallest token block `tl.dot` accepts (16): the direct
path, whose cost is the code and codebook reads, i.e. the compressed weight bytes.

Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1, tests/kernels); timed on a GPU by
`benchmarks/kernels_gpu.py` whenever one is available.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the optional GPU path; dispatch never picks it then
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _aq_matmul_kernel(x_ptr, codes_ptr, cb_ptr, scale_ptr, bias_ptr, y_ptr, T, IN, OUT, J,
                          M: tl.constexpr, K: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                          IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
        pid_t = tl.program_id(0)
        pid_o = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
        for i0 in range(0, IN, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < IN
            x = tl.load(x_ptr + offs_t[:, None] * IN + offs_i[None, :],
                        mask=(offs_t[:, None] < T) & mask_i[None, :], other=0.0)
            j = offs_i // G
            k = offs_i % G
            wmask = (offs_o[:, None] < OUT) & mask_i[None, :]
            w = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
            for m in tl.static_range(M):
                code = tl.load(codes_ptr + (offs_o[:, None] * J + j[None, :]) * M + m, mask=wmask, other=0)
                word = cb_ptr + (m * K + code.to(tl.int32)) * G + k[None, :]
                w += tl.load(word, mask=wmask, other=0.0).to(tl.float32)
            if IEEE:
                acc += tl.dot(x, tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        s = tl.load(scale_ptr + offs_o, mask=offs_o < OUT, other=0.0)
        acc = acc * s[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=offs_o < OUT, other=0.0)[None, :]
        out_mask = (offs_t[:, None] < T) & (offs_o[None, :] < OUT)
        tl.store(y_ptr + offs_t[:, None] * OUT + offs_o[None, :], acc, mask=out_mask)


def aq_linear(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, ieee: bool = True, block_t: int | None = None, block_o: int = 64,
              block_i: int = 64) -> torch.Tensor:
    """x (..., in) @ W^T + bias on x's device (a GPU, or the CPU under TRITON_INTERPRET=1). `ieee=False`
    lets tl.dot use TF32 on GPUs that have it (faster, ~1e-3 relative error)."""
    if triton is None:
        raise RuntimeError("the Triton path needs `pip install triton`")
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in).float().contiguous()
    n_tok, (out, groups, m) = x2.shape[0], codes.shape
    k, g = codebooks.shape[1], codebooks.shape[2]
    if groups * g != n_in:
        raise ValueError(f"input has {n_in} features, the AQ weight expects {groups * g}")
    y = torch.empty(n_tok, out, device=x.device, dtype=torch.float32)
    bt = block_t or (16 if n_tok <= 16 else 32 if n_tok <= 64 else 64)
    grid = (triton.cdiv(n_tok, bt), triton.cdiv(out, block_o))
    _aq_matmul_kernel[grid](x2, codes.contiguous(), codebooks.contiguous(), scale.float().contiguous(),
                            bias if bias is not None else scale, y, n_tok, n_in, out, groups, M=m, K=k, G=g,
                            HAS_BIAS=bias is not None, IEEE=ieee, BLOCK_T=bt, BLOCK_O=block_o, BLOCK_I=block_i)
    return y.reshape(*lead, out)
