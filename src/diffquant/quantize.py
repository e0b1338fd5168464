"""`quantize_`: swap a model's Linear / Conv2d layers for quantized ones, in place."""

from __future__ import annotations

import torch.nn as nn
from tqdm import tqdm

from diffquant.calibration.collect import CalibrationData
from diffquant.config import QuantConfig
from diffquant.formats import KMeansSpec, KMeansWeight, UniformWeight
from diffquant.formats.base import QuantizedWeight
from diffquant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from diffquant.nn.swap import io_layer_names, quantizable_layers, set_module


def quantize_weight(weight, spec, name: str = "") -> QuantizedWeight:
    if isinstance(spec, KMeansSpec):
        return KMeansWeight.quantize(weight, spec, name)
    return UniformWeight.quantize(weight, spec, name)


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantize_(model: nn.Module, config: QuantConfig, calib: CalibrationData | None = None,
              progress: bool = False) -> nn.Module:
    """Quantizes `model` in place with `config` and returns it.

    Static activation quantizers need `calib` (from `diffquant.calibrate.collect` on the FP model);
    their ranges are fitted to the recorded inputs of every timestep."""
    if quantized_layers(model):
        raise ValueError("model is already quantized; load a fresh full-precision copy to quantize again")
    needs_calib = config.act is not None and config.act.mode == "static"
    if needs_calib and calib is None:
        raise ValueError(
            f"recipe {config.name!r} uses static activation quantization, which needs calibration data. "
            "Fix: quantize_(model, config, calib=diffquant.calibrate.collect(model, scheduler))."
        )
    io = io_layer_names(model)
    layers = {k: v for k, v in quantizable_layers(model).items() if config.selects(k)}
    if not layers:
        raise ValueError(f"recipe {config.name!r} selects no layer "
                         f"(include={config.include}, exclude={config.exclude})")
    for name, mod in tqdm(layers.items(), desc=f"quantize {config.name}", disable=not progress):
        wc = config.weight_for(name, io)
        if wc.method == "fp":
            continue
        qw = quantize_weight(mod.weight, wc.to_spec(), name)
        act = config.act_for(name)
        new = (QuantLinear(qw, mod.bias, act) if isinstance(mod, nn.Linear)
               else QuantConv2d(qw, mod.bias, mod, act))
        set_module(model, name, new)
    if needs_calib:
        calibrate_activations(model, calib)
    model.dq_recipe = config
    return model


def calibrate_activations(model: nn.Module, calib: CalibrationData) -> None:
    """Fits every static activation quantizer to the layer's recorded inputs over all timesteps."""
    for name, mod in quantized_layers(model).items():
        if mod.act is None or mod.act.spec.mode != "static":
            continue
        if name not in calib:
            raise ValueError(f"calibration data has no inputs for layer {name!r}; collect it on this model's FP copy")
        mod.act.start_observing()
        for x in calib.inputs[name]:
            mod.act.observe(x)
        mod.act.finish_observing()
