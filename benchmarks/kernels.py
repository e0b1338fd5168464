"""AQ kernels against dense and the peers, side by side in one process (../shared/BENCHMARK.md, Speed).

Shapes of real models (random weights: speed does not depend on training): DiT-XL/2 linears, LDM-4 ImageNet's
attention linears and SD-1.5's, LDM-4's 3x3 convolutions at the resolutions its 64x64 latent runs them
(tokens = batch x pixels: batch 1, then the batches that reach 256 / 1024 / 4096 tokens; linears at 1 / 16 / 64 /
256 / 1024 / 4096 tokens). Configs:
1x8 and 2x8 codebooks (g = 8 for linears, KAQ g = 9 for 3x3 convolutions). Implementations:

    fp32_dense      torch F.linear / F.conv2d on the fp32 weight
    dequant_dense   dequantize the codes (embedding_bag), then dense: the reference path
    diffquant_lut   diffquant's C++ lookup-table kernel (kernels/aq_lut.cpp)
    numba_lut       the same algorithm written in numba (why the shipped kernel is C++; linear only)
    aqlm            the aqlm package's numba kernel (linear, 2^8 codebooks; pip install --no-deps aqlm numba),
                    as shipped: its prange over input groups adds into shared outputs, which races with
                    more than one thread (see max_rel_error)
    quanto-int4/2   optimum-quanto's frozen QLinear (weights int4 / int2, group 64; linear only)
    torchao-int4    torchao IntxWeightOnlyConfig(int4, group 32) (linear only)

numba_lut and aqlm run up to 16 tokens only (seconds to minutes per call beyond), the peers up to 256.
Median of --reps timed runs after warm-up, taken in rounds that run every implementation once
(rotating order) so that the host's slow stretches fall on all of them alike, and the median of that
over --passes passes over the whole table, minutes apart, so that a stretch falls on one pass only; FLOPs (2 per
multiply-add, 1 per lookup add) and weight bytes for each; ratios to fp32 dense. `--write-thresholds`
stores this CPU's entry (per token count, the smallest FLOP bound and layer size at which diffquant_lut beat fp32
dense: what `kernels.dispatch` uses on this microarchitecture) in the shipped thresholds.json.

    python benchmarks/kernels.py --json benchmarks/results/kernels.json --write-thresholds
    python benchmarks/kernels.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffquant.formats.additive import AdditiveSpec
from diffquant.io_utils import write_json
from diffquant.kernels import cpu
from diffquant.kernels.dispatch import _THRESHOLDS, flop_bound
from diffquant.kernels.reference import dequant_conv2d, dequant_linear
from diffquant.kernels.tune import (
    CONFIGS,
    CONVS,
    LINEARS,
    TOKENS,
    break_even,
    conv_batches,
    random_aq,
    random_aq_conv3x3,
    store_entry,
    timeit_rounds,
    warm_up,
)
from diffquant.provenance import provenance


def _numba_lut():
    """The gather-sum of aq_lut.cpp written in numba (parallel over outputs; table by numpy matmul)."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def gather(lut, codes, scale, y):  # lut (J*M, K, T) token-contiguous; codes (O, J*M)
        jm_n, _, t_n = lut.shape
        for o in numba.prange(codes.shape[0]):
            acc = np.zeros(t_n, np.float32)
            for jm in range(jm_n):
                acc += lut[jm, codes[o, jm]]
            y[o] = acc * scale[o]

    def run(x, cb, codes_u8, scale):
        m, k, g = cb.shape
        xt = x.T.reshape(-1, g, x.shape[0])  # (J, g, T)
        lut = np.einsum("mkg,jgt->jmkt", cb, xt).reshape(-1, k, x.shape[0]).astype(np.float32)
        y = np.empty((codes_u8.shape[0], x.shape[0]), np.float32)
        gather(np.ascontiguousarray(lut), codes_u8, scale, y)
        return y.T

    return run


