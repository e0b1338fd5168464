"""Qua²SeDiMo on a zoo model, for the report: `diffquant sensitivity`'s pipeline (space, labelled
random and uniform configurations, GNN vs gradient-boosted trees vs summed per-layer error in k
folds, explanations, recipes at the target bits), plus how well the cheap label ranks like a
larger-sample FID-to-FP (`--check-configs` configurations re-labelled with `--check-n` images).
Labels are cached under --cache; an interrupted run resumes. The recipes are copied to
benchmarks/recipes/ (file names carry the model and the bits).

    python benchmarks/sensitivity.py --model mnist-unet --target-bits 3.5,3.9 --act-bits 6 \\
        --json benchmarks/results/sensitivity-mnist-unet.json
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from scipy.stats import spearmanr

RECIPES = Path(__file__).parent / "recipes"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-unet")
    ap.add_argument("--target-bits", default="3.5")
    ap.add_argument("--act-bits", type=int, default=None)
    ap.add_argument("--configs", type=int, default=120)
    ap.add_argument("--n", type=int, default=128, help="images per configuration label")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--check-configs", type=int, default=20)
    ap.add_argument("--check-n", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path("runs/cache/sensitivity"))
    ap.add_argument("--with-aq", action="store_true", help="also search additive-codebook (AQ) options per layer")
    ap.add_argument("--with-w8", action="store_true", help="also let a layer stay at 8-bit uniform (uaq-8)")
    ap.add_argument("--out", type=Path, default=None, help="plots and recipes (default: beside --json)")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)

    import torch

    from diffquant.io_utils import write_json
    from diffquant.provenance import provenance
    from diffquant.sensitivity.pipeline import SensitivitySettings, run
    from diffquant.sensitivity.sample import LabelConfig, label_parallel, random_configs
    from diffquant.sensitivity.space import SearchSpace

    torch.set_num_threads(1)
    t0 = time.time()
    out = args.out or args.json.parent / args.json.stem
    settings = SensitivitySettings(configs=args.configs, n=args.n, workers=args.workers, folds=args.folds,
                                   epochs=args.epochs, extra_options=("aq",) * args.with_aq + ("uaq-8",) * args.with_w8)
    targets = [float(t) for t in args.target_bits.split(",")]
    doc = run(args.model, out, targets, args.act_bits, settings, cache=args.cache)
    if args.check_configs:
        import diffquant as dq

        cache = args.cache / args.model
        space = SearchSpace(dq.load(args.model)[0], cache_dir=cache / "space").build(progress=False)
        sub = random_configs(space, args.configs, seed=0)[:args.check_configs]
        big = label_parallel(args.model, cache / "space", sub, cache / f"labels-n{args.check_n}",
                             LabelConfig(n=args.check_n), workers=args.workers)
        small = {lab["key"]: lab for lab in doc["labels"]}
        pairs = [(small[b["key"]], b) for b in big if b["key"] in small]
        doc["label_check"] = {"configs": len(pairs), "n_small": args.n, "n_large": args.check_n}
        for k in ("fid_to_fp", "mse_to_fp"):
            rho = spearmanr([s[k] for s, _ in pairs], [b["fid_to_fp"] for _, b in pairs]).statistic
            doc["label_check"][f"spearman_{k}_n{args.n}_vs_fid_to_fp_n{args.check_n}"] = float(rho)
    RECIPES.mkdir(exist_ok=True)
    for r in doc["recipes"].values():
        shutil.copy(out / r["file"], RECIPES / r["file"])
    doc["benchmark"] = "sensitivity"
    doc["plots_dir"] = out.name if out.parent == args.json.parent else str(out)
    doc["wall_time_s"] = round(time.time() - t0, 1)
    doc.update(provenance())
    write_json(args.json, doc)
    print({k: v["mean"] for k, v in doc["predictors"].items()}, doc.get("label_check"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
