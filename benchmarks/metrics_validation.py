"""Validation of the metrics and of the shipped feature network; writes
benchmarks/results/metrics-validation.json.

  - held-out accuracy of the feature network on its documented split
  - FID / sFID / precision / recall between two random halves of the real data (should be small)
  - FID of uniform noise, of blank images, and of a shifted copy of the data (should be large)
  - Frechet distance of samples from two known Gaussians vs the closed form
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from diffquant.data import feature_split, load_mnist
from diffquant.io_utils import write_json
from diffquant.metrics.features import CHECKPOINT, accuracy, load_feature_net
from diffquant.metrics.fid import fid_from_features, frechet_distance
from diffquant.metrics.prdc import precision_recall
from diffquant.provenance import provenance


def main() -> int:
    t0 = time.time()
    ext = load_feature_net()
    data = load_mnist()
    _, test = feature_split(data)
    real = ext(data.images)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    a, b = perm[:2500], perm[2500:]
    gen = torch.Generator().manual_seed(1)
    fakes = {
        "uniform_noise": torch.rand(2500, 1, 32, 32, generator=gen) * 2 - 1,
        "blank": torch.full((2500, 1, 32, 32), -1.0),
        "real_shifted_4px": torch.roll(data.images[b], shifts=4, dims=3),
        "real_blurred": torch.nn.functional.avg_pool2d(data.images[b], 3, 1, 1),
    }
    out = {"feature_net_held_out_accuracy": accuracy(ext.net, test.images, test.labels),
           "feature_net_record": json.loads(CHECKPOINT.with_suffix(".json").read_text()),
           "real_half_vs_half": {
               "fid": fid_from_features(real["pool"][a], real["pool"][b]),
               "sfid": fid_from_features(real["spatial"][a], real["spatial"][b]),
               "precision_recall": precision_recall(real["pool"][a], real["pool"][b])}}
    for name, imgs in fakes.items():
        f = ext(imgs)
        out[f"real_half_vs_{name}"] = {"fid": fid_from_features(real["pool"][a], f["pool"]),
                                       "sfid": fid_from_features(real["spatial"][a], f["spatial"])}
    rng = np.random.default_rng(0)
    mu1, mu2, v1, v2 = np.zeros(8), np.full(8, 0.5), np.ones(8), np.full(8, 4.0)
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2)))
    x = rng.normal(mu1, np.sqrt(v1), size=(50000, 8))
    y = rng.normal(mu2, np.sqrt(v2), size=(50000, 8))
    out["gaussians"] = {"closed_form": closed,
                        "from_true_parameters": frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)),
                        "from_50k_samples": fid_from_features(x, y)}
    out.update(provenance())
    out["wall_time_s"] = round(time.time() - t0, 1)
    path = Path(__file__).parent / "results" / "metrics-validation.json"
    write_json(path, out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "feature_net_record")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
