"""Quantized drop-in replacements for nn.Linear and nn.Conv2d.

They hold the quantized weight (a `formats` object, the source of truth that is saved) and compute
with its dequantized fp32 copy, cached once: for uniform and k-means formats this is numerically
what a low-bit kernel computes, and it keeps sampling as fast as the FP model on the CPU.

Additive-codebook (AQ) layers run through `kernels.dispatch` whenever no gradient is wanted: the
lookup-table kernel on the CPU or the Triton one on a GPU where measured faster, the dense copy
otherwise. `free_dense()` drops the dense copy (memory of the codes only; the reference path then
dequantizes per call). Training (fine-tuning) always takes the dense, differentiable path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from diffquant.formats.base import QuantizedWeight
from diffquant.kernels import dispatch
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
        self._kstate = None

    def free_dense(self) -> None:
        """Drop the cached dense weight (AQ layers: the kernels read the codes)."""
        self.weight = None

    def dense_weight(self) -> torch.Tensor:
        return self.weight if self.weight is not None else self.qweight.dequantize()

    def _aq_impl(self, x: torch.Tensor, tokens: Callable[[], int]) -> str:
        """'dense' unless this is an AQ layer at inference and dispatch picks a kernel for the shape;
        `tokens()` is only counted for such layers (every other quantized layer calls this too)."""
        if self.qweight.format != "additive" or (torch.is_grad_enabled() and (
                x.requires_grad or (self.weight is not None and self.weight.requires_grad))):
            return "dense"
        spec, out = self.qweight.spec, self.qweight.shape[0]
        impl = dispatch.choose(x.device, tokens(), out, self.qweight.in_flat, spec.codebooks, 1 << spec.bits,
                               spec.group, dense_cached=self.weight is not None)
        return "dense" if impl == "reference" else impl

    def _kernel_state(self, device: torch.device, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codebooks, codes and scales in the layout `impl` reads, on `device`, prepared once: the C++
        lookup kernel wants the codes column-major, the Triton kernels row-major."""
        ks = getattr(self, "_kstate", None)
        if ks is None or ks[0] != impl or ks[1][0].device != device:
            from diffquant.kernels.cpu import cpu_layout, kernel_layout

            q = self.qweight
            layout = cpu_layout if impl == "lut" else kernel_layout
            ks = (impl, tuple(t.to(device) for t in layout(q.codes, q.codebooks, q.scale, q.spec.bits)))
            self._kstate = ks
        return ks[1]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.act is not None else x


class QuantLinear(QuantLayer):
    def __init__(self, qweight: QuantizedWeight, bias, act: ActSpec | None = None):
        super().__init__(qweight, bias, act, channel_dim=-1)
        self.out_features, self.in_features = qweight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        impl = self._aq_impl(x, lambda: x.numel() // max(1, x.shape[-1]))
        if impl == "dense":
            return F.linear(x, self.dense_weight(), self.bias)
        cb, codes, scale = self._kernel_state(x.device, impl)
        bias = None if self.bias is None else self.bias.float().contiguous()
        if impl == "lut":
            from diffquant.kernels.cpu import aq_linear
        else:
            from diffquant.kernels.triton_kernels import aq_linear
        return aq_linear(x, cb, codes, scale, bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.qweight.format}, {self.qweight.meta()['spec']}"


class QuantConv2d(QuantLayer):
    def __init__(self, qweight: QuantizedWeight, bias, conv: nn.Conv2d | dict, act: ActSpec | None = None):
        super().__init__(qweight, bias, act, channel_dim=1)
        geo = conv if isinstance(conv, dict) else conv_geometry(conv)
        self.stride, self.padding = tuple(geo["stride"]), geo["padding"]
        self.dilation, self.groups = tuple(geo["dilation"]), geo["groups"]
        self.padding = tuple(self.padding) if isinstance(self.padding, list) else self.padding

    def padding_pair(self) -> tuple[int, int] | None:
        """(rows, columns) of zero padding; None for 'same', (0, 0) for 'valid'."""
        if isinstance(self.padding, str):
            return (0, 0) if self.padding == "valid" else None
        return self.padding if isinstance(self.padding, tuple) else (self.padding, self.padding)

    def tokens(self, x: torch.Tensor) -> int:
        """Batch x output pixels: the token count the kernel benchmark and the thresholds measured from it
        give a convolution (its dense path is one product over the whole batch)."""
        pad, (kh, kw) = self.padding_pair(), self.qweight.shape[2:]
        if pad is None:  # 'same' (stride 1)
            return x.shape[0] * x.shape[-2] * x.shape[-1]
        ho = (x.shape[-2] + 2 * pad[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (x.shape[-1] + 2 * pad[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return x.shape[0] * max(ho, 0) * max(wo, 0)

    def geometry(self) -> dict:
        return {"stride": list(self.stride), "dilation": list(self.dilation), "groups": self.groups,
                "padding": list(self.padding) if isinstance(self.padding, tuple) else self.padding}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._input(x)
        impl = "dense" if self.groups != 1 or x.dim() != 4 else self._aq_impl(x, lambda: self.tokens(x))
        if impl == "lut" and not isinstance(self.padding, str):
            from diffquant.kernels.cpu import aq_conv2d

            cb, codes, scale = self._kernel_state(x.device, impl)
            bias = None if self.bias is None else self.bias.float().contiguous()
            pad = self.padding_pair()
            return aq_conv2d(x, cb, codes, scale, bias, tuple(self.qweight.shape[2:]), self.stride, pad,
                             self.dilation).to(x.dtype)
        if impl == "triton":  # GPU, codes only: rebuild the kernel weight in one Triton pass, then cuDNN
            from diffquant.kernels.triton_kernels import aq_dequantize

            cb, codes, scale = self._kernel_state(x.device, impl)
            w = aq_dequantize(cb, codes, scale).reshape(self.qweight.shape).to(x.dtype)
            return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        spec = self.qweight.meta()["spec"]
        return f"{tuple(self.qweight.shape)}, stride={self.stride}, {self.qweight.format}, {spec}"


def conv_geometry(conv: nn.Conv2d) -> dict:
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
    pad = conv.padding
    return {"stride": list(conv.stride), "dilation": list(conv.dilation), "groups": conv.groups,
            "padding": list(pad) if isinstance(pad, tuple) else pad}
