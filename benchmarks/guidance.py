"""Why each zoo model samples at its guidance scale: class agreement of the shipped classifier with the
requested digit, for FP samples at several classifier-free guidance scales (DDIM, 20 steps, seeds 5,000,000+, away
from the evaluation seeds), plus the mean background level of the samples next to the real data's.

    python benchmarks/guidance.py --out benchmarks/results/guidance.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from diffquant.data import load_mnist
from diffquant.io_utils import write_json
from diffquant.metrics.features import load_feature_net
from diffquant.models import load, meta_of
from diffquant.pipelines import balanced_labels, sample
from diffquant.provenance import provenance


def background(images: torch.Tensor) -> float:
    """Mean value of the 4-pixel border (always background in MNIST), in [-1, 1] units."""
    border = torch.cat([images[..., :4, :].flatten(1), images[..., -4:, :].flatten(1)], 1)
    return float(border.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist-unet,mnist-dit")
    ap.add_argument("--scales", default="1.0,1.25,1.35,1.5,2.0,3.0")
    ap.add_argument("-n", type=int, default=500)
    # away from the evaluation seeds (0..4999): choosing the guidance there would tune on the test set
    ap.add_argument("--seed", type=int, default=5_000_000)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/guidance.json"))
    args = ap.parse_args()
    t0 = time.time()
    net = load_feature_net()
    labels = balanced_labels(args.n)
    doc = {"benchmark": "guidance", "n": args.n, "steps": 20, "sampler": "ddim", "seed": args.seed,
           "real_background": background(load_mnist().images), "rows": []}
    for name in args.models.split(","):
        model, sched = load(name)
        for g in [float(s) for s in args.scales.split(",")]:
            imgs = sample(model, sched, labels, seed=args.seed, steps=20, guidance=g, progress=False)
            acc = float((net(imgs)["logits"].argmax(1) == labels).double().mean())
            row = {"model": name, "guidance": g, "class_accuracy": acc, "background": background(imgs),
                   "shipped_guidance": meta_of(model).guidance_scale}
            doc["rows"].append(row)
            print(f"{name:10s} g={g:.2f} acc {acc:.3f} background {row['background']:+.3f}", flush=True)
    doc["wall_time_s"] = round(time.time() - t0, 1)
    doc.update(provenance())
    write_json(args.out, doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
