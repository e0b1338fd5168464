"""Uniform scalar quantization of weights: per output channel or per group of the flattened input,
symmetric or asymmetric, with the range chosen by min-max or by an Lp clipping search.

Scales are stored in fp16 and the codes are computed *with* the fp16 scale, so what is saved
dequantizes to exactly the weights that were evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.formats.base import QuantizedWeight, check_group, flat2d
from diffquant.formats.packing import code_dtype, pack_bits, unpack_bits


@dataclass(frozen=True)
class UniformSpec:
    bits: int = 4
    group_size: int = 0  # 0: one scale per output channel
    symmetric: bool = False
    clip: str = "minmax"  # "minmax" or "lp" (search of the clipping ratio minimising the Lp error)
    p: float = 2.4
    grid: int = 40  # clipping ratios tried by the "lp" search, from 1.0 down to `min_ratio`
    min_ratio: float = 0.5

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise ValueError(f"uniform bits must be in 1..8, got {self.bits}")
        if self.clip not in ("minmax", "lp"):
            raise ValueError(f"clip must be 'minmax' or 'lp', got {self.clip!r}")
        if self.symmetric and self.bits < 2:
            raise ValueError("symmetric quantization needs at least 2 bits")


def _qparams(lo: torch.Tensor, hi: torch.Tensor, spec: UniformSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale as fp16-representable float32, integer zero point) for ranges [lo, hi]."""
    levels = (1 << spec.bits) - 1
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / ((1 << (spec.bits - 1)) - 1 if spec.bits > 2 else 1)).clamp_min(1e-8)
        scale = scale.half().float().clamp_min(6e-8)
        zero = torch.full_like(scale, 1 << (spec.bits - 1))
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = ((hi - lo) / levels).clamp_min(1e-8).half().float().clamp_min(6e-8)
        zero = torch.round(-lo / scale).clamp(0, levels)
    return scale, zero


def _quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, (1 << bits) - 1)


class UniformWeight(QuantizedWeight):
    format = "uniform"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, shape: tuple[int, ...],
                 spec: UniformSpec):
        self.codes, self.scale, self.zero = codes, scale, zero  # (out, in_flat), (out, G) fp16, (out, G)
        self.shape, self.spec = tuple(shape), spec

    @classmethod
    def quantize(cls, weight: torch.Tensor, spec: UniformSpec, name: str = "") -> UniformWeight:
        w = flat2d(weight)
        out, in_flat = w.shape
        groups = check_group(name, in_flat, spec.group_size)
        wg = w.reshape(out, groups, -1)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale, zero = _qparams(lo, hi, spec)
        if spec.clip == "lp":
            best_err = torch.full_like(lo, float("inf"))
            for r in torch.linspace(1.0, spec.min_ratio, spec.grid):
                s, z = _qparams(lo * r, hi * r, spec)
                deq = (_quantize(wg, s[..., None], z[..., None], spec.bits) - z[..., None]) * s[..., None]
                err = (deq - wg).abs().pow(spec.p).sum(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        codes = _quantize(wg, scale[..., None], zero[..., None], spec.bits).reshape(out, in_flat)
        return cls(codes.to(code_dtype(spec.bits)), scale.half(), zero.to(code_dtype(spec.bits)),
                   weight.shape, spec)

    def dequantize(self) -> torch.Tensor:
        out, groups = self.scale.shape
        c = self.codes.float().reshape(out, groups, -1)
        w = (c - self.zero.float()[..., None]) * self.scale.float()[..., None]
        return w.reshape(self.shape)

    def packed_state(self) -> dict[str, torch.Tensor]:
        state = {"codes": pack_bits(self.codes, self.spec.bits), "scale": self.scale.contiguous()}
        if not self.spec.symmetric:  # a symmetric zero point is a constant, not stored
            state["zero"] = pack_bits(self.zero, self.spec.bits)
        return state

    @classmethod
    def from_packed(cls, state: dict[str, torch.Tensor], meta: dict) -> UniformWeight:
        spec = UniformSpec(**meta["spec"])
        shape = tuple(meta["shape"])
        out = shape[0]
        in_flat = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
        scale = state["scale"]
        codes = unpack_bits(state["codes"], spec.bits, out * in_flat).reshape(out, in_flat)
        if spec.symmetric:
            zero = torch.full(scale.shape, 1 << (spec.bits - 1), dtype=code_dtype(spec.bits))
        else:
            zero = unpack_bits(state["zero"], spec.bits, scale.numel()).reshape(scale.shape)
        return cls(codes, scale, zero, shape, spec)
