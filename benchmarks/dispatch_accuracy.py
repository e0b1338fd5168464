"""Does dispatch pick the faster path for each AQ layer inside a whole model, with the thresholds and when tuned in
place?

The thresholds dispatch reads (`kernels/thresholds.json`) come from layers timed alone (`benchmarks/kernels.py`).
In a model each layer runs between others, which evict its weights and working memory. Per model this script
1. times every AQ layer in place (`kernels.in_place.measure`: hooks, `reference` and `lut` forced in turn, rotated
   rounds in one process) and records the path the thresholds pick (`auto`, no shapes measured in place);
2. makes the in-place choices from that measurement (`in_place.choose_per_shape`, what
   `diffquant tune-kernels --model` stores);
3. measures again, and scores both sets of picks on this second measurement: layers where the pick is the faster
   path (a tie within `--tie` counts for either), and the layers' summed time against the per-layer oracle;
4. times whole forwards, in rotated rounds: `auto` with the thresholds only, and `auto` with the in-place choices.

Models: the zoo's AQ W2A8 U-Net (one guided forward at batch `-n`, as in sampling) and the randomly initialised
LDM-4-shaped AQ denoiser of `kernels_e2e.py` (one forward at batch 1). Both keep their dense copies, so either path
can run in every layer.

    python benchmarks/dispatch_accuracy.py --unet runs/unet-aq-w2a8 --json benchmarks/results/dispatch-accuracy.json
    python benchmarks/dispatch_accuracy.py --only zoo --any-k --json benchmarks/results/dispatch-accuracy-anyk.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from diffquant.io_utils import write_json
from diffquant.kernels import dispatch, in_place
from diffquant.provenance import provenance


def score(rows: list[dict], pick: dict[str, str], tie: float) -> dict:
    """How `pick` (layer -> path) does on `rows` (a measurement): right picks and summed time against the oracle."""
    right = ties = 0
    for r in rows:
        ratio = r["reference_ms"] / r["lut_ms"]
        if abs(ratio - 1) <= tie:
            ties += 1
        elif (pick[r["layer"]] == "lut") == (ratio > 1):
            right += 1
    picked = in_place.summed_ms(rows, lambda r: pick[r["layer"]])
    oracle = in_place.summed_ms(rows, lambda r: "lut" if r["lut_ms"] < r["reference_ms"] else "reference")
    return {"layers_on_lookup": sum(v == "lut" for v in pick.values()), "decided": len(rows) - ties,
            "picked_the_faster": right, "sum_ms": round(picked, 3), "oracle_ms": round(oracle, 3),
            "over_oracle": round(picked / oracle, 3)}


def forwards(forward, choices: dict, rounds: int) -> dict:
    """Median whole-forward time (s) with the thresholds only and with the in-place choices, rotated rounds."""
    modes = {"thresholds": {}, "in_place": choices}
    times: dict[str, list[float]] = {m: [] for m in modes}
    names = list(modes)
    with torch.no_grad():
        for r in range(rounds + 1):
            for mode in names[r % 2:] + names[:r % 2]:
                dispatch.set_shape_choices(modes[mode])
                t0 = time.perf_counter()
                forward()
                if r:  # the first round warms up
                    times[mode].append(time.perf_counter() - t0)
    dispatch.set_shape_choices({})
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"forward_s": {m: round(v, 4) for m, v in med.items()},
            "in_place_speedup": round(med["thresholds"] / med["in_place"], 3)}


def zoo(unet: str, n: int):
    from diffquant.models import load
    from diffquant.pipelines import guided_forward

    model, _ = load(unet)
    return model, guided_forward(model, n, 500)


def ldm4():
    from kernels_e2e import ldm4_aq_model, ldm4_inputs

    model = ldm4_aq_model().eval()
    x, t, y = ldm4_inputs()
    return model, lambda: model(x, t, class_labels=y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="runs/unet-aq-w2a8", help="a saved AQ W2A8 mnist-unet folder")
    ap.add_argument("-n", type=int, default=64, help="zoo batch (images; guidance doubles it)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per layer measurement")
    ap.add_argument("--forward-rounds", type=int, default=7, help="rounds of whole forwards")
    ap.add_argument("--tie", type=float, default=0.05, help="paths within this fraction of each other tie")
    ap.add_argument("--only", choices=("zoo", "ldm4"), default=None)
    ap.add_argument("--any-k", action="store_true",
                    help="let the thresholds judge every codebook size, as before dispatch.measured_min_k (for A/B)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.any_k:
        dispatch.measured_min_k = lambda: 0
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels_e2e import require_unet

    if args.only != "ldm4":
        require_unet(args.unet, ", or run --only ldm4")
    from diffquant.kernels import cpu

    if not cpu.available():
        sys.exit("error: the lookup-table kernel did not build here (a C++ compiler and ninja are needed)")
    dispatch.set_shape_choices({})  # the thresholds alone, whatever this user stored
    source = dispatch.threshold_source()
    t0, rows, summaries = time.time(), [], []
    for name in ("zoo", "ldm4"):
        if args.only not in (None, name):
            continue
        model, forward = zoo(args.unet, args.n) if name == "zoo" else ldm4()
        first = in_place.measure(model, forward, args.rounds)
        choices = in_place.choose_per_shape(first)
        second = in_place.measure(model, forward, args.rounds)
        thr = {r["layer"]: r["auto_pick"] for r in first}
        tuned = {r["layer"]: choices[tuple(r["key"])] for r in first}
        s = {"model": name, "aq_layers": len(second), "shapes": len(choices),
             "thresholds": score(second, thr, args.tie), "in_place": score(second, tuned, args.tie),
             **forwards(forward, choices, args.forward_rounds)}
        summaries.append(s)
        for r in second:
            rows.append({"model": name, **r, "threshold_pick": thr[r["layer"]], "in_place_pick": tuned[r["layer"]]})
        a, b = s["thresholds"], s["in_place"]
        print(f"{name}: {s['aq_layers']} AQ layers, {s['shapes']} shapes. Picked the faster path in "
              f"{a['picked_the_faster']} of {a['decided']} decided layers with the thresholds, "
              f"{b['picked_the_faster']} tuned in place; summed layer time {a['sum_ms']:.1f} / {b['sum_ms']:.1f} ms "
              f"({a['over_oracle']:.2f}x / {b['over_oracle']:.2f}x the oracle); lookup in {a['layers_on_lookup']} / "
              f"{b['layers_on_lookup']} layers. Whole forward {s['forward_s']['thresholds']:.3f} s -> "
              f"{s['forward_s']['in_place']:.3f} s ({s['in_place_speedup']:.2f}x)", flush=True)
    result = {"provenance": provenance(), "threads": torch.get_num_threads(), "rounds": args.rounds,
              "forward_rounds": args.forward_rounds, "tie": args.tie, "threshold_source": source,
              "any_k": args.any_k,
              "wall_s": round(time.time() - t0, 1), "summary": summaries, "rows": rows}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
