"""Does dispatch pick the faster path for each AQ layer inside a whole model?

The thresholds dispatch reads (`kernels/thresholds.json`) come from layers timed alone (`benchmarks/kernels.py`).
In a model each layer runs between others, which evict its weights and working memory. This script times every AQ
layer in place, with forward hooks, under each path forced in turn (`reference`: dense; `lut`: the lookup
kernel), in rotated rounds in one process, records the path `auto` picks for the layer, and reports:
- per layer: both times, dispatch's pick and the faster path (a tie when within `--tie`);
- the layers' summed time with dispatch's picks, with the faster path of each (the oracle), all dense and all
  lookup.

Models: the zoo's AQ W2A8 U-Net (one guided forward at batch `-n`, as in sampling) and the randomly initialised
LDM-4-shaped AQ denoiser of `kernels_e2e.py` (one forward at batch 1). Both keep their dense copies, so either path
can run in every layer.

    python benchmarks/dispatch_accuracy.py --unet runs/unet-aq-w2a8 --json benchmarks/results/dispatch-accuracy.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from diffquant.io_utils import write_json
from diffquant.kernels import dispatch
from diffquant.nn.layers import QuantLayer
from diffquant.provenance import provenance

PATHS = ("reference", "lut")


def aq_layers(model) -> dict[str, QuantLayer]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, QuantLayer) and m.qweight.format == "additive"}


def time_layers(model, forward, rounds: int) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Median in-place time (ms) of every AQ layer under each forced path, and the path `auto` picks per layer."""
    layers = aq_layers(model)
    times: dict[str, dict[str, list[float]]] = {n: {p: [] for p in PATHS} for n in layers}
    picks: dict[str, str] = {}
    state = {"mode": None, "t0": 0.0, "layer": None}

    def pre(name):
        def hook(mod, args):
            state["layer"] = name
            state["t0"] = time.perf_counter()
        return hook

    def post(name):
        def hook(mod, args, out):
            dt = (time.perf_counter() - state["t0"]) * 1e3
            if state["mode"] in PATHS:
                times[name][state["mode"]].append(dt)
        return hook

    real_choose = dispatch.choose

    def recording_choose(device, *shape, **kw):
        impl = real_choose(device, *shape, **kw)
        if state["mode"] == "auto":
            picks[state["layer"]] = impl
        return impl

    handles = [h for n, m in layers.items()
               for h in (m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n)))]
    dispatch.choose = recording_choose
    try:
        with torch.no_grad():
            for mode in (*PATHS, "auto"):  # warm-up (kernel layouts prepared), then auto's picks
                state["mode"] = mode
                with dispatch.force(mode):
                    forward()
            for r in range(rounds):
                for mode in PATHS[r % 2:] + PATHS[:r % 2]:
                    state["mode"] = mode
                    with dispatch.force(mode):
                        forward()
    finally:
        dispatch.choose = real_choose
        for h in handles:
            h.remove()
    for n in layers:  # warm-up calls are not in the lists (mode was set, so drop the first of each)
        for p in PATHS:
            times[n][p] = times[n][p][1:]
    return ({n: {p: statistics.median(v) for p, v in t.items()} for n, t in times.items()},
            {n: picks.get(n, "reference") for n in layers})


