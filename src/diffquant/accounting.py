"""Effective bits and checkpoint size (BENCHMARK.md): every stored bit of the quantized layers
(codes, codebooks, scales, zero points, centroids) over their number of weights."""

from __future__ import annotations

import torch.nn as nn

from diffquant.nn.layers import QuantLayer
from diffquant.nn.swap import quantizable_layers


def bit_report(model: nn.Module) -> dict:
    q_bits = q_weights = 0
    per_layer = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            b = mod.qweight.stored_bits()
            q_bits += b
            q_weights += mod.qweight.numel
            per_layer[name] = round(b / mod.qweight.numel, 4)
    fp_layers = list(quantizable_layers(model))
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.qweight.numel for m in model.modules() if isinstance(m, QuantLayer))
    return {
        "effective_bits": q_bits / q_weights if q_weights else 32.0,
        "quantized_weights": q_weights,
        "quantized_layers": len(per_layer),
        "unquantized_weight_layers": fp_layers,
        "total_parameters": params,
        "per_layer_bits": per_layer,
    }
