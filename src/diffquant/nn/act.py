"""Activation quantizers (fake-quantization of a layer's input).

static  one asymmetric range per tensor, calibrated over the inputs seen at many timesteps of the
        FP sampling trajectory (timestep-aware calibration); the range is chosen by an MSE search
        over clipping ratios of the observed min/max, so rare outliers do not waste the grid.
timestep
        static, with one range per calibrated denoising step: a table of ranges fitted to each step's
        recorded inputs (the same MSE search), looked up at run time by the nearest calibrated
        timestep. Diffusion activations change range along the trajectory (a DiT's adaLN-modulated
        inputs most of all), so one range for every step is either too wide late or clips early.
        The model's timestep reaches the quantizers through a `TimestepClock`, set by a forward
        pre-hook on the model (`attach_clock`); calling a submodule directly uses the last
        timestep the whole model saw.
dynamic per-token asymmetric min-max computed at run time (a token is a row of a linear layer's
        input, or a pixel's channel vector for a convolution).

`split` > 0 (static and timestep) gives channels [0, split) and [split, C) their own ranges: Q-Diffusion's
split quantization of the U-Net's skip concatenations, whose two halves (the decoder's features and
the encoder's skip) have very different scales. During reconstruction the ranges are learned
(LSQ-style: `learnable()` makes them parameters with straight-through rounding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class ActSpec:
    bits: int = 8
    mode: str = "static"  # "static" (per tensor), "timestep" (per tensor and step) or "dynamic" (per token)
    split: int = 0  # static / timestep: > 0 gives channels [0, split) and [split, C) separate ranges
    steps: int = 0  # timestep: the table's length, set by calibration (0 before it)

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"activation bits must be in 2..16, got {self.bits}")
        if self.mode not in MODES:
            raise ValueError(f"activation mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.split < 0 or (self.split and self.mode == "dynamic"):
            raise ValueError(f"split must be >= 0 and needs a calibrated mode (static or timestep), "
                             f"got split={self.split}, mode={self.mode!r}")
        if self.steps < 0 or (self.steps and self.mode != "timestep"):
            raise ValueError(f"steps (a range table's length) must be >= 0 and needs mode 'timestep', "
                             f"got steps={self.steps}, mode={self.mode!r}")

    @property
    def needs_calibration(self) -> bool:
        """Whether this mode fits ranges to calibration data (static and timestep do; dynamic does not)."""
        return self.mode != "dynamic"


MODES = ("static", "timestep", "dynamic")


class TimestepClock:
    """The timestep of the model call in progress, shared by a model's timestep quantizers."""

    def __init__(self):
        self.t: torch.Tensor | None = None


