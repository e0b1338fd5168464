"""Reference AQ products: dequantize the whole weight (one embedding_bag) then torch's dense op.

Every fast path is tested against these; they are also the fallback when no fast path applies."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffquant.formats.additive import dequantize_additive


def dequant_linear(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    w = dequantize_additive(codes.long(), codebooks.float(), scale.float())
    return F.linear(x, w, bias)


def dequant_conv2d(x: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                   bias: torch.Tensor | None, weight_shape: tuple[int, ...], stride, padding, dilation) -> torch.Tensor:
    w = dequantize_additive(codes.long(), codebooks.float(), scale.float()).reshape(weight_shape)
    return F.conv2d(x, w, bias, stride, padding, dilation)
