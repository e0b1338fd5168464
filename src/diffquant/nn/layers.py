"""Quantized drop-in replacements for nn.Linear and nn.Conv2d.

They hold the quantized weight (a `formats` object, the source of truth that is saved) and compute
with its dequantized fp32 copy, cached once: for uniform and k-means formats this is numerically
what a low-bit kernel computes, and it keeps sampling as fast as the FP model on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffquant.formats.base import QuantizedWeight
from diffquant.nn.act import ActQuantizer, ActSpec


class QuantLayer(nn.Module):
    """Shared logic: weight storage, the cached dequantized weight, the optional input quantizer."""

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None, act: ActSpec | None, channel_dim: int):
        super().__init__()
        self.qweight = qweight
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.register_buffer("weight", qweight.dequantize(), persistent=False)
        self.act = ActQuantizer(act, channel_dim) if act is not None else None

    def set_qweight(self, qweight: QuantizedWeight) -> None:
        self.qweight = qweight
        self.weight = qweight.dequantize()

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.act is not None else x


class QuantLinear(QuantLayer):
    def __init__(self, qweight: QuantizedWeight, bias, act: ActSpec | None = None):
        super().__init__(qweight, bias, act, channel_dim=-1)
        self.out_features, self.in_features = qweight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.qweight.format}, {self.qweight.meta()['spec']}"


class QuantConv2d(QuantLayer):
    def __init__(self, qweight: QuantizedWeight, bias, conv: nn.Conv2d | dict, act: ActSpec | None = None):
        super().__init__(qweight, bias, act, channel_dim=1)
        geo = conv if isinstance(conv, dict) else conv_geometry(conv)
        self.stride, self.padding = tuple(geo["stride"]), geo["padding"]
        self.dilation, self.groups = tuple(geo["dilation"]), geo["groups"]
        self.padding = tuple(self.padding) if isinstance(self.padding, list) else self.padding

    def geometry(self) -> dict:
        return {"stride": list(self.stride), "dilation": list(self.dilation), "groups": self.groups,
                "padding": list(self.padding) if isinstance(self.padding, tuple) else self.padding}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self._input(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        spec = self.qweight.meta()["spec"]
        return f"{tuple(self.qweight.shape)}, stride={self.stride}, {self.qweight.format}, {spec}"


def conv_geometry(conv: nn.Conv2d) -> dict:
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
    pad = conv.padding
    return {"stride": list(conv.stride), "dilation": list(conv.dilation), "groups": conv.groups,
            "padding": list(pad) if isinstance(pad, tuple) else pad}
