"""What choosing a kernel costs per AQ product, with the choice remembered per shape and without.

Every AQ layer asks `kernels.dispatch.choose` which path to run on every call. This script
1. samples the zoo's AQ W2A8 U-Net once (`-n` images, 20 steps, `auto` dispatch) and counts those calls
   and the distinct shapes they ask about (what the memo holds);
2. times one call, in one process and in rotated rounds, three ways: `memoised` (`choose` as shipped),
   `recomputed` (the thresholds looked up again on every call, `choose` before the memo) and
   `forced` (a path forced with `dispatch.force`, which never reads thresholds), for each shape of step 1;
3. multiplies: the dispatch time of one sampling run either way.

    python benchmarks/dispatch_overhead.py --unet runs/unet-aq-w2a8 --json benchmarks/results/dispatch-overhead.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from diffquant.io_utils import write_json
from diffquant.kernels import dispatch
from diffquant.provenance import provenance


def count_calls(unet: str, n: int) -> tuple[Counter, float]:
    """Calls to `dispatch.choose` per (device, shape) in one sampling run of `unet`, and its wall time."""
    from diffquant.models import load
    from diffquant.pipelines import balanced_labels, sample

    model, sched = load(unet)
    calls: Counter = Counter()
    real = dispatch.choose

    def counting(device, *shape, **kw):
        calls[(device.type, *shape, kw.get("dense_cached", True))] += 1
        return real(device, *shape, **kw)

    dispatch.choose = counting
    try:
        t0 = time.perf_counter()
        sample(model, sched, balanced_labels(n), seed=0, steps=20, batch_size=n, progress=False)
        wall = time.perf_counter() - t0
    finally:
        dispatch.choose = real
    return calls, wall


def recomputed(device, tokens, out, in_flat, m, k, g, dense_cached=True) -> str:
    """`choose` without the memo: the forced path, else the thresholds looked up for this call."""
    impl = dispatch.forced()
    return impl if impl != "auto" else dispatch._choose_auto(device, tokens, out, in_flat, m, k, g, dense_cached)


def per_call_us(shapes: list[tuple], calls: int, rounds: int) -> dict[str, float]:
    """Median over rounds of the mean time of one `choose` call, cycling through `shapes`."""
    ways = {"memoised": dispatch.choose, "recomputed": recomputed}
    args = [(torch.device(s[0]), *s[1:-1]) for s in shapes]
    flags = [s[-1] for s in shapes]
    times: dict[str, list[float]] = {w: [] for w in [*ways, "forced"]}
    for r in range(rounds):
        for way in list(times)[r % 3:] + list(times)[:r % 3]:
            if way == "forced":
                with dispatch.force("lut"):
                    t0 = time.perf_counter()
                    for i in range(calls):
                        j = i % len(args)
                        dispatch.choose(*args[j], dense_cached=flags[j])
                    times[way].append((time.perf_counter() - t0) / calls * 1e6)
                continue
            fn = ways[way]
            t0 = time.perf_counter()
            for i in range(calls):
                j = i % len(args)
                fn(*args[j], dense_cached=flags[j])
            times[way].append((time.perf_counter() - t0) / calls * 1e6)
    return {w: round(statistics.median(v), 3) for w, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="runs/unet-aq-w2a8", help="a saved AQ W2A8 mnist-unet folder")
    ap.add_argument("-n", type=int, default=64, help="images sampled (one batch)")
    ap.add_argument("--calls", type=int, default=20000, help="choose() calls per timed round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from kernels_e2e import require_unet

    require_unet(args.unet, "")
    calls, wall = count_calls(args.unet, args.n)
    total = sum(calls.values())
    us = per_call_us(list(calls), args.calls, args.rounds)
    per_run_ms = {w: round(v * total / 1e3, 2) for w, v in us.items()}
    print(f"zoo AQ W2A8 U-Net, {args.n} images x 20 steps: {total} choose() calls over {len(calls)} shapes, "
          f"sampling {wall:.2f} s")
    for w, v in us.items():
        print(f"  {w:10s} {v:6.3f} us per call -> {per_run_ms[w]:7.2f} ms per sampling run "
              f"({per_run_ms[w] / 1e3 / wall:.3%} of it)")
    print(f"  memo: {us['recomputed'] / us['memoised']:.2f}x faster per call")
    result = {"provenance": provenance(), "threads": torch.get_num_threads(), "unet": args.unet, "n": args.n,
              "threshold_source": dispatch.threshold_source(), "choose_calls_per_sampling_run": total,
              "distinct_shapes": len(calls), "sampling_wall_s": round(wall, 3), "per_call_us": us,
              "dispatch_ms_per_sampling_run": per_run_ms,
              "memo_speedup_per_call": round(us["recomputed"] / us["memoised"], 3)}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
