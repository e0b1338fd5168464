"""How fast the layer-wise AQ search encodes weights, and what a 400M-parameter denoiser would cost.

The zoo's own encoding speed per recipe is recorded by `benchmarks/quality.py` (aq_weights_per_s).
This script measures the search on layers with the shapes of LDM-4 ImageNet's U-Net (a randomly
initialised diffusers UNet2DModel with LDM-4's widths, 192-384-576-960, ~400M parameters): speed does
not depend on training. Six representative layers (linear 384 and 960 wide, 3x3 convs of 192 to 960
channels) are measured on a slice of their output rows (rows cost about the same each; the codebooks
are shared) with the full input width, at two row counts: a layer's time is a fixed part (the loops over
groups) plus a per-row part. Every layer of the model takes both parts for its input width,
interpolated log-log between the probes; the sum over its rows and layers is the estimate. The GPU
figure is an estimate, not a measurement (no GPU was lent to this session): the CPU time scaled by
matmul throughput (see gpu_estimate).

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
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024, help="random inputs behind each Gram matrix")
    ap.add_argument("--targets", default="2,4")
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. other jobs sharing the machine)")
    args = ap.parse_args()
    search = AQSearch()
    t_start = time.time()
    shapes = ldm4_shapes()
    total_params = sum(math.prod(s) for s in shapes)
    doc = {"benchmark": "aq-speed", "note": args.note, "search": search.__dict__, "ldm4_weight_layers": len(shapes),
           "ldm4_quantizable_weights": total_params, "targets": {}}
    probes = [(384, 384), (960, 960), (192, 192, 3, 3), (384, 384, 3, 3), (576, 576, 3, 3), (960, 960, 3, 3)]
    for target in [float(t) for t in args.targets.split(",")]:
        # representative layers measured on a slice of their rows; every layer of the model then gets the
        # per-row time of its input width d interpolated (log-log, piecewise linear) between the probes
        rows = []
        for shape in probes:  # two row counts: a layer's time = fixed part (loops over groups) + per-row part
            small, big = (measure(shape, target, n, search, args.tokens) for n in (args.rows, 4 * args.rows))
            t_small, t_big = small["search_s"] + small["gram_s"], big["search_s"] + big["gram_s"]
            per_row_s = max(1e-6, (t_big - t_small) / (3 * args.rows))
            fixed_s = max(1e-6, t_small - per_row_s * args.rows)
            rows.append({**big, "small": small, "fixed_s": round(fixed_s, 3), "per_row_s": round(per_row_s, 4)})
            print(f"target {target}: {shape} {big['spec']}: {t_small:.1f}s for {args.rows} rows, {t_big:.1f}s for "
                  f"{4 * args.rows} -> fixed {fixed_s:.1f}s + {per_row_s:.3f}s per row", flush=True)
        ds = np.log([r["d"] for r in rows])
        order = np.argsort(ds)
        ds = ds[order]
        fixed = np.log([rows[i]["fixed_s"] for i in order])
        per = np.log([rows[i]["per_row_s"] for i in order])

        def per_row(d: int, ys, ds=ds) -> float:
            x = math.log(d)
            if x > ds[-1]:  # beyond the widest probe: extend the last segment's slope
                return math.exp(ys[-1] + (ys[-1] - ys[-2]) / (ds[-1] - ds[-2]) * (x - ds[-1]))
            return float(math.exp(np.interp(x, ds, ys)))

        def layer_s(shape, fixed=fixed, per=per, per_row=per_row) -> float:
            d = math.prod(shape[1:])
            return per_row(d, fixed) + shape[0] * per_row(d, per)

        est = sum(layer_s(s) for s in shapes)
        doc["targets"][f"{target:g}"] = {
            "probes": rows,
            "ldm4_estimated_hours_this_cpu": round(est / 3600, 2),
            "ldm4_estimated_weights_per_s": round(total_params / est, 1),
            # the UNet2DModel approximation has 263M weights where LDM-4 (with its transformer blocks' MLPs)
            # has ~400M: scaled at the same weights per second
            "400M_estimated_hours_this_cpu": round(est / 3600 * 400e6 / total_params, 2),
        }
        print(f"target {target}: LDM-4 layer list (~{total_params / 1e6:.0f}M weights) estimated {est / 3600:.1f} h "
              "on this CPU", flush=True)
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
