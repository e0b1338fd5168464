"""Activation quantizers (fake-quantization of a layer's input).

static  one asymmetric range per tensor, calibrated over the inputs seen at many timesteps of the
        FP sampling trajectory (timestep-aware calibration); the range is chosen by an MSE search
        over clipping ratios of the observed min/max, so rare outliers do not waste the grid.
dynamic per-token asymmetric min-max computed at run time (a token is a row of a linear layer's
        input, or a pixel's channel vector for a convolution).

`split` > 0 (static only) gives channels [0, split) and [split, C) their own ranges: Q-Diffusion's
split quantization of the U-Net's skip concatenations, whose two halves (the decoder's features and
the encoder's skip) have very different scales. During reconstruction the ranges are learned
(LSQ-style: `learnable()` makes them parameters with straight-through rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ActSpec:
    bits: int = 8
    mode: str = "static"  # "static" (per tensor, calibrated) or "dynamic" (per token)
    split: int = 0  # static: > 0 gives channels [0, split) and [split, C) separate ranges

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"activation bits must be in 2..16, got {self.bits}")
        if self.mode not in ("static", "dynamic"):
            raise ValueError(f"activation mode must be 'static' or 'dynamic', got {self.mode!r}")
        if self.split < 0 or (self.split and self.mode != "static"):
            raise ValueError(f"split must be >= 0 and needs static mode, got split={self.split}, mode={self.mode!r}")


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


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def fake_quant_lsq(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """fake_quant with gradients for the range too (LSQ / LSQ+): rounding is the identity for the
    backward pass, clamping is not, so lo and hi learn where clipping pays."""
    levels = (1 << bits) - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # as fake_quant: the grid always holds zero
    scale = ((hi - lo) / levels).clamp_min(1e-8)
    zero = _round_ste(-lo / scale)
    q = torch.clamp(_round_ste(x / scale) + zero, 0, levels)
    return (q - zero) * scale


class ActQuantizer(nn.Module):
    def __init__(self, spec: ActSpec, channel_dim: int = -1):
        super().__init__()
        self.spec = spec
        self.channel_dim = channel_dim  # -1 for linear inputs, 1 for conv inputs (per-token reduction)
        shape = (2,) if spec.split else ()
        self.register_buffer("lo", torch.zeros(shape))
        self.register_buffer("hi", torch.zeros(shape))
        self.register_buffer("calibrated", torch.tensor(False))
        self._observed: list[torch.Tensor] | None = None
        self._learned: tuple[nn.Parameter, nn.Parameter] | None = None

    def extra_repr(self) -> str:
        return f"bits={self.spec.bits}, mode={self.spec.mode}"

    def start_observing(self, seed: int = 0) -> None:
        self._observed = [[], []] if self.spec.split else []
        self._gen = torch.Generator().manual_seed(seed)  # subsampling is repeatable: same ranges every run

    def _parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.spec.split:
            return [x]
        dim = self.channel_dim % x.dim()
        if x.shape[dim] <= self.spec.split:
            raise ValueError(f"split activation quantizer at channel {self.spec.split} got an input with "
                             f"{x.shape[dim]} channels; the split must fall inside the input")
        return [x.narrow(dim, 0, self.spec.split), x.narrow(dim, self.spec.split, x.shape[dim] - self.spec.split)]

    def observe(self, x: torch.Tensor, max_values: int = 65536) -> None:
        if self.spec.split:
            for i, part in enumerate(self._parts(x)):
                self._observe_one(part, max_values, self._observed[i])
        else:
            self._observe_one(x, max_values, self._observed)

    def _observe_one(self, x: torch.Tensor, max_values: int, into: list) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() > max_values:  # keep the extremes plus a uniform subsample
            idx = torch.randint(0, flat.numel(), (max_values - 2,), generator=self._gen)
            flat = torch.cat([flat[idx], flat.min()[None], flat.max()[None]])
        into.append(flat.float())

    def finish_observing(self, grid: int = 50) -> None:
        """Chooses the static range minimising the MSE over everything observed (all timesteps)."""
        parts = self._observed if self.spec.split else [self._observed]
        if not parts[0]:
            raise RuntimeError("static activation quantizer saw no calibration data")
        self._observed = None
        for i, seen in enumerate(parts):
            lo, hi = self._best_range(torch.cat(seen), grid)
            if self.spec.split:
                self.lo[i], self.hi[i] = lo, hi
            else:
                self.lo.fill_(lo)
                self.hi.fill_(hi)
        self.calibrated.fill_(True)

    def _best_range(self, x: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo0, hi0 = x.min(), x.max()
        best, best_err = (lo0, hi0), float("inf")
        for r in torch.linspace(1.0, 0.3, grid):
            lo, hi = lo0 * r, hi0 * r
            err = float((fake_quant(x, lo, hi, self.spec.bits) - x).pow(2).mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best

    def learnable(self, on: bool = True) -> list[nn.Parameter]:
        """on: the range becomes two trainable parameters (returned) used with LSQ gradients;
        off: the learned values are written back into the buffers that are saved."""
        if on:
            self._learned = (nn.Parameter(self.lo.clone()), nn.Parameter(self.hi.clone()))
            return list(self._learned)
        if self._learned is not None:
            with torch.no_grad():
                lo, hi = self._learned
                self.lo.copy_(torch.minimum(lo, hi))
                self.hi.copy_(torch.maximum(lo, hi))
        self._learned = None
        return []

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
        lo, hi = self._learned if self._learned is not None else (self.lo, self.hi)
        quant = fake_quant_lsq if self._learned is not None else fake_quant
        if not self.spec.split:
            return quant(x, lo, hi, self.spec.bits)
        a, b = self._parts(x)
        return torch.cat([quant(a, lo[0], hi[0], self.spec.bits), quant(b, lo[1], hi[1], self.spec.bits)],
                         dim=self.channel_dim % x.dim())
