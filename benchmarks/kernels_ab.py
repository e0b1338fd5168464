"""This tree's CPU lookup kernel against an earlier revision's, side by side in one process.

A kernel change is judged on the machine it runs on, against the kernel it replaces, with the same
weights, inputs and dense baseline: `benchmarks/kernels.py` compares with dense and the peers, this
compares two builds of `aq_lut.cpp`. The base revision's source is taken from git (`git show
REV:src/diffquant/kernels/aq_lut.cpp`) and built beside this tree's; a source that reads codes
row-major (before 2e5461a) gets them row-major, the current one column-major (`cpu.cpu_layout`).
Both outputs are checked against each other and against dequantize-then-dense.

`--cold` also times every call after streaming through a buffer twice the size of the last-level cache,
so that the weights (dense fp32, or codes and codebooks) come from DRAM as they do in a whole model,
where each layer's weight is evicted by the others before it is used again. Hot timings call the same
layer back to back, which lets a 16-21 MB fp32 weight sit in a 36 MB L3.

    python benchmarks/kernels_ab.py --base 2d7432e --json benchmarks/results/kernels-ab-onetoken.json
    python benchmarks/kernels_ab.py --tokens 1,16 --cold --json benchmarks/results/kernels-ab-cold.json
    python benchmarks/kernels_ab.py --base c0ae416 --lookups --json benchmarks/results/kernels-ab-byteplanes.json
    python benchmarks/kernels_ab.py --base 99f6559 --tokens 1,16,256 --mixed \
        --json benchmarks/results/kernels-ab-scratch.json
    python benchmarks/kernels_ab.py --base c0ae416 --tokens 4,16,64,256 --token-major \
        --json benchmarks/results/kernels-ab-tokenmajor.json
    python benchmarks/kernels_ab.py --base HEAD --lookups --configs 1x9,1x10,1x12 \
        --json benchmarks/results/kernels-ab-lookups-2byte.json
    python benchmarks/kernels_ab.py --base 2745d31 --tokens 2,4,8,16,64,256,1024 --mixed --reps 20 \
        --layers dit-xl2.qkv,dit-xl2.proj,dit-xl2.fc1,dit-xl2.fc2,ldm4.attn960,ldm4.attn576,sd15.1280 \
        --convs ldm4.conv960@8,ldm4.conv576@16,ldm4.conv384@32,ldm4.conv192@64,zoo-unet.conv128@8 \
        --json benchmarks/results/kernels-ab-block-columns.json
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load

from diffquant.formats.additive import dequantize_additive
from diffquant.io_utils import write_json
from diffquant.kernels import cpu
from diffquant.kernels.tune import CONFIGS, CONVS, LINEARS, random_aq, random_aq_conv3x3, timeit_rounds
from diffquant.provenance import provenance

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/diffquant/kernels/aq_lut.cpp"


def build_revision(rev: str):
    """The extension built from `rev`'s aq_lut.cpp (cached by content), whether it reads codes column-major, and
    the table block argument it takes: a number of groups (8) before 2745d31's successor, then of (group,
    codebook) columns (cpu.BLOCK_COLUMNS)."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except subprocess.CalledProcessError as e:
        raise SystemExit(f"cannot read {SOURCE} at revision {rev!r}: {e.stderr.strip()} "
                         "(give a commit of this repository with --base)") from e
    key = hashlib.sha256(src.encode() + " ".join(cpu._flags()).encode()).hexdigest()[:12]
    d = cpu.build_dir() / f"aq_lut_base_{key}"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "aq_lut_base.cpp"
    path.write_text(src)
    ext = load(name=f"diffquant_aq_lut_base_{key}", sources=[str(path)], extra_cflags=cpu._flags(),
               extra_ldflags=["-fopenmp"], build_directory=str(d))
    return ext, "codes_t" in src, cpu.BLOCK_COLUMNS if "block_columns" in src else 8


