"""Packed save / load of quantized models: one safetensors file (bit-packed codes, fp16 scales and
centroids, fp32 for everything left unquantized) plus a JSON map that says how to rebuild each
layer. Loading rebuilds exactly the weights that were saved: no recomputation, bit for bit."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffquant.formats import FORMATS
from diffquant.io_utils import atomic_path
from diffquant.nn.act import ActSpec, attach_clock
from diffquant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from diffquant.nn.swap import set_module

WEIGHTS_FILE = "quantized.safetensors"


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, truncated or inconsistent with its map."""


def quant_map(model: nn.Module) -> dict:
    layers = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            entry = {"kind": "linear" if isinstance(mod, QuantLinear) else "conv2d",
                     "weight": mod.qweight.meta(), "bias": mod.bias is not None,
                     "act": mod.act.spec.__dict__ if mod.act is not None else None}
            if isinstance(mod, QuantConv2d):
                entry["conv"] = mod.geometry()
            layers[name] = entry
    return layers


def packed_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything to store: quantized layers' packed tensors under `<layer>.qweight.<key>`, and the
    model's remaining parameters and buffers (including activation ranges) under their own names."""
    tensors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            for k, v in mod.qweight.packed_state().items():
                tensors[f"{name}.qweight.{k}"] = v
    for k, v in model.state_dict().items():
        tensors[k] = v
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_quantized(model: nn.Module, path: Path) -> int:
    """Writes quantized.safetensors into folder `path` atomically; returns its size in bytes."""
    out = Path(path) / WEIGHTS_FILE
    with atomic_path(out) as tmp:
        save_file(packed_tensors(model), str(tmp), metadata={"format": "diffquant-packed-v1"})
    return out.stat().st_size


def load_quantized(path: Path, skeleton: nn.Module, qmeta: dict) -> nn.Module:
    """Rebuilds a quantized model on a freshly constructed architecture `skeleton`."""
    f = Path(path) / WEIGHTS_FILE
    if not f.exists():
        raise CheckpointError(f"{f} is missing. Fix: re-run `diffquant quantize` to write the folder again.")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{f} is truncated or corrupt ({e}). Fix: re-run `diffquant quantize` to write it again."
        ) from None
    for name, entry in qmeta["layers"].items():
        prefix = f"{name}.qweight."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        fmt = FORMATS.get(entry["weight"]["format"])
        if fmt is None:
            raise CheckpointError(f"layer {name}: unknown weight format {entry['weight']['format']!r}")
        try:
            qw = fmt.from_packed(state, entry["weight"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(
                f"{f}: layer {name} cannot be rebuilt ({e}); the file is truncated or corrupt.") from None
        act = ActSpec(**entry["act"]) if entry["act"] else None
        bias = torch.zeros(qw.shape[0]) if entry["bias"] else None
        mod = QuantLinear(qw, bias, act) if entry["kind"] == "linear" else QuantConv2d(qw, bias, entry["conv"], act)
        set_module(skeleton, name, mod)
    expected = set(skeleton.state_dict())
    rest = {k: v for k, v in tensors.items() if ".qweight." not in k}
    missing = expected - set(rest)
    if missing:
        raise CheckpointError(f"{f} lacks {len(missing)} tensors (e.g. {sorted(missing)[:3]}); it is truncated "
                              "or was written for another model. Fix: re-run `diffquant quantize`.")
    skeleton.load_state_dict(rest, strict=True)
    attach_clock(skeleton)  # timestep-wise activation ranges follow the model's timestep again
    return skeleton