def summarize(model_name: str, model, med: dict, picks: dict, tie: float) -> tuple[list[dict], dict]:
    layers = aq_layers(model)
    rows, right, ties = [], 0, 0
    for n, t in med.items():
        faster = min(PATHS, key=lambda p: t[p])
        ratio = t["reference"] / t["lut"]
        tied = abs(ratio - 1) <= tie
        pick = picks[n]
        ok = tied or pick == faster
        right += ok and not tied
        ties += tied
        q = layers[n].qweight
        rows.append({"model": model_name, "layer": n, "shape": list(q.shape), "config": str(q.meta()["spec"]),
                     "reference_ms": round(t["reference"], 4), "lut_ms": round(t["lut"], 4),
                     "lut_speedup": round(ratio, 3), "auto_pick": pick, "faster": "tie" if tied else faster,
                     "pick_ok": ok})
    total = {p: sum(t[p] for t in med.values()) for p in PATHS}
    auto = sum(med[n][picks[n]] for n in med)
    oracle = sum(min(t.values()) for t in med.values())
    decided = len(med) - ties
    summary = {"model": model_name, "aq_layers": len(med), "ties": ties, "decided": decided,
               "picked_the_faster": right, "auto_lut_layers": sum(p == "lut" for p in picks.values()),
               "oracle_lut_layers": sum(t["lut"] < t["reference"] for t in med.values()),
               "sum_ms": {"reference": round(total["reference"], 3), "lut": round(total["lut"], 3),
                          "auto": round(auto, 3), "oracle": round(oracle, 3)},
               "auto_over_oracle": round(auto / oracle, 3)}
    return rows, summary


def zoo(unet: str, n: int):
    from diffquant.models import load
    from diffquant.pipelines import balanced_labels, guided_output, latent_shape, meta_of

    model, _ = load(unet)
    meta = meta_of(model)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *latent_shape(model), generator=gen)
    t, labels = torch.full((n,), 500, dtype=torch.long), balanced_labels(n)
    return model, lambda: guided_output(model, x, t, labels, meta.guidance_scale, meta.null_class)


def ldm4():
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels_e2e import ldm4_aq_model

    model = ldm4_aq_model().eval()
    x, t, y = torch.randn(1, 3, 64, 64), torch.tensor([500]), torch.tensor([1])
    return model, lambda: model(x, t, class_labels=y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="runs/unet-aq-w2a8", help="a saved AQ W2A8 mnist-unet folder")
    ap.add_argument("-n", type=int, default=64, help="zoo batch (images; guidance doubles it)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tie", type=float, default=0.05, help="paths within this fraction of each other tie")
    ap.add_argument("--only", choices=("zoo", "ldm4"), default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.only != "ldm4" and not Path(args.unet).is_dir():
        sys.exit(f"error: {args.unet} is not a quantized model folder; make it with "
                 f"`diffquant quantize mnist-unet --recipe aq-w2a8 --out {args.unet}`, or run --only ldm4")
    from diffquant.kernels import cpu

    if not cpu.available():
        sys.exit("error: the lookup-table kernel did not build here (a C++ compiler and ninja are needed)")
    t0, rows, summaries = time.time(), [], []
    for name in ("zoo", "ldm4"):
        if args.only not in (None, name):
            continue
        model, forward = zoo(args.unet, args.n) if name == "zoo" else ldm4()
        med, picks = time_layers(model, forward, args.rounds)
        r, s = summarize(name, model, med, picks, args.tie)
        rows += r
        summaries.append(s)
        ms = s["sum_ms"]
        print(f"{name}: {s['aq_layers']} AQ layers, {s['ties']} ties; dispatch picked the faster path in "
              f"{s['picked_the_faster']} of {s['decided']}; lookup picked {s['auto_lut_layers']}, faster in "
              f"{s['oracle_lut_layers']}. Summed layer time: dense {ms['reference']:.1f} ms, lookup {ms['lut']:.1f}, "
              f"dispatch {ms['auto']:.1f}, oracle {ms['oracle']:.1f} ({s['auto_over_oracle']:.2f}x oracle)", flush=True)
        for row in r:
            if not row["pick_ok"]:
                print(f"   {row['layer']:48s} {row['shape']} dense {row['reference_ms']:.3f} ms, lookup "
                      f"{row['lut_ms']:.3f} ms ({row['lut_speedup']:.2f}x); dispatch picked {row['auto_pick']}")
    result = {"provenance": provenance(), "threads": torch.get_num_threads(), "rounds": args.rounds, "tie": args.tie,
              "threshold_source": dispatch.threshold_source(), "wall_s": round(time.time() - t0, 1),
              "summary": summaries, "rows": rows}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
