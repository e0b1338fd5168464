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
`benchmarks/kernels.py` for the nearest token count, per CPU: which path wins depends on the
microarchitecture (`thresholds()`; `diffquant tune-kernels` measures the user's own machine, the
benchmark's `--write-thresholds` refreshes the shipped entry): small layers lose to per-call costs
whatever their bound, and layers with fewer codewords than the benchmark measured (`measured_min_k`) stay dense.
Shapes measured inside a model (`kernels.in_place`, `diffquant tune-kernels --model`)
override the thresholds for layers that hold their dense copy. Force one
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
    env = os.environ.get("DIFFQUANT_AQ_KERNEL")
    return "auto" if env is None else _check(env)


def flop_bound(out: int, in_flat: int, m: int, k: int, g: int) -> float:
    """Dense multiply-adds per token over the lookup's operations per token (table: in*M*K
    multiply-adds; gather-sum: out*(in/g)*M adds)."""
    return (in_flat * out) / (in_flat * m * k + out * (in_flat // g) * m)


def _entry_table(entry: dict) -> dict[int, tuple[float, int]]:
    sizes = entry.get("min_weight_elems", {})
    return {int(n): (float(b), int(sizes.get(n, 0))) for n, b in entry["min_flop_bound"].items()}


def _conservative(entries: list[dict]) -> dict[int, tuple[float, int]]:
    """For a CPU nobody measured: per token count, the strictest of the measured machines' thresholds
    (the lookup is chosen only where it won on every one of them)."""
    tables = [_entry_table(e) for e in entries]
    counts = set.intersection(*(set(t) for t in tables))
    return {n: (max(t[n][0] for t in tables), max(t[n][1] for t in tables)) for n in sorted(counts)}


def _read_user(path: Path, section: str) -> dict:
    """`section` ("cpu": thresholds per CPU, "shapes": in-place choices per CPU) of the user's thresholds file."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get(section, {})
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a kernel-thresholds file ({e}); delete it, or measure this machine "
                         "again with `diffquant tune-kernels`") from None


def thresholds() -> dict[int, tuple[float, int]]:
    """token count -> (smallest FLOP bound, smallest weight size in*out) at which `lut` was measured
    faster than fp32 dense on every configuration that had both, for this CPU (`provenance.cpu_key`):
    the user's own measurement (`diffquant tune-kernels`) first, then the shipped one for this CPU, then
    the strictest of the shipped machines'. `threshold_source()` says which was used."""
    if "t" not in _cache:
        from diffquant.kernels.tune import user_thresholds_path
        from diffquant.provenance import cpu_key

        key = cpu_key()
        t, src = {n: (1.5, 1 << 18) for n in (1, 16, 256, 4096)}, "built-in default"
        shipped = json.loads(_THRESHOLDS.read_text()).get("cpu", {}) if _THRESHOLDS.exists() else {}
        user_path = user_thresholds_path()
        user = _read_user(user_path, "cpu")
        if key in user:
            t, src = _entry_table(user[key]), f"measured on this machine ({user_path})"
        elif key in shipped:
            t, src = _entry_table(shipped[key]), f"shipped, measured on this CPU ({key}: {shipped[key].get('machine')})"
        elif shipped:
            t = _conservative(list(shipped.values()))
            src = f"shipped, strictest of {', '.join(shipped)} ({key} unmeasured)"
        _cache["t"], _cache["t_src"] = t, src
    return _cache["t"]


def reload_thresholds() -> None:
    """Read the thresholds files again on the next dispatch (after `tune-kernels` wrote one)."""
    for key in ("t", "t_src", "choices", "shapes"):
        _cache.pop(key, None)


def shape_choices() -> dict[tuple, str]:
    """{(tokens, out, in_flat, M, K, g): path} measured in place in a model on this CPU (`kernels.in_place`;
    `diffquant tune-kernels --model DIR` stores them in the user's thresholds file): they win over the
    thresholds for layers that hold their dense copy."""
    if "shapes" not in _cache:
        from diffquant.kernels.tune import user_thresholds_path
        from diffquant.provenance import cpu_key

        rows = _read_user(user_thresholds_path(), "shapes").get(cpu_key(), {}).get("choices", [])
        _cache["shapes"] = {tuple(r["key"]): r["impl"] for r in rows}
    return _cache["shapes"]


def set_shape_choices(choices: dict[tuple, str] | None) -> None:
    """Use `choices` (from `in_place.choose_per_shape`) for this process instead of the stored ones; None reads
    the stored ones again. Forgets remembered choices."""
    _cache.pop("choices", None)
    if choices is None:
        _cache.pop("shapes", None)
    else:
        bad = sorted(set(choices.values()) - {"reference", "lut"})
        if bad:
            raise ValueError(f"shape choices must be 'reference' or 'lut', not {', '.join(map(repr, bad))}")
        _cache["shapes"] = {tuple(k): v for k, v in choices.items()}


def threshold_source() -> str:
    thresholds()
    n = len(shape_choices())
    return _cache["t_src"] + (f"; {n} shapes measured in place" if n else "")


def gpu_max_tokens() -> int:
    """Token count up to which the Triton path was measured faster than cuBLAS fp32 on every shape; with
    no GPU measurement shipped, every count (the kernel never holds a dense weight)."""
    if "gpu" not in _cache:
        meta = json.loads(_THRESHOLDS.read_text()) if _THRESHOLDS.exists() else {}
        _cache["gpu"] = int(meta.get("gpu", {}).get("max_tokens_triton", 1 << 62))
    return _cache["gpu"]


def measured_min_k() -> int:
    """The fewest codewords the thresholds were measured with (`tune.CONFIGS`: 1x8 and 2x8, 256). Below it the FLOP
    bound is not evidence: with few codewords the gather-sum's loads dominate, and each costs more than the dense
    product's multiply-add, so the zoo U-Net's 2x4 convolutions (16 codewords, bound 2.1) ran at 0.45x dense in place
    while the thresholds picked the lookup (`benchmarks/dispatch_accuracy.py`). Such layers stay dense unless
    measured in place (`shape_choices`)."""
    from diffquant.kernels.tune import CONFIGS

    return min(1 << bits for _, bits in CONFIGS.values())


def _lut_ok() -> bool:
    if "lut" not in _cache:
        from diffquant.kernels import cpu

        _cache["lut"] = cpu.available()
    return _cache["lut"]


def choose(device: torch.device, tokens: int, out: int, in_flat: int, m: int, k: int, g: int,
           dense_cached: bool = True) -> str:
    """The path for one product; `dense_cached` says whether the layer still holds its dense weight.

    `auto` choices are memoised per device type and shape until `reload_thresholds`: a sampler asks about the
    same few shapes over and over, and looking the thresholds up again took 3.7 us per product against 1.7 us
    remembered (benchmarks/dispatch_overhead.py; either way under 0.1% of sampling the zoo U-Net)."""
    impl = forced()
    if impl != "auto":
        return impl
    choices = _cache.setdefault("choices", {})
    key = (device.type, tokens, out, in_flat, m, k, g, dense_cached)
    hit = choices.get(key)
    if hit is None:
        if len(choices) >= _MAX_CHOICES:  # shapes without end (varying token counts): keep memory bounded
            choices.clear()
        hit = choices[key] = _choose_auto(device, tokens, out, in_flat, m, k, g, dense_cached)
    return hit


_MAX_CHOICES = 4096


def _choose_auto(device: torch.device, tokens: int, out: int, in_flat: int, m: int, k: int, g: int,
                 dense_cached: bool) -> str:
    if device.type == "cuda":
        from diffquant.kernels import triton_kernels

        if not triton_kernels.available():
            return "reference"
        return "triton" if not dense_cached or tokens <= gpu_max_tokens() else "reference"
    if device.type != "cpu" or not _lut_ok():
        return "reference"
    if dense_cached:
        measured = shape_choices().get((tokens, out, in_flat, m, k, g))
        if measured is not None:
            return measured
    if k < measured_min_k():
        return "reference"
    t = thresholds()
    # one token runs its own path (aq_lut.cpp's one-token lookup), two or more the tiled one: each is judged by
    # the nearest entry measured on its own path where there is one (a 2-token product by the 4-token entry)
    same_path = [n for n in t if (n == 1) == (tokens == 1)] or list(t)
    nearest = min(same_path, key=lambda n: abs(n - tokens) / max(n, tokens))
    min_bound, min_elems = t[nearest]
    return "lut" if flop_bound(out, in_flat, m, k, g) >= min_bound and out * in_flat >= min_elems else "reference"
