"""Triton GPU kernels for additive-codebook weights: a direct path for few tokens, a tiled product for many.

- `_aq_gemv_kernel` (few tokens, `aq_linear`'s default up to GEMV_MAX_TOKENS): one program per
  (BLOCK_O outputs, token) rebuilds its rows of the weight from the codes (M gathers from the codebooks,
  summed) chunk by chunk and reduces them against the token's input. No `tl.dot`, so nothing is padded
  to 16 tokens: its cost is reading the codes and codebooks, i.e. the compressed weight bytes.
- `_aq_dequant_kernel` + cuBLAS (many tokens, the default beyond GEMV_MAX_TOKENS): rebuild the scaled
  fp32 weight in one pass over the codes, multiply with cuBLAS, drop it. Measured on an H100
  (benchmarks/kernels_gpu.py), no fp32 Triton product came near cuBLAS at hundreds of tokens, so the
  tensor cores do the product and the weight lives as codes between calls.
- `_aq_matmul_kernel` (forceable, `path="matmul"`): each program owns a (BLOCK_T tokens x BLOCK_O
  outputs) tile of y and walks the input in BLOCK_I chunks, rebuilding that chunk of the weight in
  registers and multiplying it with the input chunk by `tl.dot` (dequantize-in-the-tile). The dense
  weight never exists in GPU memory, not even for one layer.

Both apply the per-row scale and the bias once at the end. On a GPU the block sizes come from Triton's
autotuner, keyed on the shape; explicit blocks (the tests, the CPU interpreter) skip it. Tested on the
CPU through TRITON_INTERPRET=1 and on a GPU by tests/kernels when one is present; timed by
`benchmarks/kernels_gpu.py`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:  # the optional GPU path; dispatch never picks it then
    triton = None

GEMV_MAX_TOKENS = 8  # default switch from the direct path to dequantize + cuBLAS (measured: kernels_gpu.py)


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode(codes_ptr, cb_ptr, offs_o, offs_i, wmask, J, M: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
        """The (BLOCK_O, BLOCK_I) weight chunk: sum over the M codebooks of the selected codewords."""
        j = offs_i // G
        k = offs_i % G
        w = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
        for m in tl.static_range(M):
            code = tl.load(codes_ptr + (offs_o[:, None] * J + j[None, :]) * M + m, mask=wmask, other=0)
            code = code.to(tl.int32) & (K - 1)  # int16 storage of 16-bit codes is signed
            w += tl.load(cb_ptr + (m * K + code) * G + k[None, :], mask=wmask, other=0.0).to(tl.float32)
        return w

    @triton.jit
    def _decode_vec(codes_ptr, cb_ptr, offs_o, i0, OUT, J, M: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
        """The same chunk for a power-of-two group size and a chunk start i0 that is a multiple of it: one
        code load per group and the whole codeword loaded as one contiguous vector of G values."""
        offs_j = i0 // G + tl.arange(0, BLOCK_I // G)
        offs_g = tl.arange(0, G)
        mask = (offs_o[:, None] < OUT) & (offs_j[None, :] < J)
        w = tl.zeros((BLOCK_O, BLOCK_I // G, G), dtype=tl.float32)
        for m in tl.static_range(M):
            code = tl.load(codes_ptr + (offs_o[:, None] * J + offs_j[None, :]) * M + m, mask=mask, other=0)
            code = code.to(tl.int32) & (K - 1)
            w += tl.load(cb_ptr + ((m * K + code) * G)[:, :, None] + offs_g[None, None, :], mask=mask[:, :, None],
                         other=0.0).to(tl.float32)
        return tl.reshape(w, (BLOCK_O, BLOCK_I))

    @triton.jit
    def _weight_chunk(codes_ptr, cb_ptr, offs_o, i0, IN, OUT, J, M: tl.constexpr, K: tl.constexpr, G: tl.constexpr,
                      VEC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
        """Weight rows offs_o, inputs i0 .. i0 + BLOCK_I, by whichever decoder the group size allows."""
        if VEC:
            w = _decode_vec(codes_ptr, cb_ptr, offs_o, i0, OUT, J, M, K, G, BLOCK_O, BLOCK_I)
        else:
            offs_i = i0 + tl.arange(0, BLOCK_I)
            wmask = (offs_o[:, None] < OUT) & (offs_i[None, :] < IN)
            w = _decode(codes_ptr, cb_ptr, offs_o, offs_i, wmask, J, M, K, G, BLOCK_O, BLOCK_I)
        return w

    @triton.jit
    def _aq_matmul_kernel(x_ptr, codes_ptr, cb_ptr, scale_ptr, bias_ptr, y_ptr, T, IN, OUT, J,
                          M: tl.constexpr, K: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                          IEEE: tl.constexpr, VEC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_I: tl.constexpr):
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
            w = _weight_chunk(codes_ptr, cb_ptr, offs_o, i0, IN, OUT, J, M, K, G, VEC, BLOCK_O, BLOCK_I)
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

    @triton.jit
    def _aq_gemv_kernel(x_ptr, codes_ptr, cb_ptr, scale_ptr, bias_ptr, y_ptr, T, IN, OUT, J,
                        M: tl.constexpr, K: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr,
                        VEC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
        pid_o = tl.program_id(0)
        t = tl.program_id(1)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for i0 in range(0, IN, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            mask_i = offs_i < IN
            x = tl.load(x_ptr + t * IN + offs_i, mask=mask_i, other=0.0)
            w = _weight_chunk(codes_ptr, cb_ptr, offs_o, i0, IN, OUT, J, M, K, G, VEC, BLOCK_O, BLOCK_I)
            acc += tl.sum(w * x[None, :], axis=1)
        s = tl.load(scale_ptr + offs_o, mask=offs_o < OUT, other=0.0)
        acc = acc * s
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_o, mask=offs_o < OUT, other=0.0)
        tl.store(y_ptr + t * OUT + offs_o, acc, mask=offs_o < OUT)

    @triton.jit
    def _aq_dequant_kernel(codes_ptr, cb_ptr, scale_ptr, w_ptr, IN, OUT, J, M: tl.constexpr, K: tl.constexpr,
                           G: tl.constexpr, VEC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
        offs_o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        wmask = (offs_o[:, None] < OUT) & (offs_i[None, :] < IN)
        w = _weight_chunk(codes_ptr, cb_ptr, offs_o, tl.program_id(1) * BLOCK_I, IN, OUT, J, M, K, G, VEC, BLOCK_O,
                          BLOCK_I)
        s = tl.load(scale_ptr + offs_o, mask=offs_o < OUT, other=0.0)
        tl.store(w_ptr + offs_o[:, None] * IN + offs_i[None, :], w * s[:, None], mask=wmask)

    _MM_CONFIGS = [triton.Config({"BLOCK_T": bt, "BLOCK_O": bo, "BLOCK_I": bi}, num_warps=w, num_stages=s)
                   for bt, bo, bi, w, s in [(16, 32, 64, 4, 2), (16, 64, 64, 4, 2), (32, 64, 64, 4, 2),
                                            (64, 64, 32, 4, 2), (64, 64, 64, 4, 3), (64, 128, 32, 4, 3),
                                            (128, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 2)]]
    # (8 outputs, 128 inputs, 2 warps) is left out: Triton 3.6 miscompiled the vectorised decode in that
    # shape on an H100 (relative errors of 1-5 in benchmarks/results/kernels-gpu.json), and the autotuner
    # then chose it as the fastest.
    _GEMV_CONFIGS = [triton.Config({"BLOCK_O": bo, "BLOCK_I": bi}, num_warps=w)
                     for bo, bi, w in [(16, 64, 2), (16, 128, 4), (32, 64, 4), (32, 128, 4),
                                       (64, 64, 4), (64, 128, 8), (128, 32, 4)]]

    def _short_bench(fn, quantiles=None):
        """Autotuning with Triton's default 100 ms per config would take minutes per model; 20 ms ranks them."""
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    _aq_matmul_tuned = triton.autotune(_MM_CONFIGS, key=["T", "IN", "OUT", "M", "IEEE", "VEC"],
                                       do_bench=_short_bench)(_aq_matmul_kernel)
    _aq_gemv_tuned = triton.autotune(_GEMV_CONFIGS, key=["T", "IN", "OUT", "M", "VEC"],
                                     do_bench=_short_bench)(_aq_gemv_kernel)


