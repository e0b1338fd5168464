"""The Triton AQ kernel on a CUDA GPU against cuBLAS fp16 / bf16 / fp32 (../shared/BENCHMARK.md, GPU).

Same shapes as benchmarks/kernels.py (DiT-XL/2 and SD-1.5 linears), 1-4096 tokens, 1x8 and 2x8
codebooks; each row also checks the kernel against dequantize-then-dense. Needs a CUDA GPU and triton;
exits with a clear message otherwise. Not yet run: no GPU was lent to the session that wrote it.

    python benchmarks/kernels_gpu.py --json benchmarks/results/kernels-gpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kernels import CONFIGS, LINEARS, TOKENS, aq_weight  # noqa: E402

from diffquant.io_utils import write_json  # noqa: E402
from diffquant.kernels import triton_kernels  # noqa: E402
from diffquant.kernels.reference import dequant_linear  # noqa: E402
from diffquant.provenance import provenance  # noqa: E402


def cuda_ms(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def make_impls(x, w32, cb, codes8, scale) -> dict:
    x16, w16, xb, wb = x.half(), w32.half(), x.bfloat16(), w32.bfloat16()
    return {"cublas_fp32": lambda: F.linear(x, w32),
            "cublas_fp16": lambda: F.linear(x16, w16),
            "cublas_bf16": lambda: F.linear(xb, wb),
            "dequant_dense": lambda: dequant_linear(x, cb, codes8, scale, None),
            "triton_ieee": lambda: triton_kernels.aq_linear(x, cb, codes8, scale, None),
            "triton_tf32": lambda: triton_kernels.aq_linear(x, cb, codes8, scale, None, ieee=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    if not torch.cuda.is_available() or not triton_kernels.available():
        sys.exit("error: needs a CUDA GPU and `pip install triton`; nothing was measured")
    dev, gen, rows, t0 = torch.device("cuda"), torch.Generator().manual_seed(0), [], time.time()
    for cfg, (m, bits) in CONFIGS.items():
        for name, (n_in, n_out) in LINEARS.items():
            cb, codes, scale = aq_weight(n_out, n_in, m, bits, 8, gen)
            cb, codes8, scale = cb.to(dev), codes.to(torch.uint8).to(dev), scale.to(dev)
            w32 = dequant_linear(torch.eye(n_in, device=dev), cb, codes8, scale, None).t().contiguous()
            for t in TOKENS:
                x = torch.randn(t, n_in, device=dev)
                ref = F.linear(x, w32)
                impls = make_impls(x, w32, cb, codes8, scale)
                base = None
                for impl, fn in impls.items():
                    err = ((fn().float() - ref).abs().max() / ref.abs().max()).item()
                    ms = cuda_ms(fn, args.reps)
                    base = base or ms
                    rows.append({"layer": name, "tokens": t, "config": cfg, "impl": impl, "median_ms": round(ms, 4),
                                 "speedup_vs_fp32": round(base / ms, 3), "max_rel_error": float(f"{err:.2e}")})
                    print(f"{name} {cfg} T={t} {impl} {ms:.4f} ms x{base / ms:.2f} err {err:.1e}", flush=True)
    out = {"provenance": provenance(), "device": torch.cuda.get_device_name(), "wall_s": round(time.time() - t0, 1),
           "rows": rows}
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
