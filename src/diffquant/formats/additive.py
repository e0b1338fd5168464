"""Additive vector quantization (AQLM-style codebooks), the weight format of AQUATIC-Diff.

A weight is viewed as (out_features, in_flat) with in_flat = in_channels * kh * kw in PyTorch's own
order, so a group of g = kh * kw consecutive weights is exactly one kernel slice (KAQ) and a group of
g = 8 is eight consecutive inputs (linear layers, 1x1 convolutions). Each group of each output row is
the sum of M codewords, one from each of M codebooks of 2^B vectors of length g, times a per-row scale:

    W[o, j*g:(j+1)*g] = scale[o] * sum_m codebooks[m, codes[o, j, m]]

Stored: codes bit-packed at B bits, codebooks and scales in fp16. The codebooks and scales held in
memory are already fp16-rounded, so what is evaluated is exactly what is saved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.formats.base import QuantizedWeight
from diffquant.formats.packing import code_dtype, pack_bits, unpack_bits


@dataclass(frozen=True)
class AdditiveSpec:
    codebooks: int = 2  # M
    bits: int = 8  # B: each codebook has 2^B codewords
    group: int = 8  # g: codeword length (kh * kw for kernel-aware convolutions)

    def __post_init__(self):
        if not 1 <= self.codebooks <= 8:
            raise ValueError(f"codebooks (M) must be in 1..8, got {self.codebooks}")
        if not 1 <= self.bits <= 16:
            raise ValueError(f"codebook bits (B) must be in 1..16, got {self.bits}")
        if not 1 <= self.group <= 64:
            raise ValueError(f"group (codeword length g) must be in 1..64, got {self.group}")

    @property
    def label(self) -> str:
        """M x B g: `2x8g8` is two codebooks of 2^8 codewords of 8 weights."""
        return f"{self.codebooks}x{self.bits}g{self.group}"

    @property
    def code_bits_per_weight(self) -> float:
        return self.codebooks * self.bits / self.group

    def effective_bits(self, out_features: int, in_flat: int) -> float:
        """Every stored bit (codes, fp16 codebooks, fp16 scales) over the layer's weights."""
        n = out_features * in_flat
        codes = (n // self.group * self.codebooks * self.bits + 7) // 8 * 8
        codebooks = self.codebooks * (1 << self.bits) * self.group * 16
        return (codes + codebooks + out_features * 16) / n


class AdditiveWeight(QuantizedWeight):
    format = "additive"

    def __init__(self, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...],
                 spec: AdditiveSpec):
        # codes (out, G, M) integer; codebooks (M, 2^B, g) fp16; scale (out,) fp16
        self.codes, self.codebooks, self.scale = codes, codebooks.half(), scale.half()
        self.shape, self.spec = tuple(shape), spec

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_flat(self) -> int:
        return self.numel // self.shape[0]

    def dequantize(self) -> torch.Tensor:
        return dequantize_additive(self.codes, self.codebooks.float(), self.scale.float()).reshape(self.shape)

    def packed_state(self) -> dict[str, torch.Tensor]:
        return {"codes": pack_bits(self.codes, self.spec.bits), "codebooks": self.codebooks.contiguous(),
                "scale": self.scale.contiguous()}

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], meta: dict) -> AdditiveWeight:
        spec = AdditiveSpec(**meta["spec"])
        shape = tuple(meta["shape"])
        n = math.prod(shape)
        out, groups = shape[0], n // shape[0] // spec.group
        codes = unpack_bits(state["codes"], spec.bits, out * groups * spec.codebooks)
        cb = state["codebooks"]
        if tuple(cb.shape) != (spec.codebooks, 1 << spec.bits, spec.group) or state["scale"].numel() != out:
            raise ValueError(f"codebooks {tuple(cb.shape)} / scale {tuple(state['scale'].shape)} do not match "
                             f"the map's spec {spec} and shape {shape}")
        return cls(codes.reshape(out, groups, spec.codebooks), cb, state["scale"], shape, spec)


def dequantize_additive(codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(out, G*g) weight from codes (out, G, M), codebooks (M, K, g), scale (out,), by one embedding_bag:
    the M codebooks are one table of M*K rows, and each group sums the M rows its codes select. This is
    the reference dequantization that the kernels issue measures against (differentiable in the
    codebooks and the scale, which the fine-tuning uses)."""
    out, groups, m = codes.shape
    k, g = codebooks.shape[1], codebooks.shape[2]
    offsets = torch.arange(m, device=codes.device) * k
    idx = (codes.long() + offsets).reshape(-1, m)
    w = F.embedding_bag(idx, codebooks.reshape(m * k, g), mode="sum")
    return w.reshape(out, groups * g) * scale[:, None]


def codes_dtype(spec: AdditiveSpec) -> torch.dtype:
    return code_dtype(spec.bits)
