"""CPU lookup-table kernels for additive-codebook weights (aq_lut.cpp), built on first use.

The C++ source is compiled once per machine through torch's own extension builder
(torch.utils.cpp_extension: ninja + the system C++ compiler, with OpenMP and the host's vector
instructions) and cached under ~/.cache/diffquant/kernels; later imports load the cached library
in well under a second. Why C++ and not numba (AQLM's choice): the same algorithm written in numba
ran 7-8x slower than torch fp32 dense at 16-4096 tokens on this machine (per-row array views and no
control over the accumulator living in registers), while the C++ one is faster than dense
(`benchmarks/kernels.py` measures both: impl `numba_lut`).

Entry points take the layout the kernel wants (`cpu_layout`: fp32 codebooks, uint8/int16 codes stored
column-major as (groups * M, out), fp32 scale); the AQ modules prepare it once per device
(`QuantLayer._kernel_state`). The Triton kernels read the row-major `kernel_layout` instead.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.provenance import cpu_flags

_SOURCE = Path(__file__).with_name("aq_lut.cpp")
_module = None


class KernelBuildError(RuntimeError):
    pass


def build_dir() -> Path:
    root = Path(os.environ.get("DIFFQUANT_KERNEL_CACHE", Path.home() / ".cache" / "diffquant" / "kernels"))
    return root


def _flags() -> list[str]:
    return ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-DNDEBUG"]


def build_key() -> str:
    """What the cached build depends on: the source, the compiler flags, torch, and this CPU's instruction
    sets, since -march=native ties the binary to them: a cache shared between machines (a home directory
    on a cluster) must not hand an AVX-512 VBMI build to a CPU without it (SIGILL)."""
    return hashlib.sha256(_SOURCE.read_bytes() + " ".join(_flags()).encode() + platform.machine().encode()
                          + torch.__version__.encode() + cpu_flags().encode()).hexdigest()[:12]


def load_extension(verbose: bool = False):
    """The compiled module (built on the first call on this machine, cached afterwards)."""
    global _module
    if _module is not None:
        return _module
    from torch.utils.cpp_extension import load

    key = build_key()
    d = build_dir() / f"aq_lut_{key}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        _module = load(name=f"diffquant_aq_lut_{key}", sources=[str(_SOURCE)], extra_cflags=_flags(),
                       extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=verbose)
    except Exception as e:  # compiler missing or failing: callers fall back to the reference path
        raise KernelBuildError(f"could not build the CPU lookup-table kernel ({type(e).__name__}: {e}); "
                               "install a C++ compiler (g++) and ninja, or force the reference path "
                               "with DIFFQUANT_AQ_KERNEL=reference") from e
    return _module


def available() -> bool:
    try:
        load_extension()
        return True
    except KernelBuildError:
        return False


# (group, codebook) columns per block of the table that the many-token path builds and then gathers from
# while it is in L2 (aq_lut.cpp says what was measured): 16 groups of one codebook, 8 of two
BLOCK_COLUMNS = 16

# the one-token path's ways of looking table rows up, numbered as aq_lut.cpp's enum Lookup
LOOKUPS = ("auto", "float_permutes", "gathers", "byte_planes", "scalar")


def one_token_lookups(codewords: int, code_bytes: int) -> tuple[str, list[str]]:
    """(the lookup the kernel picks, every lookup this build runs) for one token with `codewords` per
    codebook and 1- or 2-byte codes: byte planes need AVX-512 VBMI, float permutes AVX-512 and at most
    256 codewords. Tests compare each with the reference; `benchmarks/kernels_ab.py --lookups` times them."""
    chosen, runs = load_extension().one_token_lookups(codewords, code_bytes)
    return LOOKUPS[chosen], [LOOKUPS[i] for i in runs]


def aq_linear(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, block_columns: int = BLOCK_COLUMNS) -> torch.Tensor:
    """x (..., in) @ W^T + bias, W given by AQ codes in the C++ kernel's layout, (groups * M, out)
    column-major (see `cpu_layout`). The kernel reads x as it is, (tokens, in), and writes (tokens, out):
    it transposes each token tile in cache. Against transposing the input by a copy first, that ran
    0.99-1.20x (median 1.10x) at 4-256 tokens on DiT-XL/2, LDM-4 and SD-1.5 layers on the AMD EPYC
    (benchmarks/kernels_ab.py --token-major, benchmarks/results/kernels-ab-tokenmajor.json)."""
    if not x.is_cpu:
        raise ValueError(f"the lookup-table kernel runs on the CPU; got a tensor on {x.device} (use 'triton' there)")
    ext = load_extension()
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in).float().contiguous()
    return ext.aq_matmul_tokens(x2, codebooks, codes, scale, bias, block_columns, token_major=True).reshape(*lead, -1)


def aq_conv2d(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None, kernel_size: tuple[int, int], stride, padding, dilation,
              block_columns: int = BLOCK_COLUMNS) -> torch.Tensor:
    """KAQ Conv2d (groups == 1): a patch in F.unfold's order is channel-major, so group j of it is one input
    channel's k x k slice, and the table row is that slice against every codeword kernel (the channel
    convolved with the codeword kernels, at this pixel). The kernel reads each tile of output pixels'
    patches straight from the image and writes each image's (out, pixels) plane, so nothing is unfolded
    in memory: an unfolded image is kh*kw times the input (2.2 MB for one image at LDM-4's 960-channel 8x8
    level). Against unfolding each image first it ran 0.94-1.29x (median 1.06x) on LDM-4's 384-960 channel
    levels at batch 1-64 on the AMD EPYC (benchmarks/conv_unfold_ab.py, benchmarks/results/conv-unfold-ab.json)."""
    if not x.is_cpu:
        raise ValueError(f"the lookup-table kernel runs on the CPU; got a tensor on {x.device}")
    ext = load_extension()
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return ext.aq_conv2d(x.float().contiguous(), codebooks, codes, scale, bias, kh, kw, sh, sw, ph, pw, dh, dw,
                         block_columns)


def aq_conv2d_unfolded(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None, kernel_size: tuple[int, int], stride, padding, dilation,
                       block_columns: int = BLOCK_COLUMNS) -> torch.Tensor:
    """`aq_conv2d` as it was before the kernel read patches itself: F.unfold one image at a time, then the
    product on the unfolded columns. Kept as the A/B baseline of benchmarks/conv_unfold_ab.py and as a
    second path for the tests to compare with."""
    ext = load_extension()
    n, _, h, w = x.shape
    kh, kw = kernel_size
    x = x.float()
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.empty(n, scale.numel(), ho * wo, dtype=torch.float32)
    for i in range(n):
        cols = F.unfold(x[i : i + 1], (kh, kw), dilation=dilation, padding=padding, stride=stride)[0]
        out[i] = ext.aq_matmul_tokens(cols, codebooks, codes, scale, bias, block_columns)
    return out.reshape(n, scale.numel(), ho, wo)


def kernel_layout(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor, bits: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codebooks fp32, codes uint8 / int16, scale fp32), contiguous, codes row-major (out, groups, M): what
    the Triton kernels read (`cpu_layout` transposes the codes for the C++ kernel). Codes of up to 8 bits
    take one byte each (exact for B = 8), up to 16 bits two."""
    c = codes.to(torch.uint8) if bits <= 8 else codes.to(torch.int32).to(torch.int16)
    return codebooks.float().contiguous(), c.contiguous(), scale.float().contiguous()


def cpu_layout(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor, bits: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`kernel_layout` with the codes column-major, (groups * M, out): what the C++ kernel reads. Output
    rows of one (group, codebook) column sit side by side, so the one-token path looks up 16 rows per
    vector from that column's table row held in registers (see aq_lut.cpp)."""
    cb, c, s = kernel_layout(codes, codebooks, scale, bits)
    return cb, c.reshape(c.shape[0], -1).t().contiguous(), s
