"""Which AQ product runs: per device and shape, from measured thresholds; forceable.

Paths: `reference` (dequantize, then torch's dense op: exact, the fallback), `lut` (the C++ lookup-table
kernel, CPU) and `triton` (GPU: direct GEMV, or weight rebuild then cuBLAS; `triton_kernels`).

`auto` on CUDA picks `triton` when Triton is installed and either the layer dropped its dense copy
(`free_dense`: it holds codes only, and the Triton kernels beat dequantizing by embedding_bag then cuBLAS)
or the token count is at most the measured `gpu.max_tokens_triton` (cuBLAS fp32 on a cached dense weight
against the best Triton path; on an H100 it was 0: cuBLAS won at every shape;
`benchmarks/kernels_gpu.py --thresholds-from`). On the CPU it picks `lut` whenever the layer's FLOP
bound (dense multiply-adds over lookup operations, `flop_bound`) and its weight size (in*out) both reach
the break-even measured by
`benchmarks/kernels.py` for the nearest token count (shipped in `thresholds.json`; the benchmark's
`--write-thresholds` refreshes it): small layers lose to per-call costs whatever their bound. Force one
with the environment variable DIFFQUANT_AQ_KERNEL=reference|lut|triton or `with force("lut"):`; a
forced path that cannot run (no compiler, no GPU) raises, an `auto` one falls back to `reference`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

IMPLS = ("auto", "reference", "lut", "triton")
_THRESHOLDS = Path(__file__).with_name("thresholds.json")
_forced: list[str] = []
_cache: dict = {}


def _check(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"unknown AQ kernel {impl!r}; choose one of {', '.join(IMPLS)}")
    return impl


@contextlib.contextmanager
def force(impl: str):
    """Run every AQ layer inside the block with `impl` (one of IMPLS)."""
    _forced.append(_check(impl))
    try:
        yield
    finally:
        _forced.pop()


def forced() -> str:
    if _forced:
        return _forced[-1]
    return _check(os.environ.get("DIFFQUANT_AQ_KERNEL", "auto"))


def flop_bound(out: int, in_flat: int, m: int, k: int, g: int) -> float:
    """Dense multiply-adds per token over the lookup's operations per token (table: in*M*K
    multiply-adds; gather-sum: out*(in/g)*M adds)."""
    return (in_flat * out) / (in_flat * m * k + out * (in_flat // g) * m)


def thresholds() -> dict[int, tuple[float, int]]:
    """token count -> (smallest FLOP bound, smallest weight size in*out) at which `lut` was measured
    faster than fp32 dense on every configuration that had both."""
    if "t" not in _cache:
        t = {n: (1.5, 1 << 18) for n in (1, 16, 256, 4096)}
        if _THRESHOLDS.exists():
            meta = json.loads(_THRESHOLDS.read_text())
            sizes = meta.get("min_weight_elems", {})
            t = {int(n): (float(b), int(sizes.get(n, 0))) for n, b in meta["min_flop_bound"].items()}
        _cache["t"] = t
    return _cache["t"]


def gpu_max_tokens() -> int:
    """Token count up to which the Triton path was measured faster than cuBLAS fp32 on every shape; with
    no GPU measurement shipped, every count (the kernel never holds a dense weight)."""
    if "gpu" not in _cache:
        meta = json.loads(_THRESHOLDS.read_text()) if _THRESHOLDS.exists() else {}
        _cache["gpu"] = int(meta.get("gpu", {}).get("max_tokens_triton", 1 << 62))
    return _cache["gpu"]


def _lut_ok() -> bool:
    if "lut" not in _cache:
        from diffquant.kernels import cpu

        _cache["lut"] = cpu.available()
    return _cache["lut"]


def choose(device: torch.device, tokens: int, out: int, in_flat: int, m: int, k: int, g: int,
           dense_cached: bool = True) -> str:
    """The path for one product; `dense_cached` says whether the layer still holds its dense weight."""
    impl = forced()
    if impl != "auto":
        return impl
    if device.type == "cuda":
        from diffquant.kernels import triton_kernels

        if not triton_kernels.available():
            return "reference"
        return "triton" if not dense_cached or tokens <= gpu_max_tokens() else "reference"
    if device.type != "cpu" or not _lut_ok():
        return "reference"
    t = thresholds()
    nearest = min(t, key=lambda n: abs(n - tokens) / max(n, tokens))
    min_bound, min_elems = t[nearest]
    return "lut" if flop_bound(out, in_flat, m, k, g) >= min_bound and out * in_flat >= min_elems else "reference"
