"""What reconstruction learns, and where: trainable views of quantized layers, and the units.

Both calibration objectives (`accuquant.py`: Q-Diffusion's per-step block reconstruction and
AccuQuant's multi-step one) learn exactly these parameters, so that comparing them isolates the
objective:

- **Uniform weights: AdaRound.** Each weight is floor(w / s) + h(V) on its fixed grid (scale s and
  zero point of the round-to-nearest quantizer), h the rectified sigmoid; V starts where h equals
  the fractional part (the soft weight starts at w; or, with `from_codes`, at the layer's current
  rounding, so that a second objective refines a first one's solution), a regulariser sum(1 - |2h - 1|^beta) with beta
  annealed 20 -> 2 pushes every h to 0 or 1, and `finish()` stores the hard rounding as the layer's
  integer codes: the saved checkpoint holds real low-bit weights.
- **Additive (AQ) weights:** the codebooks and the per-output scales (codes fixed).
- **Static activations: LSQ.** Each input quantizer's range (lo, hi; two of each when split) is a
  parameter with straight-through rounding (`ActQuantizer.learnable`).

Units are the denoiser's top-level blocks in forward order (`blocks`), then one unit "rest" for the
quantized layers outside any block (input / output convolutions, embeddings).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diffquant.formats.additive import AdditiveWeight, dequantize_additive
from diffquant.formats.uniform import UniformWeight
from diffquant.nn.layers import QuantLayer

ZETA, GAMMA = 1.1, -0.1  # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly


def blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Top-level blocks in forward order: down blocks, the mid block, up blocks (U-Net), or the
    transformer blocks (DiT)."""
    out = {}
    for key in ("down_blocks", "transformer_blocks"):
        for i, b in enumerate(getattr(model, key, None) or []):
            out[f"{key}.{i}"] = b
    if getattr(model, "mid_block", None) is not None:
        out["mid_block"] = model.mid_block
    for i, b in enumerate(getattr(model, "up_blocks", None) or []):
        out[f"up_blocks.{i}"] = b
    return out


def unit_layers(model: nn.Module) -> dict[str, dict[str, QuantLayer]]:
    """unit name -> its quantized layers; every quantized layer belongs to exactly one unit."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}
    units: dict[str, dict[str, QuantLayer]] = {}
    for b in blocks(model):
        units[b] = {n: m for n, m in layers.items() if n.startswith(b + ".")}
    taken = {n for u in units.values() for n in u}
    units["rest"] = {n: m for n, m in layers.items() if n not in taken}
    return {k: v for k, v in units.items() if v}


def skip_splits(model: nn.Module) -> dict[str, int]:
    """Layers of a diffusers U-Net's up path whose input is cat(decoder features, encoder skip):
    each up resnet's conv1 and conv_shortcut, with the channel where the skip begins."""
    ups = getattr(model, "up_blocks", None)
    if not ups or getattr(model, "mid_block", None) is None:
        return {}
    prev = model.config.block_out_channels[-1]  # the mid block's width feeds the first up block
    out = {}
    for i, up in enumerate(ups):
        for j, res in enumerate(up.resnets):
            if res.conv1.in_channels > prev:
                out[f"up_blocks.{i}.resnets.{j}.conv1"] = prev
                if getattr(res, "conv_shortcut", None) is not None:
                    out[f"up_blocks.{i}.resnets.{j}.conv_shortcut"] = prev
            prev = res.conv1.out_channels
    return out


