"""Non-uniform (k-means) weight quantization: 2^b fp16 centroids per output channel (K-Means-C) or
for the whole tensor (K-Means-A), and b-bit codes. One-dimensional Lloyd iterations, vectorised over
rows: with sorted centroids the nearest one is found by `searchsorted` on the midpoints, so memory
stays O(weights) instead of O(weights x centroids)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffquant.formats.base import QuantizedWeight, flat2d
from diffquant.formats.packing import code_dtype, pack_bits, unpack_bits


@dataclass(frozen=True)
class KMeansSpec:
    bits: int = 4
    scope: str = "channel"  # "channel" (K-Means-C) or "tensor" (K-Means-A)
    iters: int = 25

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"k-means bits must be in 1..8, got {self.bits}")
        if self.scope not in ("channel", "tensor"):
            raise ValueError(f"k-means scope must be 'channel' or 'tensor', got {self.scope!r}")


def _assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid; c sorted along its last dim. x (R, N), c (R, K)."""
    mids = (c[:, 1:] + c[:, :-1]) / 2
    return torch.searchsorted(mids.contiguous(), x.contiguous())


def kmeans_1d(x: torch.Tensor, k: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise 1-D k-means. Returns (centroids (R, K) sorted, codes (R, N)). Initialised at the
    quantiles of each row, which is both deterministic and close to optimal for bell-shaped weights."""
    rows, n = x.shape
    q = (torch.arange(k, dtype=torch.float32) + 0.5) / k
    xs = x.sort(dim=1).values
    c = xs[:, (q * (n - 1)).round().long()].clone()
    for _ in range(iters):
        codes = _assign(x, c)
        sums = torch.zeros(rows, k).scatter_add_(1, codes, x)
        counts = torch.zeros(rows, k).scatter_add_(1, codes, torch.ones_like(x))
        c = torch.where(counts > 0, sums / counts.clamp_min(1), c).sort(dim=1).values
    c = c.half().float()  # what is stored; assign against it so codes match the stored centroids
    return c, _assign(x, c)


class KMeansWeight(QuantizedWeight):
    format = "kmeans"

    def __init__(self, codes: torch.Tensor, centroids: torch.Tensor, shape: tuple[int, ...], spec: KMeansSpec):
        self.codes, self.centroids, self.shape, self.spec = codes, centroids, tuple(shape), spec

    @classmethod
    def quantize(cls, weight: torch.Tensor, spec: KMeansSpec, name: str = "") -> KMeansWeight:
        w = flat2d(weight)
        x = w if spec.scope == "channel" else w.reshape(1, -1)
        k = min(1 << spec.bits, x.shape[1])
        c, codes = kmeans_1d(x, k, spec.iters)
        return cls(codes.reshape(w.shape).to(code_dtype(spec.bits)), c.half(), weight.shape, spec)

    def dequantize(self) -> torch.Tensor:
        c = self.centroids.float()
        codes = self.codes.long()
        if self.spec.scope == "channel":
            w = c.gather(1, codes)
        else:
            w = c[0][codes]
        return w.reshape(self.shape)

    def packed_state(self) -> dict[str, torch.Tensor]:
        return {"codes": pack_bits(self.codes, self.spec.bits), "centroids": self.centroids.contiguous()}

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], meta: dict) -> KMeansWeight:
        spec = KMeansSpec(**meta["spec"])
        shape = tuple(meta["shape"])
        n = math.prod(shape)
        codes = unpack_bits(state["codes"], spec.bits, n).reshape(shape[0], -1)
        return cls(codes, state["centroids"], shape, spec)
