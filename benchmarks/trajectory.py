"""Error accumulation along the trajectory (`diffquant.trajectory`) for RTN, per-step calibration
and AccuQuant at one setting, side by side in one run: a JSON and a plot for the report.

    python benchmarks/trajectory.py --model mnist-unet --setting w3a6
    python benchmarks/trajectory.py --model mnist-unet --setting w4a8 --methods w4a8,w4a8-perstep,w4a8-accuquant-m8

Models are built through the quality benchmark's protocol (`diffquant.bench.Protocol`), so the
reconstructions it finished are restored from its cache rather than redone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from diffquant.bench import Protocol
from diffquant.io_utils import write_json
from diffquant.models import load
from diffquant.provenance import provenance
from diffquant.trajectory import analyze, plot

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist-unet")
    ap.add_argument("--setting", default="w3a6")
    ap.add_argument("--methods", default=None, help="default: SETTING, SETTING-perstep, SETTING-accuquant")
    ap.add_argument("-n", type=int, default=64)
    args = ap.parse_args()
    methods = (args.methods or f"{args.setting},{args.setting}-perstep,{args.setting}-accuquant").split(",")
    t0 = time.time()
    proto = Protocol(n=args.n)
    fp, sched = load(args.model)
    results = {}
    for method in methods:
        m, s, _ = proto.build(args.model, method)
        results[method] = analyze(m, fp, s, n=args.n)
        r = results[method]
        print(f"{method}: per-step RMS mean {sum(r['per_step_rms']) / r['steps']:.4f}, "
              f"accumulated RMS at the end {r['accumulated_rms'][-1]:.4f}", flush=True)
    stem = f"trajectory-{args.model}-{args.setting}"
    png = plot(results, RESULTS / f"{stem}.png", title=f"{args.model}, {args.setting}: distance from the FP model")
    write_json(RESULTS / f"{stem}.json", {"benchmark": "trajectory", "model": args.model, "setting": args.setting,
                                          "results": results, "plot": png.name,
                                          "wall_time_s": round(time.time() - t0, 1), **provenance()})
    print(f"wrote {RESULTS / stem}.json and {png}")


if __name__ == "__main__":
    main()
