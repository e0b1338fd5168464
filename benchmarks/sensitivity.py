"""Qua²SeDiMo on a zoo model: the search space, random configurations and their labels, the
predictors in k folds, and (with --check-n) how well the cheap label ranks like a larger-sample
FID-to-FP.

Stages, each cached under --cache (an interrupted run resumes where it stopped):
  space   every layer x {UAQ, K-Means-C, K-Means-A} x {2, 3, 4} bits, quantized once
  labels  --configs random configurations, each sampled (--n images, fixed noise) and scored
  check   the first --check-configs configurations re-scored at --check-n images (rank correlation)
  fit     GNN vs gradient-boosted trees vs summed per-layer error, --folds folds

    python benchmarks/sensitivity.py --model mnist-unet --configs 120 \
        --json benchmarks/results/sensitivity-mnist-unet.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-unet")
    ap.add_argument("--configs", type=int, default=120)
    ap.add_argument("--n", type=int, default=128, help="images per configuration label")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--check-configs", type=int, default=0)
    ap.add_argument("--check-n", type=int, default=1000)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--target", default="fid_to_fp", choices=["fid_to_fp", "mse_to_fp"])
    ap.add_argument("--stages", default="space,labels,check,fit")
    ap.add_argument("--cache", type=Path, default=Path("runs/cache/sensitivity"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import diffquant as dq
    from diffquant.io_utils import write_json
    from diffquant.methods.sensitivity.graph import extract_graph
    from diffquant.methods.sensitivity.predictor import TrainConfig, cross_validate, target_of
    from diffquant.methods.sensitivity.sample import LabelConfig, label_parallel, random_configs
    from diffquant.methods.sensitivity.space import SearchSpace
    from diffquant.pipelines import latent_shape
    from diffquant.provenance import provenance

    t0 = time.time()
    stages = set(args.stages.split(","))
    torch.set_num_threads(1)
    model, scheduler = dq.load(args.model)[:2]
    cache = args.cache / args.model
    space = SearchSpace(model, cache_dir=cache / "space").build()
    configs = random_configs(space, args.configs, seed=0)
    doc: dict = {"benchmark": "sensitivity", "model": args.model, "configs": args.configs, "n": args.n,
                 "layers": len(space.layers), "units": len(space.units),
                 "options": [o.key for o in space.options]}
    labels = []
    if "labels" in stages or "fit" in stages:
        labels = label_parallel(args.model, cache / "space", configs, cache / f"labels-n{args.n}",
                                LabelConfig(n=args.n), workers=args.workers)
        doc["labelled"] = len(labels)
        doc["bits_range"] = [min(lab["bits"] for lab in labels), max(lab["bits"] for lab in labels)]
    if "check" in stages and args.check_configs:
        sub = configs[:args.check_configs]
        big = label_parallel(args.model, cache / "space", sub, cache / f"labels-n{args.check_n}",
                             LabelConfig(n=args.check_n), workers=args.workers)
        small = {lab["key"]: lab for lab in labels}
        pairs = [(small[b["key"]], b) for b in big if b["key"] in small]
        doc["label_check"] = {
            "configs": len(pairs), "n_small": args.n, "n_large": args.check_n,
            **{f"spearman_{k}_vs_large_fid_to_fp": float(spearmanr([s[k] for s, _ in pairs],
                                                                   [b["fid_to_fp"] for _, b in pairs]).statistic)
               for k in ("fid_to_fp", "mse_to_fp")}}
        print(doc["label_check"], flush=True)
    if "fit" in stages and labels:
        graph = extract_graph(model, torch.randn(1, *latent_shape(model)), torch.tensor([500]), torch.tensor([0]))
        by_key = {lab["key"]: lab for lab in labels}
        from diffquant.methods.sensitivity.sample import config_key

        kept = [c for c in configs if config_key(c) in by_key]
        y = target_of([by_key[config_key(c)] for c in kept], args.target)
        cv = cross_validate(space, graph, kept, y, k=args.folds, cfg=TrainConfig(epochs=args.epochs))
        doc["graph"] = {"nodes": len(graph.names), "edges": len(graph.edges)}
        doc["target"] = args.target
        doc["predictors"] = {k: {"folds": cv[k], "mean": cv[f"{k}_mean"]} for k in ("gnn", "trees", "summed_error")}
        doc["heldout_pred"] = [float(v) for v in cv["heldout"]]
        doc["heldout_true"] = [float(v) for v in y]
        print({k: v["mean"] for k, v in doc["predictors"].items()}, flush=True)
        doc["bits_mean"] = float(np.mean([by_key[config_key(c)]["bits"] for c in kept]))
    doc["wall_time_s"] = round(time.time() - t0, 1)
    doc.update(provenance())
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
