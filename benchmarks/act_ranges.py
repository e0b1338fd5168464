"""How much do a layer's activations change range along the trajectory, and what does each A8 mode lose?

For every quantizable layer of a zoo model: the static per-tensor range, the per-step table (`timestep`
mode) and per-token dynamic ranges are fitted on calibration trajectories (seeds 1,000,000+) and scored
on held-out trajectories (seeds 2,000,000+, 16 images): the relative MSE of the fake-quantized inputs,
||q(x) - x||^2 / ||x||^2, per layer and mode, plus how far apart the per-step ranges are (the widest
step's range over the narrowest's). Side by side in one run, as ratios to static.

    python benchmarks/act_ranges.py --model mnist-dit --bits 8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from diffquant.calibration.collect import collect
from diffquant.io_utils import atomic_path
from diffquant.models import load
from diffquant.nn.act import ActQuantizer, ActSpec, TimestepClock
from diffquant.provenance import provenance

RESULTS = Path(__file__).parent / "results"
HELD_OUT_SEED = 2_000_000


def _fit(spec: ActSpec, channel_dim: int, inputs: list[torch.Tensor], steps: list[int], timesteps: list[int]):
    q = ActQuantizer(spec, channel_dim)
    if spec.mode == "dynamic":
        return q
    q.start_observing()
    for x, s in zip(inputs, steps, strict=True):
        q.observe(x, s)
    q.finish_observing(timesteps)
    q.clock = TimestepClock()
    return q


def _rel_mse(q: ActQuantizer, inputs: list[torch.Tensor], steps: list[int], timesteps: list[int]) -> float:
    err = ref = 0.0
    for x, s in zip(inputs, steps, strict=True):
        if q.clock is not None:
            q.clock.t = torch.tensor([timesteps[s]])
        err += float((q(x) - x).pow(2).sum())
        ref += float(x.pow(2).sum())
    return err / max(ref, 1e-30)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-dit")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.json or RESULTS / f"act-ranges-{args.model}-a{args.bits}.json"
    start = time.time()
    model, scheduler = load(args.model)
    calib = collect(model, scheduler, n=64, steps=20, progress=False)
    held = collect(model, scheduler, n=16, steps=20, batch_size=16, seed=HELD_OUT_SEED, progress=False)
    rows = []
    for name, mod in model.named_modules():
        if name not in calib or name not in held:
            continue
        channel_dim = 1 if isinstance(mod, torch.nn.Conv2d) else -1
        row = {"layer": name, "kind": type(mod).__name__}
        for mode in ("static", "timestep", "dynamic"):
            q = _fit(ActSpec(args.bits, mode), channel_dim, calib.inputs[name], calib.steps[name], calib.timesteps)
            row[f"rel_mse_{mode}"] = _rel_mse(q, held.inputs[name], held.steps[name], held.timesteps)
            if mode == "timestep":
                width = (q.hi - q.lo).clamp_min(1e-12)
                row["step_range_spread"] = float(width.max() / width.min())
        row["timestep_vs_static"] = row["rel_mse_timestep"] / max(row["rel_mse_static"], 1e-30)
        row["dynamic_vs_static"] = row["rel_mse_dynamic"] / max(row["rel_mse_static"], 1e-30)
        rows.append(row)

    def geo(key: str) -> float:
        return math.exp(sum(math.log(max(r[key], 1e-30)) for r in rows) / len(rows))

    summary = {"layers": len(rows), "geomean_timestep_vs_static": geo("timestep_vs_static"),
               "geomean_dynamic_vs_static": geo("dynamic_vs_static"),
               "geomean_step_range_spread": geo("step_range_spread"),
               "timestep_better_in": sum(r["timestep_vs_static"] < 1 for r in rows)}
    result = {**provenance(), "model": args.model, "bits": args.bits, "wall_s": round(time.time() - start, 1),
              "summary": summary, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    for r in sorted(rows, key=lambda r: r["timestep_vs_static"])[:8]:
        print(f"  {r['layer']:<60} spread {r['step_range_spread']:7.2f}  ts/static {r['timestep_vs_static']:.3f}"
              f"  dyn/static {r['dynamic_vs_static']:.3f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
