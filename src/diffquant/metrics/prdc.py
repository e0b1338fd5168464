"""Improved precision and recall (Kynkaanniemi et al. 2019): k-NN balls around each real (fake)
feature; precision = fraction of fakes inside some real ball, recall = fraction of reals inside
some fake ball."""

from __future__ import annotations

import torch


def _knn_radii(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    inside = []
    for i in range(0, len(queries), chunk):
        d = torch.cdist(queries[i:i + chunk], support)
        inside.append((d <= radii[None]).any(1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    real, fake = real.double(), fake.double()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall needs more than k={k} samples on each side")
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall
