"""Qua²SeDiMo's mixed-precision recipes at full metrics, side by side in one run with what they must
beat: every uniform single-method 4-bit configuration (AQ-4 too when the space was built with AQ
options; the paper's three methods alone are then also compared), and the best labelled random
configuration at the same or more bits; each weight-only and with the recipe's activations (A6,
dynamic per token).

    python benchmarks/mixed_quality.py --model mnist-unet --size quick

Reads `benchmarks/results/sensitivity-MODEL/sensitivity.json` (from `benchmarks/sensitivity.py`) and
its label cache; writes the rows to `quality-SIZE-MODEL-mixed.json` (resumable, grids beside it) and
the comparison, as ratios of FID to FP, to `mixed-quality-MODEL.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _best_random(doc: dict, bits: float) -> dict | None:
    """The labelled random configuration with the lowest FID to FP at `bits` or more."""
    pool = [lab for lab in doc["labels"] if lab["bits"] >= bits - 1e-9]
    return min(pool, key=lambda lab: lab["fid_to_fp"]) if pool else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-unet")
    ap.add_argument("--size", choices=("quick", "full"), default="quick")
    ap.add_argument("-n", type=int, default=None, help="override the sample count of --size")
    ap.add_argument("--act-bits", type=int, default=6)
    ap.add_argument("--recipes", default=None,
                    help="comma-separated mixed recipe names (default: every weight-only one)")
    ap.add_argument("--redo", action="store_true",
                    help="measure the mixed recipes again (after benchmarks/sensitivity.py rewrote them under the "
                         "same names); the uniform and random rows are kept")
    ap.add_argument("--cache", type=Path, default=Path("runs/cache/sensitivity"))
    args = ap.parse_args(argv)

    import diffquant as dq
    from diffquant.bench import SIZES, run_quality
    from diffquant.io_utils import write_json
    from diffquant.nn.act import ActSpec
    from diffquant.provenance import provenance
    from diffquant.sensitivity.sample import config_from_json
    from diffquant.sensitivity.space import SearchSpace

    sens_dir = RESULTS / f"sensitivity-{args.model}"
    if not (sens_dir / "sensitivity.json").exists():
        raise SystemExit(f"{sens_dir / 'sensitivity.json'} is missing: run benchmarks/sensitivity.py --model "
                         f"{args.model} first")
    doc = json.loads((sens_dir / "sensitivity.json").read_text())
    tag = f"a{args.act_bits}"
    mixed = [k for k in doc["recipes"] if not k.endswith(tag)]
    if args.recipes:
        mixed = [k for k in mixed if k in args.recipes.split(",")]
    # the single-method 4-bit configurations (an 8-bit option, `--with-w8`, is a layer's refuge, not a rival)
    uniform = [f"{args.model}-uniform-{o}" for o in doc["options"] if o.endswith("-4")]

    # the best random configuration at or above each recipe's bits, written as recipes too
    space = None
    randoms: dict[str, str] = {}
    for name in mixed:
        lab = _best_random(doc, doc["recipes"][name]["effective_bits"])
        if lab is None:
            continue
        rname = f"{args.model}-random-{lab['key']}"
        randoms[name] = rname
        if not (sens_dir / f"{rname}.json").exists():
            path = args.cache / args.model / f"labels-n{doc['settings']['n']}" / f"{lab['key']}.json"
            if not path.exists():
                raise SystemExit(f"the label of random configuration {lab['key']} is not in {path.parent}: "
                                 "run benchmarks/sensitivity.py with the same --cache first")
            config = config_from_json(json.loads(path.read_text())["config"])
            space = space or SearchSpace(dq.load(args.model)[0], cache_dir=args.cache / args.model / "space").build()
            space.to_recipe(config, rname).to_json(sens_dir / f"{rname}.json")
            space.to_recipe(config, rname + tag, act=ActSpec(args.act_bits, "dynamic")).to_json(
                sens_dir / f"{rname}{tag}.json")

    names = [*mixed, *uniform, *sorted(set(randoms.values()))]
    names += [n + tag for n in names]
    rel = sens_dir.relative_to(Path.cwd()) if sens_dir.is_relative_to(Path.cwd()) else sens_dir
    methods = ["fp"] + [str(rel / f"{n}.json") for n in names]  # the row names carry no machine's paths
    n = args.n or SIZES[args.size]
    size = args.size if args.n is None else f"n{n}"
    t0 = time.time()
    out = RESULTS / f"quality-{size}-{args.model}-mixed.json"
    if args.redo and out.exists():  # the old rows of the re-measured recipes are kept, marked, out of the tables
        old = json.loads(out.read_text())
        stale = {m for name in mixed for m in (name, name + tag)}
        gone = [r for r in old["rows"] if Path(r["method"]).stem in stale]
        for r in gone:
            r.pop("grid", None)  # the new row's grid takes the file name
            r["superseded"] = ("re-measured with --redo after benchmarks/sensitivity.py rewrote the recipe; this row "
                               f"was measured at commit {old.get('commit', '?')} or earlier")
        old.setdefault("superseded_rows", []).extend(gone)
        old["rows"] = [r for r in old["rows"] if Path(r["method"]).stem not in stale]
        write_json(out, old)
    rows = run_quality([args.model], methods, n, out, size=size)["rows"]
    by_name = {Path(r["method"]).stem: r for r in rows if r["method"] != "fp"}

    def brief(name: str) -> dict:
        r = by_name[name]
        return {k: r[k] for k in ("effective_bits", "fid_to_fp", "fid", "class_accuracy", "psnr", "ssim")}

    comparison = {}
    for name in mixed:
        for suffix in ("", tag):
            me = brief(name + suffix)
            uni = {u + suffix: brief(u + suffix) for u in uniform}
            best_uni = min(uni, key=lambda u: uni[u]["fid_to_fp"])
            entry = {"recipe": me, "uniform_4bit": uni, "best_uniform": best_uni,
                     "ratio_to_best_uniform": me["fid_to_fp"] / max(uni[best_uni]["fid_to_fp"], 1e-12),
                     "beats_every_uniform_4bit": all(me["fid_to_fp"] < u["fid_to_fp"] for u in uni.values())}
            paper = [u + suffix for u in uniform if u.rsplit("uniform-", 1)[1] in doc.get("paper_options", [])]
            if len(paper) < len(uni):  # the space has extra methods (AQ): the paper's three on their own too
                entry["beats_every_paper_uniform_4bit"] = all(me["fid_to_fp"] < uni[u]["fid_to_fp"] for u in paper)
            if name in randoms:
                rnd = brief(randoms[name] + suffix)
                entry.update(best_random=randoms[name] + suffix, best_random_row=rnd,
                             ratio_to_best_random=me["fid_to_fp"] / max(rnd["fid_to_fp"], 1e-12),
                             beats_best_random=me["fid_to_fp"] < rnd["fid_to_fp"])
            comparison[name + suffix] = entry
    write_json(RESULTS / f"mixed-quality-{args.model}.json",
               {"benchmark": "mixed_quality", "model": args.model, "size": size, "n": n, "rows_file": out.name,
                "comparison": comparison, "wall_time_s": round(time.time() - t0, 1), **provenance()})
    for k, v in comparison.items():
        print(f"{k}: FID-to-FP {v['recipe']['fid_to_fp']:.3f} at {v['recipe']['effective_bits']:.2f} bits; "
              f"{v['ratio_to_best_uniform']:.2f}x the best uniform 4-bit ({v['best_uniform']})"
              + (f", {v['ratio_to_best_random']:.2f}x the best random" if "ratio_to_best_random" in v else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
