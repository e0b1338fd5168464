"""Time every AQ layer inside a model, on both CPU paths, and choose per shape from what was measured.

The thresholds (`dispatch.thresholds`) come from layers timed alone, back to back. Inside a model each layer runs
between others that evict its weights and working memory, a convolution runs on the model's whole batch, and its
codebook setting may be one the benchmark never timed, so the break-even can sit elsewhere: on the AMD EPYC the
lookup ran 1.4-3.5x faster than dense in place on LDM-4 layers the thresholds sent to dense, and 0.5x on the zoo
U-Net's 2x4 convolutions they sent to the lookup (`benchmarks/dispatch_accuracy.py`).

`measure` times each AQ layer with forward hooks under `reference` (dense) and `lut` forced in turn, in rotated
rounds of the caller's `forward`, and records the key dispatch asks about for it (token count and shape).
`choose_per_shape` turns that into {key: path}; `dispatch.set_shape_choices` applies it for this process and
`diffquant tune-kernels --model DIR` stores it for later ones.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from diffquant.kernels import dispatch

PATHS = ("reference", "lut")
Key = tuple  # (tokens, out, in_flat, M, K, g): what dispatch.choose is asked, less the device and dense flag


def aq_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffquant.nn.layers import QuantLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantLayer) and m.qweight.format == "additive"}


def measure(model: torch.nn.Module, forward: Callable[[], object], rounds: int = 5,
            progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """One row per AQ layer that asked dispatch: name, key, median ms under each path (hooks around the
    layer's forward), and the path `auto` picks now. `forward` runs the model once (no gradient is taken).
    Layers whose dense copy was dropped are left out (their `reference` path dequantizes per call)."""
    layers = aq_layers(model)
    times: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PATHS} for n in layers}
    keys: dict[str, Key] = {}
    picks: dict[str, str] = {}
    state = {"mode": "", "t0": 0.0, "layer": "", "timed": False}

    def pre(name):
        def hook(mod, args):
            state["layer"], state["t0"] = name, time.perf_counter()
        return hook

    def post(name):
        def hook(mod, args, out):
            if state["timed"] and state["mode"] in PATHS:
                times[name][state["mode"]].append((time.perf_counter() - state["t0"]) * 1e3)
        return hook

    real_choose = dispatch.choose

    def recording(device, tokens, out, in_flat, m, k, g, dense_cached=True):
        impl = real_choose(device, tokens, out, in_flat, m, k, g, dense_cached=dense_cached)
        if device.type == "cpu" and dense_cached:
            keys[state["layer"]] = (tokens, out, in_flat, m, k, g)
            if state["mode"] == "auto":
                picks[state["layer"]] = impl
        return impl

    handles = [h for n, m in layers.items()
               for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    dispatch.choose = recording
    try:
        with torch.no_grad():
            for mode in ("auto", *PATHS):  # auto's picks and the keys; then a warm-up of each path
                state["mode"] = mode
                with dispatch.force(mode):
                    forward()
            state["timed"] = True
            for r in range(rounds):
                for mode in PATHS[r % 2:] + PATHS[:r % 2]:
                    state["mode"] = mode
                    with dispatch.force(mode):
                        forward()
                if progress:
                    progress(r + 1, rounds)
    finally:
        dispatch.choose = real_choose
        for h in handles:
            h.remove()
    return [{"layer": n, "key": list(keys[n]), "auto_pick": picks.get(n, "reference"),
             **{f"{p}_ms": round(statistics.median(times[n][p]), 4) for p in PATHS}}
            for n in layers if n in keys and all(times[n][p] for p in PATHS)]


def summed_by_shape(rows: list[dict]) -> dict[Key, dict[str, float]]:
    """{key: {"reference_ms": .., "lut_ms": ..}}: the times of the layers that share a key, summed."""
    total: dict[Key, dict[str, float]] = {}
    for r in rows:
        t = total.setdefault(tuple(r["key"]), {f"{p}_ms": 0.0 for p in PATHS})
        for p in PATHS:
            t[f"{p}_ms"] += r[f"{p}_ms"]
    return total


def choose_per_shape(rows: list[dict], margin: float = 0.03) -> dict[Key, str]:
    """{key: path} from `measure`'s rows: the layers that share a key are summed, and the lookup is chosen where
    it took less than (1 - margin) of dense's time; otherwise dense (a tie keeps the exact dense product)."""
    return {k: "lut" if t["lut_ms"] < (1 - margin) * t["reference_ms"] else "reference"
            for k, t in summed_by_shape(rows).items()}


def summed_ms(rows: list[dict], pick: Callable[[dict], str]) -> float:
    """The layers' summed time (ms) with path `pick(row)` for each row."""
    return sum(r[f"{pick(r)}_ms"] for r in rows)