def llc_bytes() -> int:
    """The last-level cache's size from sysfs (32 MiB if it cannot be read)."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        best = max(best, int(text.rstrip("KM")) * mult)
    return best or 32 << 20


def timeit_cold(fn, reps: int, flush: torch.Tensor) -> float:
    """Median ms of `fn` with the caches flushed before each call (the flush is not timed)."""
    ts = []
    with torch.no_grad():
        fn()
        for _ in range(reps):
            flush.add_(1.0)  # reads and writes every line of a buffer twice the LLC
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def compare(x: torch.Tensor, w: torch.Tensor, kcb: torch.Tensor, kscale: torch.Tensor, base: tuple, here: tuple,
            reps: int, flush: torch.Tensor | None = None, lookups: tuple[str, ...] = (),
            token_major: bool = False, disturb=None) -> dict:
    """Dense, the base kernel and this tree's on one linear's input: times (medians over rotating rounds,
    see kernels.timeit_rounds; cold ones too with `flush`) and errors against dense. `base` and `here` are
    (extension, codes, table block argument). `lookups`: this tree's one-token lookups (cpu.LOOKUPS) to time
    as well, each forced, as impl `lut_<name>`. `token_major`: also this tree's kernel called as a linear
    layer calls it, from x (tokens, in) to (tokens, out), two ways: `lut_copy_t` transposes the input by a
    copy first (as cpu.aq_linear did before), `lut_token_major` lets the kernel read and write that layout
    itself. `disturb`: also time every call right after an untimed call of it (`--mixed`), as `*_mixed`."""
    xt = x.t().contiguous()
    (base_ext, base_codes, base_block), (ext, codes, block) = base, here
    fns = {"fp32_dense": lambda: F.linear(x, w),
           "base_lut": lambda: base_ext.aq_matmul_tokens(xt, kcb, base_codes, kscale, None, base_block, True).t(),
           "lut": lambda: ext.aq_matmul_tokens(xt, kcb, codes, kscale, None, block, True).t()}
    if token_major:
        fns["lut_copy_t"] = lambda: ext.aq_matmul_tokens(x.t().contiguous(), kcb, codes, kscale, None, block, True).t()
        fns["lut_token_major"] = lambda: ext.aq_matmul_tokens(x, kcb, codes, kscale, None, block, token_major=True)
    for name in lookups:
        fns[f"lut_{name}"] = (lambda i: lambda: ext.aq_matmul_tokens(xt, kcb, codes, kscale, None, block, True, i).t())(
            cpu.LOOKUPS.index(name))
    row, ms = time_against_dense(fns, F.linear(x, w), reps, flush, disturb)
    return {**row, **{f"{name}_vs_fp32": round(ms["fp32_dense"] / ms[f"lut_{name}"], 3) for name in lookups},
            **({"token_major_vs_copy_t": round(ms["lut_copy_t"] / ms["lut_token_major"], 3),
                "token_major_vs_fp32": round(ms["fp32_dense"] / ms["lut_token_major"], 3)} if token_major else {})}


def compare_conv(x: torch.Tensor, w: torch.Tensor, kcb: torch.Tensor, kscale: torch.Tensor, base: tuple,
                 here: tuple, reps: int, flush: torch.Tensor | None = None, disturb=None) -> dict:
    """`compare` for a square 3x3 KAQ convolution (stride 1, padding 1), each kernel reading the patches
    from the image itself (`aq_conv2d`, both revisions from 2e5461a on)."""
    (base_ext, base_codes, base_block), (ext, codes, block) = base, here
    conv = (3, 3, 1, 1, 1, 1, 1, 1)  # kh, kw, sh, sw, ph, pw, dh, dw
    fns = {"fp32_dense": lambda: F.conv2d(x, w, None, 1, 1),
           "base_lut": lambda: base_ext.aq_conv2d(x, kcb, base_codes, kscale, None, *conv, base_block),
           "lut": lambda: ext.aq_conv2d(x, kcb, codes, kscale, None, *conv, block)}
    return time_against_dense(fns, F.conv2d(x, w, None, 1, 1), reps, flush, disturb)[0]


def time_against_dense(fns: dict, ref: torch.Tensor, reps: int, flush: torch.Tensor | None, disturb
                       ) -> tuple[dict, dict[str, float]]:
    """Times of `fns` (fp32_dense, base_lut, lut and any more) in rounds, hot, then cold and after `disturb` where
    given, with each one's error against `ref` and the ratios of the lookup to the base and to dense: (the row,
    the unrounded hot medians in ms)."""
    err = {}
    for impl, fn in fns.items():
        with torch.no_grad():
            err[impl] = ((fn() - ref).abs().max() / ref.abs().max()).item()
    ms = timeit_rounds(fns, reps)
    cold = {}
    if flush is not None:
        for impl, fn in fns.items():
            cold[f"{impl}_cold"] = timeit_cold(fn, max(5, reps // 4), flush)
        cold_ratios = {"lut_vs_base_cold": round(cold["base_lut_cold"] / cold["lut_cold"], 3),
                       "lut_vs_fp32_cold": round(cold["fp32_dense_cold"] / cold["lut_cold"], 3)}
    else:
        cold_ratios = {}
    if disturb is not None:
        mixed = {f"{k}_mixed": v for k, v in timeit_rounds(fns, reps, before=disturb).items()}
        cold.update(mixed)
        cold_ratios.update({"lut_vs_base_mixed": round(mixed["base_lut_mixed"] / mixed["lut_mixed"], 3),
                            "lut_vs_fp32_mixed": round(mixed["fp32_dense_mixed"] / mixed["lut_mixed"], 3)})
    row = {**{f"{k}_ms": round(v, 4) for k, v in {**ms, **cold}.items()}, **cold_ratios,
           "lut_vs_base": round(ms["base_lut"] / ms["lut"], 3), "lut_vs_fp32": round(ms["fp32_dense"] / ms["lut"], 3),
           "base_vs_fp32": round(ms["fp32_dense"] / ms["base_lut"], 3),
           "max_rel_error": {k: float(f"{v:.2e}") for k, v in err.items()}}
    return row, ms


def parse_configs(ap: argparse.ArgumentParser, text: str) -> dict[str, tuple[int, int]]:
    """'1x8,1x10' -> {'1x8': (1, 8), '1x10': (1, 10)}; a malformed entry stops with its name."""
    configs = {}
    for cfg in text.split(","):
        m, _, bits = cfg.partition("x")
        if not (m.isdigit() and bits.isdigit() and 1 <= int(m) <= 8 and 4 <= int(bits) <= 16):
            ap.error(f"--configs: {cfg!r} is not MxB (1-8 codebooks x 4-16 bits), e.g. 1x8 or 1x10")
        configs[cfg] = (int(m), int(bits))
    return configs


def report(name: str, cfg: str, tokens: int, row: dict, cold: bool, mixed: bool) -> None:
    print(f"{name:18s} {cfg} T={tokens:5d}  dense {row['fp32_dense_ms']:.3f}  base {row['base_lut_ms']:.3f}"
          f"  new {row['lut_ms']:.3f} ms   new/base x{row['lut_vs_base']:.2f}  new/dense x{row['lut_vs_fp32']:.2f}"
          + (f"   cold: dense {row['fp32_dense_cold_ms']:.3f}  base {row['base_lut_cold_ms']:.3f}  new "
             f"{row['lut_cold_ms']:.3f} ms  new/dense x{row['lut_vs_fp32_cold']:.2f}" if cold else "")
          + (f"   after dequant: base {row['base_lut_mixed_ms']:.3f}  new {row['lut_mixed_ms']:.3f} ms  "
             f"new/base x{row['lut_vs_base_mixed']:.2f}  new/dense x{row['lut_vs_fp32_mixed']:.2f}" if mixed else ""),
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="2d7432e", help="the revision whose kernel is the baseline")
    ap.add_argument("--tokens", default="1", help="comma-separated token counts")
    ap.add_argument("--layers", default="dit-xl2.qkv,dit-xl2.proj,dit-xl2.fc1,dit-xl2.fc2,sd15.1280",
                    help="linear layers (tune.LINEARS), comma-separated; empty for none")
    ap.add_argument("--convs", default="", help="3x3 convolutions (tune.CONVS), comma-separated, each timed at "
                                                "--batches; their tokens are batch x pixels")
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes for --convs")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cold", action="store_true", help="also time with the caches flushed before each call")
    ap.add_argument("--mixed", action="store_true",
                    help="also time every call right after an untimed dequantize-then-dense product of the same "
                         "layer, as the kernel table's rounds have it: the caches partly evicted, as in a model")
    ap.add_argument("--token-major", action="store_true",
                    help="also time the kernel from and to a linear's (tokens, features) layout, with and without "
                         "a transposed copy of the input (see compare)")
    ap.add_argument("--lookups", action="store_true",
                    help="at 1 token, also time each one-token lookup this build runs (cpu.one_token_lookups), forced")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help="codebooks x bits per code, comma-separated (1x10: 1,024 codewords, 2-byte codes)")
    args = ap.parse_args()
    configs = parse_configs(ap, args.configs)
    torch.set_num_threads(args.threads)
    layers, convs = [n for n in args.layers.split(",") if n], [n for n in args.convs.split(",") if n]
    unknown = [name for name in layers if name not in LINEARS] + [name for name in convs if name not in CONVS]
    if unknown:
        raise SystemExit(f"unknown layer(s) {unknown}; choose linears from {sorted(LINEARS)} and convolutions "
                         f"from {sorted(CONVS)}")
    if (args.token_major or args.lookups) and convs:
        raise SystemExit("--token-major and --lookups time linears only; leave out --convs")
    t0 = time.time()
    base, base_colmajor, base_block = build_revision(args.base)
    here = cpu.load_extension()
    gen = torch.Generator().manual_seed(0)
    flush = torch.zeros(2 * llc_bytes() // 4) if args.cold else None
    rows = []
    for name in layers:
        n_in, n_out = LINEARS[name]
        for cfg, (m, bits) in configs.items():
            cb, codes, scale = random_aq(n_out, n_in, m, bits, 8, gen)
            kcb, rowmajor, kscale = cpu.kernel_layout(codes, cb, scale, bits)
            colmajor = cpu.cpu_layout(codes, cb, scale, bits)[1]
            base_codes = colmajor if base_colmajor else rowmajor
            w = dequantize_additive(codes, cb, scale).contiguous()
            for tokens in (int(t) for t in args.tokens.split(",")):
                x = torch.randn(tokens, n_in, generator=gen)
                lookups = ()
                if args.lookups and tokens == 1:
                    lookups = tuple(cpu.one_token_lookups(1 << bits, colmajor.element_size())[1])
                disturb = (lambda x=x, codes=codes, cb=cb, scale=scale:
                           F.linear(x, dequantize_additive(codes, cb, scale))) if args.mixed else None
                row = compare(x, w, kcb, kscale, (base, base_codes, base_block), (here, colmajor, cpu.BLOCK_COLUMNS),
                              args.reps, flush, lookups, args.token_major, disturb)
                rows.append({"layer": name, "in": n_in, "out": n_out, "config": cfg, "tokens": tokens, **row})
                report(name, cfg, tokens, row, flush is not None, args.mixed)
    for name in convs:
        ch, hw = CONVS[name]
        for cfg, (m, bits) in configs.items():
            cb, codes, scale, w = random_aq_conv3x3(ch, m, bits, gen)
            kcb, rowmajor, kscale = cpu.kernel_layout(codes, cb, scale, bits)
            colmajor = cpu.cpu_layout(codes, cb, scale, bits)[1]
            base_codes = colmajor if base_colmajor else rowmajor
            for batch in (int(b) for b in args.batches.split(",")):
                x = torch.randn(batch, ch, hw, hw, generator=gen)
                disturb = (lambda x=x, codes=codes, cb=cb, scale=scale, w=w:
                           F.conv2d(x, dequantize_additive(codes, cb, scale).reshape(w.shape), None, 1, 1)
                           ) if args.mixed else None
                row = compare_conv(x, w, kcb, kscale, (base, base_codes, base_block),
                                   (here, colmajor, cpu.BLOCK_COLUMNS), args.reps, flush, disturb)
                rows.append({"layer": name, "in": ch * 9, "out": ch, "config": cfg, "batch": batch,
                             "tokens": batch * hw * hw, **row})
                report(name, cfg, batch * hw * hw, row, flush is not None, args.mixed)
    result = {"provenance": provenance(), "base": args.base, "threads": args.threads, "reps": args.reps,
              "mixed": args.mixed,
              "cold_flush_bytes": None if flush is None else flush.numel() * 4,
              "wall_s": round(time.time() - t0, 1), "rows": rows}
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
