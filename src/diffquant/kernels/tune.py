"""Measure, on this machine, where the CPU lookup-table kernel beats fp32 dense: the dispatch thresholds.

Which path wins depends on the CPU, not only on the shape: on the AMD EPYC (Zen 4) this project ran on,
the lookup beat torch's fp32 GEMM at 256-4096 tokens on DiT-XL/2's layers, while on an Intel Xeon
(Cascade Lake) MKL won there. So thresholds are stored per CPU (`provenance.cpu_key`): the shipped
`thresholds.json` holds the machines the project measured (`benchmarks/kernels.py --write-thresholds`),
and `diffquant tune-kernels` measures the machine it runs on and writes its entry to the user's kernel
cache (`user_thresholds_path`), which dispatch reads first.

A threshold per token count is a pair (smallest FLOP bound, smallest weight size in*out) such that every
measured shape with at least both was faster with the lookup (`break_even`).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.kernels import cpu
from diffquant.kernels.dispatch import flop_bound
from diffquant.kernels.reference import dequant_linear

# real models' shapes (random weights: speed does not depend on training); the zoo's own sizes give the
# dispatch its minimum layer size
# (in, out). LDM-4 ImageNet's attention linears (q, k, v, out) at 384 / 576 / 960 channels, which its
# 64x64 latent runs at 1024 / 256 / 64 tokens a image.
LINEARS = {"dit-xl2.qkv": (1152, 3456), "dit-xl2.proj": (1152, 1152), "dit-xl2.fc1": (1152, 4608),
           "dit-xl2.fc2": (4608, 1152), "ldm4.attn384": (384, 384), "ldm4.attn576": (576, 576),
           "ldm4.attn960": (960, 960), "sd15.320": (320, 320), "sd15.640": (640, 640), "sd15.1280": (1280, 1280),
           "zoo-unet.128": (128, 128)}
# (channels, height = width) of square 3x3 convolutions at the resolution the model runs them: LDM-4's
# four levels (64x64 latent, 192-384-576-960 channels), the zoo U-Net's two
CONVS = {"zoo-unet.conv64@16": (64, 16), "zoo-unet.conv128@8": (128, 8),
         "ldm4.conv192@64": (192, 64), "ldm4.conv384@32": (384, 32), "ldm4.conv576@16": (576, 16),
         "ldm4.conv960@8": (960, 8)}
# 4: the many-token path's 4-wide tile (2-4 tokens), which dispatch otherwise judged by the 1-token entry, a
# different path; 64: LDM-4's 960-channel level at batch 1, for linears as for convolutions
TOKENS = (1, 4, 16, 64, 256, 1024, 4096)
CONFIGS = {"1x8": (1, 8), "2x8": (2, 8)}  # (codebooks M, bits per code)


def conv_batches(hw: int, tokens: tuple[int, ...] = TOKENS) -> tuple[int, ...]:
    """Batch sizes at which a convolution at hw x hw pixels is timed: 1, then each batch that brings its
    tokens (batch x pixels) to one of `tokens` above one image's, so that convolutions fill the same
    token columns as the linears (LDM-4's 8x8 level at batch 4 / 16 / 64 is 256 / 1024 / 4096 tokens)."""
    px = hw * hw
    return (1, *(t // px for t in tokens if t > px and t % px == 0))


def warm_up(seconds: float = 3.0) -> None:
    """Dense products on every thread for a few seconds before the first timing, so that the first case
    does not also pay for starting the thread pool. It did not cure the slow 1-token cases seen on the
    EPYC VM (the peers in the same rounds did that: benchmarks/kernels.py times them apart); it is a
    cheap precaution, not a measured fix."""
    a = torch.randn(512, 512)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


def timeit_rounds(fns: dict[str, Callable[[], object]], reps: int,
                  before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median ms of each function, timed in rounds: every round runs each function once, in an order
    rotated round by round. On a shared VM the host slows whole stretches of seconds (the same call
    measured 1.9x apart minutes later); timing one implementation after the other lets such a stretch
    fall on one of them and decide the ratio, while rounds spread it over all of them. `before`, if given,
    runs untimed before every timed call (benchmarks/kernels_ab.py --mixed: a product that evicts caches)."""
    names = list(fns)
    with torch.no_grad():
        for name in names:
            for _ in range(3):
                fns[name]()
        ts: dict[str, list[float]] = {name: [] for name in names}
        for r in range(reps):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                if before is not None:
                    before()
                t = time.perf_counter()
                fns[name]()
                ts[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) * 1e3 for name, v in ts.items()}


def random_aq(out: int, in_flat: int, m: int, bits: int, g: int, gen: torch.Generator):
    """Codebooks (M, 2^bits, g), codes (out, in/g, M) and scales (out,) of a random AQ weight."""
    k = 1 << bits
    cb = (torch.randn(m, k, g, generator=gen) * 0.02).half().float()
    codes = torch.randint(0, k, (out, in_flat // g, m), generator=gen)
    scale = (torch.rand(out, generator=gen) + 0.5).half().float()
    return cb, codes, scale


def random_aq_conv3x3(ch: int, m: int, bits: int, gen: torch.Generator):
    """`random_aq` for a square 3x3 KAQ convolution (g = 9, one input channel's kernel slice a group), with
    its dense fp32 weight (ch, ch, 3, 3): what the conv timings compare the lookup against."""
    cb, codes, scale = random_aq(ch, ch * 9, m, bits, 9, gen)
    w = dequant_linear(torch.eye(ch * 9), cb, codes, scale, None).t().reshape(ch, ch, 3, 3).contiguous()
    return cb, codes, scale, w


def _row(layer, kind, n_in, n_out, tokens, cfg, ms, bound) -> dict:
    return {"layer": layer, "kind": kind, "in": n_in, "out": n_out, "tokens": tokens, "config": cfg,
            "impl": "diffquant_lut", "median_ms": round(ms["diffquant_lut"], 4),
            "fp32_ms": round(ms["fp32_dense"], 4),
            "speedup_vs_fp32": round(ms["fp32_dense"] / ms["diffquant_lut"], 3), "flop_bound": round(bound, 3)}


def _linear_fns(x, w, bias, aq) -> dict[str, Callable[[], object]]:
    return {"fp32_dense": lambda: F.linear(x, w, bias), "diffquant_lut": lambda: cpu.aq_linear(x, *aq, bias)}


def _conv_fns(x, w, bias, aq) -> dict[str, Callable[[], object]]:
    return {"fp32_dense": lambda: F.conv2d(x, w, bias, 1, 1),
            "diffquant_lut": lambda: cpu.aq_conv2d(x, *aq, bias, (3, 3), (1, 1), (1, 1), (1, 1))}


def measure(quick: bool = False, reps: int = 10, log: Callable[[str], None] = print,
            linears: dict[str, tuple[int, int]] | None = None, convs: dict[str, tuple[int, int]] | None = None,
            tokens: tuple[int, ...] | None = None, warm_s: float = 3.0) -> list[dict]:
    """The lookup kernel against fp32 dense on every shape of `linears` and `convs` (default LINEARS and
    CONVS; quick: the DiT's, SD's largest and the zoo's linears at 1/16/256/4096 tokens, one LDM-4 and one
    zoo convolution), 1x8 and 2x8: one row per case; convolutions at each of `conv_batches`."""
    gen = torch.Generator().manual_seed(0)
    warm_up(warm_s)
    if linears is None:
        linears = {k: v for k, v in LINEARS.items() if not quick or k.startswith(("dit", "sd15.1280", "zoo"))}
    if convs is None:
        convs = {k: v for k, v in CONVS.items() if not quick or k.startswith(("ldm4.conv576", "zoo-unet.conv128"))}
    if tokens is None:
        tokens = (1, 16, 256, 4096) if quick else TOKENS
    rows = []
    for cfg, (m, bits) in CONFIGS.items():
        for name, (n_in, n_out) in linears.items():
            cb, codes, scale = random_aq(n_out, n_in, m, bits, 8, gen)
            w = dequant_linear(torch.eye(n_in), cb, codes, scale, None).t().contiguous()
            kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, bits)
            bias = torch.zeros(n_out)
            for t in tokens:
                x = torch.randn(t, n_in, generator=gen)
                ms = timeit_rounds(_linear_fns(x, w, bias, (kcb, kcodes, kscale)), reps)
                rows.append(_row(name, "linear", n_in, n_out, t, cfg, ms, flop_bound(n_out, n_in, m, 1 << bits, 8)))
                log(f"{name:18s} {cfg} {t:5d} tokens: lookup {rows[-1]['speedup_vs_fp32']:.2f}x fp32 dense")
        for name, (ch, hw) in convs.items():
            cb, codes, scale, w = random_aq_conv3x3(ch, m, bits, gen)
            kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, bits)
            bias = torch.zeros(ch)
            for n in conv_batches(hw, tokens):
                x = torch.randn(n, ch, hw, hw, generator=gen)
                ms = timeit_rounds(_conv_fns(x, w, bias, (kcb, kcodes, kscale)), reps)
                rows.append(_row(name, "conv3x3", ch * 9, ch, n * hw * hw, cfg, ms,
                                 flop_bound(ch, ch * 9, m, 1 << bits, 9)) | {"batch": n})
                log(f"{name:18s} {cfg} {n:3d} x {hw * hw:4d} pixels: "
                    f"lookup {rows[-1]['speedup_vs_fp32']:.2f}x fp32 dense")
    return rows


def break_even(rows: list[dict]) -> dict:
    """Per token count, a safe region for the lookup: the smallest FLOP bound and weight size (in*out)
    such that every measured configuration with at least both won against fp32 dense; of the safe
    pairs, the one that keeps the most winners (none: bound 1e9, the lookup is never chosen). A FLOP
    bound alone is not enough: small layers (the zoo's) lose to fixed per-call costs whatever their bound."""
    bounds, sizes = {}, {}
    for t in sorted({r["tokens"] for r in rows}):
        lut = [r for r in rows if r["tokens"] == t and r["impl"] == "diffquant_lut"]
        wins = [r for r in lut if r["speedup_vs_fp32"] > 1.0]
        best, best_n = (1e9, 1 << 62), -1
        for b in sorted({r["flop_bound"] for r in wins}):
            for s in sorted({r["in"] * r["out"] for r in wins}):
                covered = [r for r in lut if r["flop_bound"] >= b and r["in"] * r["out"] >= s]
                if all(r["speedup_vs_fp32"] > 1.0 for r in covered) and len(covered) > best_n:
                    best, best_n = (b, s), len(covered)
        bounds[str(t)], sizes[str(t)] = best
    return {"min_flop_bound": bounds, "min_weight_elems": sizes}


def user_thresholds_path() -> Path:
    """Where `diffquant tune-kernels` writes this user's measured thresholds (beside the built kernels)."""
    return cpu.build_dir() / "thresholds.json"


def store_entry(path: Path, entry: dict, key: str | None = None) -> None:
    """Write `entry` as the CPU `key`'s (default: this machine's) thresholds in `path`, keeping the other
    machines' entries and the GPU's; atomic, so an interrupted run leaves the old file whole."""
    from diffquant.io_utils import write_json
    from diffquant.provenance import cpu_key

    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("cpu", {})[key or cpu_key()] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)


def store_shape_choices(path: Path, rows: list[dict], choices: dict[tuple, str], meta: dict) -> int:
    """Add in-place measured choices (`in_place.choose_per_shape` of `rows`) to this CPU's section "shapes" of
    `path`, replacing earlier choices for the same keys and keeping the rest (models tuned before, the thresholds);
    atomic. Returns how many choices the CPU now has."""
    from diffquant.io_utils import write_json
    from diffquant.kernels.in_place import summed_by_shape
    from diffquant.provenance import cpu_key

    data = json.loads(path.read_text()) if path.exists() else {}
    section = data.setdefault("shapes", {}).setdefault(cpu_key(), {"choices": []})
    summed = summed_by_shape(rows)
    kept = [c for c in section["choices"] if tuple(c["key"]) not in choices]
    new = [{"key": list(k), "impl": v, **{n: round(ms, 4) for n, ms in summed[k].items()}}
           for k, v in choices.items()]
    section.update(meta)
    section["choices"] = kept + new
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
    return len(section["choices"])
