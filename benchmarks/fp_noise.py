"""Is a quantized model within noise of FP? FP's own spread over several seeds, and every quantized
row of the quality results judged against it.

    python benchmarks/quality.py --size full --methods fp --seed 20000 \
        --out benchmarks/results/quality-full-fp-seed20000.json       # and other seeds
    python benchmarks/fp_noise.py --size full

For each model and metric against the real data (FID, sFID, IS, precision, recall, class accuracy):
FP's mean, standard deviation (ddof=1) and range over the seeds found in `quality-SIZE*.json`, and
the 95% prediction band of one more FP run (`diffquant.metrics.noise`; class accuracy's spread is
at least the binomial one); then each quantized row at seed 0 gets its z-score and whether it is
inside the band. FID-to-FP gets its own yardstick: the FID between FP's seed-0 samples and FP's
samples at another seed (same labels, other noise), i.e. how far FP is from itself; a quantized
row below it is closer to FP than FP's rerun. Those FP samples come from the sample cache; seeds
whose samples are not cached are left out of that yardstick unless `--sample-missing`. Writes `fp-noise-SIZE.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _quality_docs(size: str, n: int) -> dict[str, dict]:
    """file name -> results document, for every `quality-SIZE*.json` at n samples."""
    docs = {p.name: json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"quality-{size}*.json")) if p.is_file()}
    return {name: d for name, d in docs.items() if d.get("n") == n}


def _fp_rows(docs: dict[str, dict]) -> dict[str, dict[int, dict]]:
    """model -> seed -> the FP row (with the file it came from)."""
    out: dict[str, dict[int, dict]] = {}
    for name, doc in docs.items():
        for r in doc["rows"]:
            if r["method"] == "fp":
                out.setdefault(r["model"], {}).setdefault(doc.get("seed", 0), {**r, "file": name})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("quick", "full"), default="full")
    ap.add_argument("--level", type=float, default=0.95, help="coverage of the prediction band")
    ap.add_argument("--sample-missing", action="store_true",
                    help="sample FP at a seed whose samples are not cached, for FID-to-FP's yardstick (slow)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if not 0 < args.level < 1:
        raise SystemExit(f"--level {args.level}: give the band's coverage as a fraction, e.g. 0.95")

    from diffquant.bench import SIZES, Protocol
    from diffquant.io_utils import write_json
    from diffquant.metrics.evaluate import evaluate
    from diffquant.metrics.noise import NOISE_METRICS, seed_band
    from diffquant.provenance import provenance

    n = SIZES[args.size]
    docs = _quality_docs(args.size, n)
    fp = _fp_rows(docs)
    doc: dict = {"benchmark": "fp-noise", "size": args.size, "n": n, "level": args.level, "models": {}, **provenance()}
    for model, by_seed in sorted(fp.items()):
        if 0 not in by_seed or len(by_seed) < 2:
            print(f"{model}: FP at seeds {sorted(by_seed)}; need seed 0 and one more, skipped")
            continue
        seeds = sorted(by_seed)
        acc = sum(by_seed[s]["class_accuracy"] for s in seeds) / len(seeds)
        floors = {"class_accuracy": (acc * (1 - acc) / n) ** 0.5}  # binomial: n samples, each right or wrong
        bands = {m: seed_band([by_seed[s][m] for s in seeds], args.level, floors.get(m, 0.0)) for m in NOISE_METRICS}
        # FP against itself with other noise: the FID-to-FP a rerun of FP would score
        ref = Protocol(n, seed=0).fp_samples(model)
        cross = {}
        for s in seeds[1:]:
            proto = Protocol(n, seed=s)
            other = proto.fp_samples(model) if args.sample_missing else proto.cached(model)
            if other is None:
                print(f"{model}: FP samples at seed {s} are not in the cache (--sample-missing samples them)")
                continue
            cross[s] = evaluate(other, proto.labels, ref_images=ref)["fid_to_fp"]
            print(f"{model}: FID between FP at seed 0 and seed {s}: {cross[s]:.4f}", flush=True)
        if not cross:
            raise SystemExit(f"{model}: no FP samples at another seed in runs/cache/samples: run with --sample-missing")
        cross_mean = sum(cross.values()) / len(cross)
        judged = []
        for name, qdoc in docs.items():
            if qdoc.get("seed", 0) != 0:
                continue
            for r in qdoc["rows"]:
                if r["model"] != model or r["method"] == "fp" or any(k not in r for k in (*NOISE_METRICS, "fid_to_fp")):
                    continue
                verdict = {m: bands[m].judge(r[m]) for m in NOISE_METRICS}
                judged.append({
                    "method": r["method"], "file": name, "commit": r.get("commit", qdoc.get("commit")),
                    "effective_bits": r.get("effective_bits"),
                    "fid_to_fp": r["fid_to_fp"],
                    "fid_to_fp_over_fp_rerun": r["fid_to_fp"] / cross_mean,
                    "within_band_on": [m for m in NOISE_METRICS if verdict[m]["within_band"]],
                    "outside_band_on": [m for m in NOISE_METRICS if not verdict[m]["within_band"]],
                    "metrics": verdict,
                })
        doc["models"][model] = {
            "seeds": seeds,
            "fp_rows": {str(s): {"file": by_seed[s]["file"], "commit": by_seed[s].get("commit"),
                                 **{m: by_seed[s][m] for m in NOISE_METRICS}} for s in seeds},
            "bands": {m: b.to_dict() for m, b in bands.items()},
            "fp_rerun_fid_to_fp": {str(s): v for s, v in cross.items()},
            "fp_rerun_fid_to_fp_mean": cross_mean,
            "judged": judged,
        }
        for j in judged:
            print(f"  {model:11s} {j['method'][:40]:40s} FID-to-FP {j['fid_to_fp']:8.4f} "
                  f"({j['fid_to_fp_over_fp_rerun']:6.2f}x FP rerun)  outside: {','.join(j['outside_band_on']) or '-'}")
    out = args.out or RESULTS / f"fp-noise-{args.size}.json"
    write_json(out, doc)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
