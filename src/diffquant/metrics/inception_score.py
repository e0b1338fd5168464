"""Inception Score from a classifier's logits: exp(E_x KL(p(y|x) || p(y))), over splits."""

from __future__ import annotations

import torch


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `splits` equal parts, as in the original IS code. The images are put in a
    fixed random order first: the original assumes shuffled inputs, and a class-sorted set (such as
    the MNIST file) would otherwise give splits of one class each and an IS of 1."""
    probs = torch.softmax(logits.double(), dim=1)
    probs = probs[torch.randperm(len(probs), generator=torch.Generator().manual_seed(0))]
    scores = []
    for part in probs.chunk(splits):
        py = part.mean(0, keepdim=True)
        kl = (part * (torch.log(part + 1e-12) - torch.log(py + 1e-12))).sum(1).mean()
        scores.append(torch.exp(kl))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if len(s) > 1 else 0.0
