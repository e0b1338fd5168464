"""KAQ convolutions through the lookup kernel: three ways of feeding it patches, side by side in one process.

- `lut_whole_batch_unfold`: F.unfold the whole batch, then the kernel per image (the first `aq_conv2d`).
  That writes 9x the input before the kernel reads it back: 141 MB at LDM-4's 8x8 level and batch 64.
- `lut_per_image_unfold`: F.unfold one image at a time (`cpu.aq_conv2d_unfolded`, `aq_conv2d` until the
  kernel read patches itself), so each image's patches stay in cache.
- `lut_fused`: the kernel reads each tile's patches straight from the image (`cpu.aq_conv2d` now), so
  nothing is unfolded in memory.
All three call the same product on the same weights and inputs, timed in rounds beside torch fp32 dense.

    python benchmarks/conv_unfold_ab.py --json benchmarks/results/conv-unfold-ab.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.io_utils import write_json
from diffquant.kernels import cpu
from diffquant.kernels.tune import CONFIGS, CONVS, conv_batches, random_aq_conv3x3, timeit_rounds
from diffquant.provenance import provenance


def whole_batch_unfold(x, cb, codes, scale, bias):
    """The earlier `aq_conv2d` (3x3, stride 1, padding 1): one unfold of the whole batch, then the kernel per image."""
    ext = cpu.load_extension()
    n, _, h, w = x.shape
    cols = F.unfold(x, (3, 3), padding=(1, 1))
    out = torch.empty(n, scale.numel(), h * w)
    for i in range(n):
        out[i] = ext.aq_matmul_tokens(cols[i].contiguous(), cb, codes, scale, bias, cpu.BLOCK_COLUMNS)
    return out.reshape(n, scale.numel(), h, w)


def variants(x, w, bias, aq) -> dict:
    return {"fp32_dense": lambda: F.conv2d(x, w, bias, 1, 1),
            "lut_whole_batch_unfold": lambda: whole_batch_unfold(x, *aq, bias),
            "lut_per_image_unfold": lambda: cpu.aq_conv2d_unfolded(x, *aq, bias, (3, 3), (1, 1), (1, 1), (1, 1)),
            "lut_fused": lambda: cpu.aq_conv2d(x, *aq, bias, (3, 3), (1, 1), (1, 1), (1, 1))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="ldm4.conv384@32,ldm4.conv576@16,ldm4.conv960@8")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    unknown = [n for n in args.layers.split(",") if n not in CONVS]
    if unknown:
        ap.error(f"--layers: unknown {', '.join(unknown)}; choose from {', '.join(CONVS)}")
    cpu.load_extension()
    gen = torch.Generator().manual_seed(0)
    t0, rows = time.time(), []
    for cfg, (m, bits) in CONFIGS.items():
        for name in args.layers.split(","):
            ch, hw = CONVS[name]
            cb, codes, scale, w = random_aq_conv3x3(ch, m, bits, gen)
            kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, bits)
            bias = torch.zeros(ch)
            for n in conv_batches(hw):
                x = torch.randn(n, ch, hw, hw, generator=gen)
                ref = F.conv2d(x, w, bias, 1, 1)
                fns = variants(x, w, bias, (kcb, kcodes, kscale))
                for impl in ("lut_whole_batch_unfold", "lut_per_image_unfold", "lut_fused"):
                    err = ((fns[impl]() - ref).abs().max() / ref.abs().max()).item()
                    if err > 1e-4:
                        raise SystemExit(f"{name} {cfg} batch {n}: {impl} differs from dense by {err:.1e}")
                ms = timeit_rounds(fns, args.reps)
                for impl, v in ms.items():
                    rows.append({"layer": name, "config": cfg, "batch": n, "tokens": n * hw * hw, "impl": impl,
                                 "median_ms": round(v, 3), "speedup_vs_fp32": round(ms["fp32_dense"] / v, 3)})
                print(f"{name:16s} {cfg} batch {n:3d}: whole-batch unfold "
                      f"{ms['fp32_dense'] / ms['lut_whole_batch_unfold']:.2f}x fp32, per image "
                      f"{ms['fp32_dense'] / ms['lut_per_image_unfold']:.2f}x, fused "
                      f"{ms['fp32_dense'] / ms['lut_fused']:.2f}x", flush=True)
    result = {"provenance": provenance(), "threads": torch.get_num_threads(), "wall_s": round(time.time() - t0, 1),
              "rows": rows}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