class _AdaRound:
    """A uniform layer's trainable rounding: soft weight s * (clamp(floor(w/s) + h(V) + z) - z)."""

    def __init__(self, mod: QuantLayer, fp_weight: torch.Tensor, from_codes: bool = False):
        qw: UniformWeight = mod.qweight
        self.mod, self.qw = mod, qw
        out, groups = qw.scale.shape
        w = fp_weight.detach().float().reshape(out, groups, -1)
        self.s = qw.scale.float()[..., None]
        self.z = qw.zero.float()[..., None]
        self.levels = (1 << qw.spec.bits) - 1
        self.floor = torch.floor(w / self.s)
        rest = (w / self.s - self.floor).clamp(0.01, 0.99)
        if from_codes:  # h starts at the stored rounding (0.01 / 0.99: V = -/+2.3, Adam can still flip it)
            offset = qw.codes.float().reshape(out, groups, -1) - self.z - self.floor
            rest = torch.where(offset >= 0.5, 0.99, 0.01)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def params(self) -> list[nn.Parameter]:
        return [self.v]

    def refresh(self) -> None:
        q = torch.clamp(self.floor + self.h() + self.z, 0, self.levels)
        self.mod.weight = ((q - self.z) * self.s).reshape(self.qw.shape)

    def reg(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def finish(self) -> None:
        q = torch.clamp(self.floor + (self.v.detach() >= 0).float() + self.z, 0, self.levels)
        codes = q.reshape(self.qw.codes.shape).to(self.qw.codes.dtype)
        self.mod.set_qweight(UniformWeight(codes, self.qw.scale, self.qw.zero, self.qw.shape, self.qw.spec))


class _AQContinuous:
    """An additive layer's codebooks and log-scales as parameters (codes fixed)."""

    def __init__(self, mod: QuantLayer):
        qw: AdditiveWeight = mod.qweight
        self.mod, self.qw = mod, qw
        self.books = nn.Parameter(qw.codebooks.float().clone())
        self.log_scale = nn.Parameter(qw.scale.float().log().clone())

    def params(self) -> list[nn.Parameter]:
        return [self.books, self.log_scale]

    def refresh(self) -> None:
        w = dequantize_additive(self.qw.codes, self.books, self.log_scale.exp())
        self.mod.weight = w.reshape(self.qw.shape)

    def reg(self, beta: float) -> torch.Tensor:
        return torch.zeros(())

    def finish(self) -> None:
        self.mod.set_qweight(AdditiveWeight(self.qw.codes, self.books.detach().half(),
                                            self.log_scale.detach().exp().half(), self.qw.shape, self.qw.spec))


class Trainable:
    """Everything one unit learns. `refresh()` before each forward puts the soft weights in place;
    `finish()` writes hard codes and learned ranges back into the layers."""

    def __init__(self, layers: dict[str, QuantLayer], fp_model: nn.Module, learn_acts: bool = True,
                 from_codes: bool = False):
        self.weights: list[_AdaRound | _AQContinuous] = []
        for name, mod in layers.items():
            if isinstance(mod.qweight, UniformWeight):
                self.weights.append(_AdaRound(mod, fp_model.get_submodule(name).weight, from_codes))
            elif isinstance(mod.qweight, AdditiveWeight):
                self.weights.append(_AQContinuous(mod))
        # (quantize_ refuses timestep-mode ranges with reconstruction: blocks run without the model's timestep)
        self.acts = [m.act for m in layers.values()
                     if learn_acts and m.act is not None and m.act.spec.mode == "static"]
        self.act_params = [p for a in self.acts for p in a.learnable(True)]
        self.round_params = [p for w in self.weights if isinstance(w, _AdaRound) for p in w.params()]
        self.aq_params = [p for w in self.weights if isinstance(w, _AQContinuous) for p in w.params()]
        self.weight_params = self.round_params + self.aq_params

    def refresh(self) -> None:
        for w in self.weights:
            w.refresh()

    def reg(self, beta: float) -> torch.Tensor:
        """AdaRound's rounding regulariser, averaged over the unit's rounded weights (0 when every
        rounding is decided), so that its weight does not depend on the unit's size."""
        n = sum(w.v.numel() for w in self.weights if isinstance(w, _AdaRound))
        return sum((w.reg(beta) for w in self.weights), torch.zeros(())) / max(n, 1)

    def finish(self) -> None:
        with torch.no_grad():
            for w in self.weights:
                w.finish()
        for a in self.acts:
            a.learnable(False)