class _ClockHook:
    """Forward pre-hook on the model: records its timestep argument (the second positional argument
    or `timestep=`). A class, not a closure, so that `copy.deepcopy(model)` gives the copy its own clock."""

    def __init__(self, clock: TimestepClock):
        self.clock = clock

    def __call__(self, _module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timestep", kwargs.get("t"))
        if t is None:
            raise ValueError("a model with timestep-wise activation ranges was called without a timestep; "
                             "call it as model(x, t, ...) or model(x, timestep=t, ...)")
        self.clock.t = torch.as_tensor(t).detach().reshape(-1)


def attach_clock(model: nn.Module) -> TimestepClock | None:
    """Connects the model's timestep quantizers to its timestep (idempotent); None if it has none."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.spec.mode == "timestep"]
    if not quantizers:
        return None
    clock = getattr(model, "dq_clock", None)
    if clock is None:
        clock = TimestepClock()
        model.dq_clock = clock
        model.register_forward_pre_hook(_ClockHook(clock), with_kwargs=True)
    for q in quantizers:
        q.clock = clock
    return clock


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
        rows = (max(1, spec.steps),) if spec.mode == "timestep" else ()
        shape = rows + ((2,) if spec.split else ())
        self.register_buffer("lo", torch.zeros(shape))
        self.register_buffer("hi", torch.zeros(shape))
        if spec.mode == "timestep":  # the timestep each row of the table was fitted at
            self.register_buffer("ts", torch.zeros(rows))
        self.register_buffer("calibrated", torch.tensor(False))
        self.clock: TimestepClock | None = None
        self._observed: dict[int, list] | None = None
        self._learned: tuple[nn.Parameter, nn.Parameter] | None = None

    def extra_repr(self) -> str:
        steps = f", steps={self.spec.steps}" if self.spec.mode == "timestep" else ""
        return f"bits={self.spec.bits}, mode={self.spec.mode}{steps}"

    def start_observing(self, seed: int = 0) -> None:
        self._observed = {}  # step (0 unless timestep mode) -> one list per part
        self._gen = torch.Generator().manual_seed(seed)  # subsampling is repeatable: same ranges every run

    def _parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.spec.split:
            return [x]
        dim = self.channel_dim % x.dim()
        if x.shape[dim] <= self.spec.split:
            raise ValueError(f"split activation quantizer at channel {self.spec.split} got an input with "
                             f"{x.shape[dim]} channels; the split must fall inside the input")
        return [x.narrow(dim, 0, self.spec.split), x.narrow(dim, self.spec.split, x.shape[dim] - self.spec.split)]

    def observe(self, x: torch.Tensor, step: int = 0, max_values: int = 65536) -> None:
        """Records x; a timestep quantizer fits one range per `step` (the denoising step index)."""
        key = step if self.spec.mode == "timestep" else 0
        parts = self._parts(x)
        into = self._observed.setdefault(key, [[] for _ in parts])
        for part, seen in zip(parts, into, strict=True):
            self._observe_one(part, max_values, seen)

    def _observe_one(self, x: torch.Tensor, max_values: int, into: list) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() > max_values:  # keep the extremes plus a uniform subsample
            idx = torch.randint(0, flat.numel(), (max_values - 2,), generator=self._gen)
            flat = torch.cat([flat[idx], flat.min()[None], flat.max()[None]])
        into.append(flat.float())

    def finish_observing(self, timesteps: list[int] | None = None, grid: int = 50) -> None:
        """Chooses the range minimising the MSE over everything observed: over all timesteps
        (static), or per observed step (timestep; `timesteps[step]` is that step's timestep value)."""
        observed, self._observed = self._observed, None
        if not observed:
            raise RuntimeError("activation quantizer saw no calibration data")
        if self.spec.mode != "timestep":
            for i, seen in enumerate(observed[0]):
                idx = (i,) if self.spec.split else ()
                self.lo[idx], self.hi[idx] = self._best_range(torch.cat(seen), grid)
            self.calibrated.fill_(True)
            return
        steps = sorted(observed)
        if timesteps is None or max(steps) >= len(timesteps):
            raise ValueError(f"timestep activation ranges need each observed step's timestep value: "
                             f"got {None if timesteps is None else len(timesteps)} values for steps up to "
                             f"{max(steps)}. Fix: pass calibration data from diffquant.calibrate.collect")
        self.spec = dataclasses.replace(self.spec, steps=len(steps))
        shape = (len(steps),) + ((2,) if self.spec.split else ())
        self.lo, self.hi = torch.zeros(shape), torch.zeros(shape)
        self.ts = torch.tensor([float(timesteps[s]) for s in steps])
        for row, s in enumerate(steps):
            for i, seen in enumerate(observed[s]):
                idx = (row, i) if self.spec.split else (row,)
                self.lo[idx], self.hi[idx] = self._best_range(torch.cat(seen), grid)
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

    def _rows(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Timestep mode: the table rows of the current call's timestep (nearest calibrated one),
        one per batch item if the items' timesteps differ."""
        t = self.clock.t if self.clock is not None else None
        if t is None:
            raise RuntimeError("timestep activation quantizer does not know the timestep. Fix: call the whole "
                               "model (model(x, t, ...)) after diffquant.nn.act.attach_clock(model); "
                               "quantize_ and load do this")
        row = (t.to(self.ts.device, self.ts.dtype)[:, None] - self.ts[None]).abs().argmin(1)
        if bool((row == row[0]).all()):
            return lo[row[0]], hi[row[0]]
        if x.shape[0] != len(row):
            raise RuntimeError(f"timestep activation quantizer: {len(row)} timesteps for an input of batch "
                               f"{x.shape[0]}; it needs one timestep per batch item")
        view = (len(row),) + (1,) * (x.dim() - 1)
        if self.spec.split:  # (B, 2): keep the part index last, broadcast over the rest
            return lo[row], hi[row]
        return lo[row].view(view), hi[row].view(view)

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
        if self.spec.mode == "timestep":
            lo, hi = self._rows(x, lo, hi)
        quant = fake_quant_lsq if self._learned is not None else fake_quant
        if not self.spec.split:
            return quant(x, lo, hi, self.spec.bits)
        a, b = self._parts(x)
        return torch.cat([quant(a, self._part(lo, 0, a), self._part(hi, 0, a), self.spec.bits),
                          quant(b, self._part(lo, 1, b), self._part(hi, 1, b), self.spec.bits)],
                         dim=self.channel_dim % x.dim())

    @staticmethod
    def _part(r: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """Part i's range: a scalar, or one per batch item shaped to broadcast over x."""
        r = r[..., i]
        return r.view((len(r),) + (1,) * (x.dim() - 1)) if r.dim() else r
