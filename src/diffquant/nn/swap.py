"""Finding quantizable layers in any nn.Module (diffusers models included) and swapping them."""

from __future__ import annotations

import torch.nn as nn


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear and nn.Conv2d, by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def io_layer_names(model: nn.Module) -> set[str]:
    """The first and the last weight layer (the input stem and the output projection): the layers
    that PTQ of diffusion models conventionally keeps at 8 bits."""
    names = list(quantizable_layers(model))
    known = {"conv_in", "conv_out", "pos_embed.proj", "proj_out_2"}
    found = {n for n in names if n in known}
    if found:
        return found
    return {names[0], names[-1]} if names else set()
