"""How fast the layer-wise AQ search encodes weights, and what a 400M-parameter denoiser would cost.

The zoo's own encoding speed per recipe is recorded by `benchmarks/quality.py` (aq_weights_per_s).
This script measures the search on layers with the shapes of LDM-4 ImageNet's U-Net (a randomly
initialised diffusers UNet2DModel with LDM-4's widths, 192-384-576-960, ~400M parameters): speed does
not depend on training. A full 960-channel 3x3 layer would take too long here, so each measured
layer is a slice of its output rows (rows cost the same each; the codebooks are shared) with the
full input width, and a cost model fitted to the measurements,

    seconds = rows * (a * d^2 * adam_steps * rounds + b * d * K * M * rounds)  (+ Gram: c * N * d^2),

is summed over every layer of the 400M model. The GPU figure is an estimate, not a measurement (no
GPU was lent to this session): the CPU time scaled by matmul throughput (see gpu_estimate).

    python benchmarks/aq_speed.py --out benchmarks/results/aq-speed.json
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from diffquant.io_utils import write_json
from diffquant.methods.aquatic import AQSearch, choose_spec, quantize_layer
from diffquant.provenance import provenance

LDM4 = dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(192, 384, 576, 960),
            layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D",
                                                  "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=32, num_class_embeds=1001)


def ldm4_shapes() -> list[tuple[int, ...]]:
    from diffusers import UNet2DModel

    with torch.device("meta"):
        m = UNet2DModel(**LDM4)
    return [tuple(mod.weight.shape) for mod in m.modules() if type(mod) in (torch.nn.Linear, torch.nn.Conv2d)]


def measure(shape: tuple[int, ...], target: float, rows: int, search: AQSearch, n_tokens: int = 4096) -> dict:
    d = math.prod(shape[1:])
    g = torch.Generator().manual_seed(0)
    w = torch.randn(rows, *shape[1:], generator=g) / math.sqrt(d)
    x = torch.randn(n_tokens, d, generator=g)
    t0 = time.perf_counter()
    h = x.T @ x / n_tokens
    t_gram = time.perf_counter() - t0
    spec = choose_spec(shape, target)
    res = quantize_layer(w, h, spec, search)
    return {"shape": list(shape), "rows_measured": rows, "d": d, "spec": spec.__dict__, "rounds": res.rounds,
            "search_s": round(res.seconds, 3), "gram_s": round(t_gram, 3),
            "weights_per_s": round(rows * d / res.seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/aq-speed.json"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--targets", default="2,4")
    args = ap.parse_args()
    search = AQSearch()
    t_start = time.time()
    probes = [(192, 192, 3, 3), (384, 384, 3, 3), (384, 384), (960, 960), (640, 640, 1, 1)]
    shapes = ldm4_shapes()
    total_params = sum(math.prod(s) for s in shapes)
    doc = {"benchmark": "aq-speed", "search": search.__dict__, "ldm4_weight_layers": len(shapes),
           "ldm4_quantizable_weights": total_params, "targets": {}}
    for target in [float(t) for t in args.targets.split(",")]:
        rows = []
        for shape in probes:
            r = measure(shape, target, args.rows, search)
            rows.append(r)
            print(f"target {target}: {shape} {r['spec']} {r['search_s']:.1f}s for {args.rows} rows "
                  f"({r['weights_per_s']:.0f} weights/s)", flush=True)
        # fit seconds/row = a * d^2 + b * d * K * M (rounds folded into a, b; least squares)
        feats = np.array([[r["d"] ** 2, r["d"] * (1 << r["spec"]["bits"]) * r["spec"]["codebooks"]] for r in rows])
        secs = np.array([r["search_s"] / r["rows_measured"] for r in rows])
        coef, *_ = np.linalg.lstsq(feats, secs, rcond=None)
        coef = np.clip(coef, 0, None)

        def predict(shape, coef=coef, target=target):
            d = math.prod(shape[1:])
            try:
                s = choose_spec(shape, target)
            except ValueError:
                return 0.0
            return shape[0] * (coef[0] * d * d + coef[1] * d * (1 << s.bits) * s.codebooks)

        est = sum(predict(s) for s in shapes)
        fit_err = [abs(predict(tuple(r["shape"])) * r["rows_measured"] / r["shape"][0] - r["search_s"]) / r["search_s"]
                   for r in rows]
        doc["targets"][f"{target:g}"] = {
            "probes": rows, "fit_seconds_per_row": {"a_d2": coef[0], "b_dKM": coef[1]},
            "fit_max_rel_error": round(max(fit_err), 3),
            "ldm4_estimated_hours_this_cpu": round(est / 3600, 2),
            "ldm4_estimated_weights_per_s": round(total_params / est, 1),
            # the UNet2DModel approximation has 263M weights where LDM-4 (with its transformer blocks' MLPs)
            # has ~400M: scaled at the same weights per second
            "400M_estimated_hours_this_cpu": round(est / 3600 * 400e6 / total_params, 2),
        }
        print(f"target {target}: LDM-4 (~{total_params / 1e6:.0f}M weights) estimated {est / 3600:.1f} h on this CPU",
              flush=True)
    # GPU: an estimate, not a measurement (no GPU was lent to this session). The search is dense
    # matmuls and batched gathers, so scale by matmul throughput: this CPU's measured fp32 GFLOP/s on the
    # Adam step's shape against an H100's fp32 peak (67 TFLOP/s) at an assumed 30% efficiency.
    a, b = torch.randn(256, 2304), torch.randn(2304, 2304)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    cpu_gflops = 5 * 2 * 256 * 2304 * 2304 / (time.perf_counter() - t0) / 1e9
    gpu_gflops = 67_000 * 0.3
    doc["cpu_matmul_gflops"] = round(cpu_gflops, 1)
    doc["gpu_estimate"] = {"assumed_gflops": gpu_gflops, "speedup": round(gpu_gflops / cpu_gflops),
                           "measured": False,
                           "400M_estimated_minutes": {k: round(v["400M_estimated_hours_this_cpu"] * 60 * cpu_gflops
                                                               / gpu_gflops, 1) for k, v in doc["targets"].items()}}
    doc["wall_time_s"] = round(time.time() - t_start, 1)
    doc.update(provenance())
    write_json(args.out, doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