def linear_rows(name, n_in, n_out, tokens, cfg, reps, gen, peers):
    m, bits = CONFIGS[cfg]
    g = 8
    cb, codes, scale = random_aq(n_out, n_in, m, bits, g, gen)
    bias = torch.zeros(n_out)
    w = dequant_linear(torch.eye(n_in), cb, codes, scale, None).t().contiguous()
    x = torch.randn(tokens, n_in, generator=gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, bits)
    ref = F.linear(x, w, bias)
    dense_flops = 2 * tokens * n_in * n_out
    lut_flops = tokens * (2 * n_in * m * (1 << bits) + n_out * (n_in // g) * m)
    aq_bytes = codes.numel() * bits // 8 + cb.numel() * 2 + n_out * 2
    impls = {"fp32_dense": (lambda: F.linear(x, w, bias), dense_flops, 4 * w.numel()),
             "dequant_dense": (lambda: dequant_linear(x, kcb, codes, kscale, bias), dense_flops, aq_bytes),
             "diffquant_lut": (lambda: cpu.aq_linear(x, kcb, kcodes, kscale, bias), lut_flops, aq_bytes)}
    slow_ok = tokens <= 16  # the numba kernels take seconds to minutes per call beyond that
    if "numba" in peers and slow_ok:
        xn, cbn, cn, sn = x.numpy(), kcb.numpy(), codes.to(torch.uint8).reshape(n_out, -1).numpy(), kscale.numpy()
        impls["numba_lut"] = (lambda: peers["numba"](xn, cbn, cn, sn), lut_flops, aq_bytes)
    if "aqlm" in peers and bits == 8 and slow_ok:
        a_codes = codes.to(torch.uint8).view(torch.int8).permute(1, 0, 2).contiguous()  # aqlm wants (groups, out, M)
        a_cb = kcb.reshape(m, 1 << bits, 1, g).contiguous()
        a_scale = kscale.reshape(n_out, 1, 1, 1).contiguous()
        impls["aqlm"] = (lambda: peers["aqlm"](x, a_codes, a_cb, a_scale, bias), lut_flops, aq_bytes)
    for pname in ("quanto-int4", "quanto-int2", "torchao-int4"):
        if pname in peers and tokens <= 256:
            mod = peers[pname](w, bias)
            if mod is not None:
                impls[pname] = (lambda mod=mod: mod(x), dense_flops, _module_bytes(mod))
    bound = flop_bound(n_out, n_in, m, 1 << bits, g)
    return _measure(name, "linear", n_in, n_out, tokens, cfg, impls, ref, reps, bound)


def conv_rows(name, ch, hw, batch, cfg, reps, gen):
    m, bits = CONFIGS[cfg]
    g = 9
    cb, codes, scale, w = random_aq_conv3x3(ch, m, bits, gen)
    bias = torch.zeros(ch)
    shape = (ch, ch, 3, 3)
    x = torch.randn(batch, ch, hw, hw, generator=gen)
    kcb, kcodes, kscale = cpu.cpu_layout(codes, cb, scale, bits)
    ref = F.conv2d(x, w, bias, 1, 1)
    tokens = batch * hw * hw
    dense_flops = 2 * tokens * ch * 9 * ch
    lut_flops = tokens * (2 * ch * 9 * m * (1 << bits) + ch * ch * m)
    aq_bytes = codes.numel() * bits // 8 + cb.numel() * 2 + ch * 2
    impls = {"fp32_dense": (lambda: F.conv2d(x, w, bias, 1, 1), dense_flops, 4 * w.numel()),
             "dequant_dense": (lambda: dequant_conv2d(x, kcb, codes, kscale, bias, shape, 1, 1, 1),
                               dense_flops, aq_bytes),
             "diffquant_lut": (lambda: cpu.aq_conv2d(x, kcb, kcodes, kscale, bias, (3, 3), (1, 1), (1, 1), (1, 1)),
                               lut_flops, aq_bytes)}
    rows = _measure(name, "conv3x3", ch * 9, ch, tokens, cfg, impls, ref, reps, flop_bound(ch, ch * 9, m, 1 << bits, g))
    return [r | {"batch": batch} for r in rows]


CORE = ("fp32_dense", "dequant_dense", "diffquant_lut")  # timed together; the peers in rounds of their own


def _measure(name, kind, n_in, n_out, tokens, cfg, impls, ref, reps, bound):
    rows, errs = [], {}
    for impl, (fn, _, _) in impls.items():
        with torch.no_grad():
            out = torch.as_tensor(fn()).reshape(ref.shape)
        errs[impl] = ((out - ref).abs().max() / ref.abs().max()).item()
    # ours against dense in rounds of their own, then the peers against dense in theirs: with the numba
    # and torchao peers in the same rounds, single 1-token cases of the lookup measured several times
    # slower than alone, some in every pass; the peers' ratios still come from the same process
    core = {i: f for i, (f, _, _) in impls.items() if i in CORE}
    ms = timeit_rounds(core, reps)
    base = {i: ms["fp32_dense"] for i in core}
    others = {i: f for i, (f, _, _) in impls.items() if i not in CORE}
    if others:
        peer_ms = timeit_rounds({"fp32_dense": core["fp32_dense"], **others}, reps)
        ms |= {i: peer_ms[i] for i in others}
        base |= {i: peer_ms["fp32_dense"] for i in others}
    for impl, (_, flops, wbytes) in impls.items():
        err = errs[impl]
        rows.append({"layer": name, "kind": kind, "in": n_in, "out": n_out, "tokens": tokens, "config": cfg,
                     "impl": impl, "median_ms": round(ms[impl], 4), "speedup_vs_fp32": round(base[impl] / ms[impl], 3),
                     "flops": flops, "weight_bytes": wbytes, "flop_bound": round(bound, 3),
                     "max_rel_error": float(f"{err:.2e}")})
        print(f"{name:18s} {cfg} T={tokens:5d} {impl:14s} {ms[impl]:9.3f} ms  x{base[impl] / ms[impl]:5.2f}  "
              f"err {err:.1e}", flush=True)
    return rows


def combine_passes(rows: list[dict]) -> list[dict]:
    """One row per case from several passes over the whole table: the median of the passes' medians, and
    the speed-up as fp32 dense's combined median over the implementation's.
    A pass times each case for well under a second, so a slow stretch of this shared VM can fall on one
    case and not on its neighbours (one pass put DiT qkv 1x8 at 1 token below fp32 dense, where every
    other run had it 3-5x above, and so moved dispatch's 1-token threshold); passes minutes apart put
    such a stretch in one pass only."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["layer"], r["config"], r["tokens"], r["impl"]), []).append(r)
    out = []
    for rs in by.values():
        ms = statistics.median(r["median_ms"] for r in rs)
        out.append(rs[0] | {"median_ms": round(ms, 4), "pass_median_ms": [r["median_ms"] for r in rs],
                            "max_rel_error": max(r["max_rel_error"] for r in rs)})
    fp = {(r["layer"], r["config"], r["tokens"]): r["median_ms"] for r in out if r["impl"] == "fp32_dense"}
    for r in out:
        r["speedup_vs_fp32"] = round(fp[(r["layer"], r["config"], r["tokens"])] / r["median_ms"], 3)
    return out


def _module_bytes(mod) -> int:
    n = 0
    for t in list(mod.state_dict().values()):
        if hasattr(t, "numel"):
            n += t.numel() * t.element_size()
    return n


def load_peers() -> dict:
    peers = {}
    try:
        peers["numba"] = _numba_lut()
    except ImportError:
        print("numba not installed: no numba_lut rows")
    try:
        from aqlm.inference_kernels.numba_kernel import numba_gemm_lut

        peers["aqlm"] = numba_gemm_lut
    except ImportError:
        print("aqlm not installed (pip install --no-deps aqlm==1.1.7 numba): no aqlm rows")

    def quanto(qtype):
        def make(w, bias):
            from optimum.quanto import freeze, quantize

            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.weight.data, lin.bias.data = w.clone(), bias.clone()
            mod = nn.Sequential(lin)
            quantize(mod, weights=qtype)
            freeze(mod)
            return mod
        return make

    try:
        from optimum.quanto import qint2, qint4

        peers["quanto-int4"], peers["quanto-int2"] = quanto(qint4), quanto(qint2)
    except ImportError:
        print("optimum-quanto not installed: no quanto rows")

    def torchao_int4(w, bias):
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data, lin.bias.data = w.clone(), bias.clone()
        mod = nn.Sequential(lin)
        quantize_(mod, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
        return mod

    try:
        import torchao  # noqa: F401

        peers["torchao-int4"] = torchao_int4
    except ImportError:
        print("torchao not installed: no torchao rows")
    return peers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="DiT qkv + LDM-4 conv960 only, 1/16/256/4096 tokens, 10 reps, one pass")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--reps", type=int, default=10, help="timed rounds per case and pass")
    ap.add_argument("--passes", type=int, default=3, help="passes over the whole table (median of the passes)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--write-thresholds", action="store_true", help=f"update {_THRESHOLDS.name} for dispatch")
    args = ap.parse_args()
    if args.passes < 1 or args.reps < 1:
        ap.error("--passes and --reps must be at least 1")
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    cpu.load_extension()
    peers = load_peers()
    gen = torch.Generator().manual_seed(0)
    linears = {"dit-xl2.qkv": LINEARS["dit-xl2.qkv"]} if args.quick else LINEARS
    convs = {"ldm4.conv960@8": CONVS["ldm4.conv960@8"]} if args.quick else CONVS
    tokens = (1, 16, 256, 4096) if args.quick else TOKENS
    reps = 10 if args.quick else args.reps
    args.passes = 1 if args.quick else args.passes
    prov = provenance()
    warm_up()
    t0, rows = time.time(), []
    for p in range(args.passes):
        print(f"pass {p + 1} of {args.passes}", flush=True)
        for cfg in CONFIGS:
            for name, (n_in, n_out) in linears.items():
                for t in tokens:
                    rows += linear_rows(name, n_in, n_out, t, cfg, reps, gen, peers)
            for name, (ch, hw) in convs.items():
                for batch in conv_batches(hw, tokens):
                    rows += conv_rows(name, ch, hw, batch, cfg, reps, gen)
    rows = combine_passes(rows)
    result = {"provenance": prov, "threads": args.threads, "passes": args.passes, "reps": reps,
              "wall_s": round(time.time() - t0, 1),
              "spec_check": {c: AdditiveSpec(m, b, 8).code_bits_per_weight for c, (m, b) in CONFIGS.items()},
              "rows": rows}
    if args.write_thresholds:
        th = break_even(rows)
        result["thresholds"] = th
        # this CPU's entry is replaced; the other machines' and the GPU's (kernels_gpu.py) are kept
        store_entry(_THRESHOLDS, {"source": "benchmarks/kernels.py", "commit": result["provenance"].get("commit"),
                                  "machine": result["provenance"].get("machine", {}).get("cpu"), **th})
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json} ({len(rows)} rows, {result['wall_s']} s)")


if __name__ == "__main__":
    main()