def _vec_ok(g: int, vec: bool | None) -> bool:
    """Vector codeword loads need a power-of-two group no wider than the smallest block (32)."""
    ok = g & (g - 1) == 0 and g <= 32
    if vec and not ok:
        raise ValueError(f"vectorised decoding needs a power-of-two group size up to 32, not {g}")
    return ok if vec is None else vec


def aq_dequantize(codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                  vec: bool | None = None) -> torch.Tensor:
    """The scaled fp32 weight (out, groups * g) rebuilt from the codes on their device, in one kernel."""
    if triton is None:
        raise RuntimeError("the Triton path needs `pip install triton`")
    out, groups, m = codes.shape
    k, g = codebooks.shape[1], codebooks.shape[2]
    w = torch.empty(out, groups * g, device=codes.device, dtype=torch.float32)
    bo, bi = 32, 128
    _aq_dequant_kernel[(triton.cdiv(out, bo), triton.cdiv(groups * g, bi))](
        codes.contiguous(), codebooks.contiguous(), scale.float().contiguous(), w, groups * g, out, groups,
        M=m, K=k, G=g, VEC=_vec_ok(g, vec), BLOCK_O=bo, BLOCK_I=bi)
    return w


def aq_linear(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, ieee: bool = True, path: str | None = None, block_t: int | None = None,
              block_o: int | None = None, block_i: int | None = None, vec: bool | None = None) -> torch.Tensor:
    """x (..., in) @ W^T + bias on x's device (a GPU, or the CPU under TRITON_INTERPRET=1).

    `path` is "gemv" (direct, few tokens), "dequant" (rebuild the weight, then cuBLAS fp32) or "matmul"
    (tiled); None picks gemv up to GEMV_MAX_TOKENS, dequant beyond. `ieee=False` lets the tiled product
    use TF32 on GPUs that have it (faster, ~1e-3 relative error).
    Block sizes default to the autotuner on a GPU and to 16/64/64 elsewhere. `vec` (default: wherever the
    group size is a power of two) decodes a whole codeword per load instead of one weight per load."""
    if triton is None:
        raise RuntimeError("the Triton path needs `pip install triton`")
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in).float().contiguous()
    n_tok, (out, groups, m) = x2.shape[0], codes.shape
    k, g = codebooks.shape[1], codebooks.shape[2]
    if groups * g != n_in:
        raise ValueError(f"input has {n_in} features, the AQ weight expects {groups * g}")
    if path not in (None, "gemv", "dequant", "matmul"):
        raise ValueError(f"unknown Triton path {path!r}; choose 'gemv', 'dequant' or 'matmul'")
    path = path or ("gemv" if n_tok <= GEMV_MAX_TOKENS else "dequant")
    if path == "dequant":
        return torch.nn.functional.linear(x2, aq_dequantize(codebooks, codes, scale, vec), bias).reshape(*lead, out)
    y = torch.empty(n_tok, out, device=x.device, dtype=torch.float32)
    if n_tok == 0:
        return y.reshape(*lead, out)
    args = (x2, codes.contiguous(), codebooks.contiguous(), scale.float().contiguous(),
            bias if bias is not None else scale, y, n_tok, n_in, out, groups)
    common = {"M": m, "K": k, "G": g, "HAS_BIAS": bias is not None, "VEC": _vec_ok(g, vec)}
    if common["VEC"] and block_i is not None and block_i % g:
        raise ValueError(f"block_i={block_i} must be a multiple of the group size {g} for vectorised decoding")
    tuned = x.is_cuda and block_o is None and block_i is None and block_t is None
    if path == "gemv":
        if tuned:
            _aq_gemv_tuned[lambda c: (triton.cdiv(out, c["BLOCK_O"]), n_tok)](*args, **common)
        else:
            bo, bi = block_o or 64, block_i or 64
            _aq_gemv_kernel[(triton.cdiv(out, bo), n_tok)](*args, **common, BLOCK_O=bo, BLOCK_I=bi)
    elif tuned:
        grid = lambda c: (triton.cdiv(n_tok, c["BLOCK_T"]), triton.cdiv(out, c["BLOCK_O"]))  # noqa: E731
        _aq_matmul_tuned[grid](*args, **common, IEEE=ieee)
    else:
        bt, bo, bi = block_t or 16, block_o or 64, block_i or 64
        _aq_matmul_kernel[(triton.cdiv(n_tok, bt), triton.cdiv(out, bo))](*args, **common, IEEE=ieee, BLOCK_T=bt,
                                                                           BLOCK_O=bo, BLOCK_I=bi)
    return y.reshape(*lead, out)
