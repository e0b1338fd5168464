"""Activation quantizers (fake-quantization of a layer's input).

static  one asymmetric range per tensor, calibrated over the inputs seen at many timesteps of the
        FP sampling trajectory (timestep-aware calibration); the range is chosen by an MSE search
        over clipping ratios of the observed min/max, so rare outliers do not waste the grid.
dynamic per-token asymmetric min-max computed at run time (a token is a row of a linear layer's
        input, or a pixel's channel vector for a convolution).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ActSpec:
    bits: int = 8
    mode: str = "static"  # "static" (per tensor, calibrated) or "dynamic" (per token)

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"activation bits must be in 2..16, got {self.bits}")
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"activation mode must be 'static' or 'dynamic', got {self.mode!r}")


def fake_quant(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    levels = (1 << bits) - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    out = (q - zero) * scale
    if x.requires_grad:  # straight-through estimator, for fine-tuning through quantized activations
        return x + (out - x).detach()
    return out


class ActQuantizer(nn.Module):
    def __init__(self, spec: ActSpec, channel_dim: int = -1):
        super().__init__()
        self.spec = spec
        self.channel_dim = channel_dim  # -1 for linear inputs, 1 for conv inputs (per-token reduction)
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("calibrated", torch.tensor(False))
        self._observed: list[torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, mode={self.spec.mode}"

    def start_observing(self, seed: int = 0) -> None:
        self._observed = []
        self._gen = torch.Generator().manual_seed(seed)  # subsampling is repeatable: same ranges every run

    def observe(self, x: torch.Tensor, max_values: int = 65536) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() > max_values:  # keep the extremes plus a uniform subsample
            idx = torch.randint(0, flat.numel(), (max_values - 2,), generator=self._gen)
            flat = torch.cat([flat[idx], flat.min()[None], flat.max()[None]])
        self._observed.append(flat.float())

    def finish_observing(self, grid: int = 50) -> None:
        """Chooses the static range minimising the MSE over everything observed (all timesteps)."""
        if not self._observed:
            raise RuntimeError("static activation quantizer saw no calibration data")
        x = torch.cat(self._observed)
        self._observed = None
        lo0, hi0 = x.min(), x.max()
        best, best_err = (lo0, hi0), float("inf")
        for r in torch.linspace(1.0, 0.3, grid):
            lo, hi = lo0 * r, hi0 * r
            err = float((fake_quant(x, lo, hi, self.spec.bits) - x).pow(2).mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        self.lo.fill_(best[0])
        self.hi.fill_(best[1])
        self.calibrated.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            self.observe(x)
            return x
        if self.spec.mode == "dynamic":
            dim = self.channel_dim % x.dim()
            lo = x.amin(dim=dim, keepdim=True)
            hi = x.amax(dim=dim, keepdim=True)
            return fake_quant(x, lo, hi, self.spec.bits)
        if not bool(self.calibrated):
            raise RuntimeError(
                "static activation quantizer used before calibration. Fix: pass calibration data to "
                "quantize_ (calib=diffquant.calibrate.collect(...)) or use dynamic activations."
            )
        return fake_quant(x, self.lo, self.hi, self.spec.bits)
