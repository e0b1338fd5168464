"""The Triton AQ kernels on a CUDA GPU against cuBLAS fp32 / tf32 / fp16 / bf16 (../shared/BENCHMARK.md, GPU).

Same shapes as benchmarks/kernels.py (DiT-XL/2 and SD-1.5 linears, the zoo's 128), 1-4096 tokens, 1x8
and 2x8 codebooks (g = 8). Implementations, side by side in one process:
- `cublas_fp32` (the baseline: torch's dense fp32 product on a cached dense weight, TF32 off),
  `cublas_tf32`, `cublas_fp16`, `cublas_bf16`: the dense peers, each on its own cached weight;
- `dequant_dense`: rebuild the fp32 weight from the codes (embedding_bag), then cuBLAS fp32;
- `triton_gemv` (up to 64 tokens): the direct path; `triton_dequant`: the weight rebuilt by one Triton
  kernel, then cuBLAS fp32 (the default beyond a few tokens); `triton_mm` (fp32 IEEE `tl.dot`) and
  `triton_mm_tf32`: the dequantize-in-the-tile product. Triton's autotuner picks the blocks (recorded).
Every row checks its output against the fp32 product of the dequantized weight (`max_rel_error`).
Each timing is the median of --reps samples, each sample the mean of 20 back-to-back calls between two
CUDA events, launch costs included (`median_ms`: what an eager caller sees), and again replaying a CUDA
graph of the 20 calls (`graph_ms`: the kernels alone; speedups in `graph_speedup_vs_fp32`). `--e2e`
adds one forward of DiT-XL/2's 112 linears (28 blocks: qkv, proj, fc1 + GELU, fc2; 256 tokens per
image) at batch 1 and 8: wall time, weight memory and the forward's peak GPU memory above it, per
implementation. `--write-thresholds` stores the largest token count at which the Triton path beat
cuBLAS fp32 on every shape, which dispatch reads on CUDA.

    python benchmarks/kernels_gpu.py --e2e --json benchmarks/results/kernels-gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from diffquant.io_utils import write_json  # noqa: E402
from diffquant.kernels import triton_kernels  # noqa: E402
from diffquant.kernels.dispatch import _THRESHOLDS  # noqa: E402
from diffquant.kernels.reference import dequant_linear  # noqa: E402
from diffquant.kernels.tune import CONFIGS, LINEARS, TOKENS, random_aq  # noqa: E402
from diffquant.provenance import provenance  # noqa: E402

GEMV_TOKENS = 64  # the direct path is timed up to here


def cuda_ms(fn, reps: int, inner: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / inner)
    return sorted(times)[len(times) // 2]


def graph_ms(fn, reps: int, inner: int = 20) -> float | None:
    """The same timing replaying a CUDA graph of `inner` calls: the kernels alone, without Python's
    launch costs (how a deployment at batch 1 runs them, e.g. torch.compile's reduce-overhead).
    None if the implementation cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(inner):
                fn()
    except RuntimeError as err:
        print(f"  (no CUDA graph: {str(err).splitlines()[0][:100]})")
        torch.cuda.synchronize()
        return None
    return cuda_ms(graph.replay, reps, inner=1) / inner


def _tf32(fn):
    def run():
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return fn()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
    return run


def make_impls(x, w32, cb, codes8, scale, bias, only: tuple[str, ...] = ()) -> dict:
    """name -> (callable, weight bytes it reads)."""
    n_out, n_in = w32.shape
    w16, wb, b16, bb = w32.half(), w32.bfloat16(), bias.half(), bias.bfloat16()
    x16, xb = x.half(), x.bfloat16()
    aq_bytes = codes8.numel() + cb.numel() * 2 + n_out * 2
    impls = {"cublas_fp32": (lambda: F.linear(x, w32, bias), 4 * n_in * n_out),
             "cublas_tf32": (_tf32(lambda: F.linear(x, w32, bias)), 4 * n_in * n_out),
             "cublas_fp16": (lambda: F.linear(x16, w16, b16), 2 * n_in * n_out),
             "cublas_bf16": (lambda: F.linear(xb, wb, bb), 2 * n_in * n_out),
             "dequant_dense": (lambda: dequant_linear(x, cb, codes8, scale, bias), aq_bytes),
             "triton_dequant": (lambda: triton_kernels.aq_linear(x, cb, codes8, scale, bias, path="dequant"),
                                aq_bytes),
             "triton_mm": (lambda: triton_kernels.aq_linear(x, cb, codes8, scale, bias, path="matmul"), aq_bytes),
             "triton_mm_tf32": (lambda: triton_kernels.aq_linear(x, cb, codes8, scale, bias, path="matmul",
                                                                 ieee=False), aq_bytes)}
    if only:
        impls = {k: v for k, v in impls.items() if k in only}
    if x.shape[0] <= GEMV_TOKENS:
        impls["triton_gemv"] = (lambda: triton_kernels.aq_linear(x, cb, codes8, scale, bias, path="gemv"), aq_bytes)
    return impls


def _best_config(impl: str) -> str | None:
    if not impl.startswith("triton"):
        return None
    tuner = triton_kernels._aq_gemv_tuned if impl == "triton_gemv" else triton_kernels._aq_matmul_tuned
    return str(getattr(tuner, "best_config", None))


def kernel_rows(reps: int, tokens: tuple[int, ...], linears: dict, only: tuple[str, ...] = ()) -> list[dict]:
    dev, gen, rows = torch.device("cuda"), torch.Generator().manual_seed(0), []
    for cfg, (m, bits) in CONFIGS.items():
        for name, (n_in, n_out) in linears.items():
            cb, codes, scale = random_aq(n_out, n_in, m, bits, 8, gen)
            cb, codes8, scale = cb.to(dev), codes.to(torch.uint8).to(dev), scale.to(dev)
            bias = torch.randn(n_out, generator=gen).to(dev) * 0.1
            w32 = dequant_linear(torch.eye(n_in, device=dev), cb, codes8, scale, None).t().contiguous()
            for t in tokens:
                x = torch.randn(t, n_in, device=dev)
                ref = F.linear(x.double(), w32.double(), bias.double())
                base = gbase = None
                for impl, (fn, wbytes) in make_impls(x, w32, cb, codes8, scale, bias, only).items():
                    try:
                        err = ((fn().double() - ref).abs().max() / ref.abs().max()).item()
                        ms, gms = cuda_ms(fn, reps), graph_ms(fn, reps)
                    except Exception as exc:  # a kernel that fails to build is a row, not a lost run
                        rows.append({"layer": name, "tokens": t, "config": cfg, "impl": impl, "error": repr(exc)[:300]})
                        print(f"{name} {cfg} T={t} {impl} FAILED {exc!r:.200}", flush=True)
                        continue
                    base, gbase = base or ms, gbase or gms
                    rows.append({"layer": name, "in": n_in, "out": n_out, "tokens": t, "config": cfg, "impl": impl,
                                 "median_ms": round(ms, 5), "speedup_vs_fp32": round(base / ms, 3),
                                 "graph_ms": gms and round(gms, 5),
                                 "graph_speedup_vs_fp32": gms and gbase and round(gbase / gms, 3),
                                 "weight_bytes": wbytes, "flops": 2 * t * n_in * n_out,
                                 "max_rel_error": float(f"{err:.2e}"), "blocks": _best_config(impl)})
                    print(f"{name} {cfg} T={t} {impl} {ms:.4f} ms x{base / ms:.2f} graph {gms} err {err:.1e}",
                          flush=True)
    return rows


def e2e_rows(reps: int, batches: tuple[int, ...]) -> list[dict]:
    """DiT-XL/2's 112 linears, random 2x8 AQ codes, one forward per batch size."""
    dev, gen, d = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(1), 1152
    shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)] * 28
    layers = []
    for n_in, n_out in shapes:
        cb = (torch.randn(2, 256, 8, device=dev, generator=gen) * 0.02).half().float()
        codes = torch.randint(0, 256, (n_out, n_in // 8, 2), device=dev, generator=gen, dtype=torch.uint8)
        layers.append((cb, codes, torch.rand(n_out, device=dev, generator=gen) + 0.5, torch.zeros(n_out, device=dev)))

    def forward(lin, x):
        for i in range(0, len(layers), 4):
            h = x + lin(i + 1, lin(i, x)[:, :d])
            x = h + lin(i + 3, F.gelu(lin(i + 2, h)))
        return x

    def aq(impl):
        def lin(i, x):
            cb, codes, s, b = layers[i]
            if impl == "dequant_dense":
                return dequant_linear(x, cb, codes, s, b)
            if impl == "triton_mm_tf32":
                return triton_kernels.aq_linear(x, cb, codes, s, b, path="matmul", ieee=False)
            return triton_kernels.aq_linear(x, cb, codes, s, b)  # its default path for the token count
        return lin

    def dense(dtype):
        ws = [(dequant_linear(torch.eye(i_, device=dev), cb, c, s, None).t().contiguous().to(dtype), b.to(dtype))
              for (i_, _), (cb, c, s, b) in zip(shapes, layers, strict=True)]
        return (lambda i, x: F.linear(x, ws[i][0], ws[i][1])), sum(w.numel() * w.element_size() for w, _ in ws)

    aq_bytes = sum(c.numel() + cb.numel() * 2 + s.numel() * 2 for cb, c, s, _ in layers)
    rows = []  # weights_mib: what the layers hold; work_peak_mib: the forward's own peak above that
    for impl in ("fp32_dense", "fp16_dense", "dequant_dense", "triton", "triton_mm_tf32"):
        torch.cuda.empty_cache()
        if impl.endswith("_dense") and impl != "dequant_dense":
            dtype = torch.float32 if impl == "fp32_dense" else torch.float16
            lin, wbytes = dense(dtype)
        else:
            lin, wbytes, dtype = aq(impl), aq_bytes, torch.float32
        for batch in batches:
            x = torch.randn(batch * 256, d, device=dev, dtype=dtype)
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            with torch.no_grad():
                ms = cuda_ms(lambda lin=lin, x=x: forward(lin, x), reps, inner=3)
            peak = torch.cuda.max_memory_allocated() - held
            rows.append({"model": "dit-xl2-linears", "batch": batch, "tokens": batch * 256, "impl": impl,
                         "median_ms": round(ms, 3), "weight_mib": round(wbytes / 2**20, 1),
                         "work_peak_mib": round(peak / 2**20, 1)})
            print(rows[-1], flush=True)
    base = {r["batch"]: r["median_ms"] for r in rows if r["impl"] == "fp32_dense"}
    for r in rows:
        r["speedup_vs_fp32"] = round(base[r["batch"]] / r["median_ms"], 3)
    return rows


def gpu_max_tokens(rows: list[dict]) -> int:
    """Largest token count up to which the best Triton path beat cuBLAS fp32 on every shape and config."""
    best: dict = {}
    for r in rows:
        if r["impl"] in ("triton_gemv", "triton_dequant", "triton_mm") and "error" not in r:
            key = (r["layer"], r["config"], r["tokens"])
            if r["max_rel_error"] < 1e-3:  # a wrong kernel is not a fast one
                best[key] = max(best.get(key, 0.0), r["speedup_vs_fp32"])
    limit = 0
    for t in sorted({k[2] for k in best}):
        if all(v > 1.0 for k, v in best.items() if k[2] == t):
            limit = t
        else:
            break
    return limit


def write_gpu_threshold(run: dict) -> None:
    meta = json.loads(_THRESHOLDS.read_text())
    meta["gpu"] = {"max_tokens_triton": gpu_max_tokens(run["rows"]), "device": run["device"],
                   "commit": run["provenance"]["commit"], "source": "benchmarks/kernels_gpu.py"}
    write_json(_THRESHOLDS, meta)
    print(f"thresholds.json: Triton beats cuBLAS fp32 up to {meta['gpu']['max_tokens_triton']} tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="DiT-XL/2 qkv only, 1/16/256/4096 tokens")
    ap.add_argument("--e2e", action="store_true", help="also DiT-XL/2's linears end to end")
    ap.add_argument("--gemv-only", action="store_true", help="the direct path and its dense peers, 1 and 16 tokens")
    ap.add_argument("--write-thresholds", action="store_true")
    ap.add_argument("--thresholds-from", type=Path, default=None,
                    help="write thresholds.json's GPU entry from a saved run (no GPU needed), then stop")
    args = ap.parse_args()
    if args.thresholds_from:
        write_gpu_threshold(json.loads(args.thresholds_from.read_text()))
        return
    if not torch.cuda.is_available() or not triton_kernels.available():
        sys.exit("error: needs a CUDA GPU and `pip install triton`; nothing was measured")
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    linears = {"dit-xl2.qkv": LINEARS["dit-xl2.qkv"]} if args.quick else LINEARS
    tokens = (1, 16) if args.gemv_only else (1, 16, 256, 4096) if args.quick else TOKENS
    only = ("cublas_fp32", "cublas_fp16", "triton_gemv") if args.gemv_only else ()
    rows = kernel_rows(args.reps, tokens, linears, only)
    out = {"provenance": provenance(), "device": torch.cuda.get_device_name(),
           "triton": triton_kernels.triton.__version__, "gpu_max_tokens": gpu_max_tokens(rows), "rows": rows}
    if args.e2e:
        out["e2e"] = e2e_rows(max(3, args.reps // 3), (1, 8))
    out["wall_s"] = round(time.time() - t0, 1)
    if args.json:
        write_json(args.json, out)
    if args.write_thresholds:
        write_gpu_threshold(out)
    print(f"triton beats cuBLAS fp32 on every shape up to {out['gpu_max_tokens']} tokens; {out['wall_s']} s")


if __name__ == "__main__":
    main()
