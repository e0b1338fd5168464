"""`quantize_`: swap a model's Linear / Conv2d layers for quantized ones, in place."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from diffquant.calibration.collect import CalibrationData
from diffquant.config import AQConfig, QuantConfig, WeightConfig
from diffquant.formats import AdditiveWeight, KMeansSpec, KMeansWeight, UniformWeight
from diffquant.formats.base import QuantizedWeight
from diffquant.io_utils import atomic_path
from diffquant.methods.aquatic import AQSearch, gram, quantize_layer
from diffquant.methods.recon import skip_splits
from diffquant.nn.act import attach_clock
from diffquant.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from diffquant.nn.swap import io_layer_names, quantizable_layers, set_module


def quantize_weight(weight, spec, name: str = "") -> QuantizedWeight:
    if isinstance(spec, KMeansSpec):
        return KMeansWeight.quantize(weight, spec, name)
    return UniformWeight.quantize(weight, spec, name)


def needs_calibration(config: QuantConfig | AQConfig) -> bool:
    """Whether quantizing with `config` needs calibration data (static or timestep activations, or AQ weights)."""
    if isinstance(config, AQConfig):
        return True
    calibrated_act = config.act is not None and config.act.needs_calibration
    return calibrated_act or config.weight.method == "aq" or any(w.method == "aq" for w in config.layers.values())


def quantized_layers(model: nn.Module) -> dict[str, QuantLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantize_(model: nn.Module, config: QuantConfig | AQConfig, calib: CalibrationData | None = None,
              progress: bool = False, search: AQSearch | None = None, resume_dir: str | Path | None = None,
              scheduler=None) -> nn.Module:
    """Quantizes `model` in place with `config` and returns it.

    Static activation quantizers and additive (AQ) weights need `calib` (from
    `diffquant.calibrate.collect` on the FP model): activation ranges are fitted to the recorded
    inputs of every timestep, and AQ minimises each layer's output error on them. With `resume_dir`,
    every finished AQ layer is written there, and a second call picks up where the first stopped.
    A recipe with `finetune` (SeMI-PV) also needs the model's `scheduler`: the FP model, kept as the
    teacher, samples its own training trajectories with it."""
    if isinstance(config, AQConfig):
        config = config.to_quant_config()
    if quantized_layers(model):
        raise ValueError("model is already quantized; load a fresh full-precision copy to quantize again")
    io = io_layer_names(model)
    layers = {k: v for k, v in quantizable_layers(model).items() if config.selects(k)}
    if not layers:
        raise ValueError(f"recipe {config.name!r} selects no layer "
                         f"(include={config.include}, exclude={config.exclude})")
    needs_act_calib = config.act is not None and config.act.needs_calibration
    _check_act_mode(config)
    uses_aq = any(config.weight_for(n, io).method == "aq" for n in layers)
    if (needs_act_calib or uses_aq) and calib is None:
        why = "additive (AQ) weights" if uses_aq else "static activation quantization"
        raise ValueError(
            f"recipe {config.name!r} uses {why}, which needs calibration data. "
            "Fix: quantize_(model, config, calib=diffquant.calibrate.collect(model, scheduler))."
        )
    if uses_aq and not config.laq:
        _check_aq_budget(config, layers, io)
    if config.laq and uses_aq:
        if scheduler is None:
            raise ValueError(f"recipe {config.name!r} allocates bits per layer (LAQ) from the model's sensitivity "
                             "on its own sampling trajectory. "
                             "Fix: quantize_(model, config, calib=calib, scheduler=scheduler).")
        config, laq_log = laq_config(model, config, calib, scheduler, layers, io, progress)
    else:
        laq_log = None
    if config.finetune is not None and scheduler is None:
        raise ValueError(f"recipe {config.name!r} fine-tunes with SeMI-PV, whose teacher samples with the model's "
                         "scheduler. Fix: quantize_(model, config, calib=calib, scheduler=scheduler).")
    if config.recon is not None and scheduler is None:
        raise ValueError(f"recipe {config.name!r} reconstructs against the FP model's own sampling trajectories. "
                         "Fix: quantize_(model, config, calib=calib, scheduler=scheduler).")
    teacher = copy.deepcopy(model).eval() if config.finetune is not None or config.recon is not None else None
    splits = skip_splits(model) if config.split_skips else {}
    search = search or AQSearch()
    log: dict[str, dict] = {}
    bar = tqdm(layers.items(), desc=f"quantize {config.name}", disable=not progress)
    for name, mod in bar:
        wc = config.weight_for(name, io)
        if wc.method == "fp":
            continue
        bar.set_postfix_str(name)
        qw, entry = quantize_layer_weight(name, mod, wc, calib, search, resume_dir)
        if entry is not None:
            log[name] = entry
        act = config.act_for(name)
        if act is not None and act.needs_calibration and name in splits:
            act = dataclasses.replace(act, split=splits[name])
        new = (QuantLinear(qw, mod.bias, act) if isinstance(mod, nn.Linear)
               else QuantConv2d(qw, mod.bias, mod, act))
        set_module(model, name, new)
    if needs_act_calib:
        calibrate_activations(model, calib)
    attach_clock(model)
    if teacher is not None and config.finetune is not None:
        from diffquant.methods.pv_tuning import pv_tune

        state = Path(resume_dir) / f"finetune-{config.name}.pt" if resume_dir else None
        ft = pv_tune(model, teacher, scheduler, config.finetune, progress=progress, state_file=state)
        model.dq_finetune_log = {k: v for k, v in ft.items() if k != "loss"}
    if config.recon is not None:
        from diffquant.methods.accuquant import reconstruct

        model.dq_recon_log = reconstruct(model, teacher, scheduler, config.recon, progress=progress,
                                         resume_dir=resume_dir, name=config.name)
    model.dq_recipe = config
    if laq_log:
        model.dq_laq_log = laq_log
    if log:
        model.dq_aq_log = log
    return model


def laq_config(model: nn.Module, config: QuantConfig, calib: CalibrationData, scheduler, layers: dict,
               io: set[str], progress: bool = False) -> tuple[QuantConfig, dict]:
    """The recipe with LAQ's per-layer settings written in (exact layer names before the patterns),
    and the allocation's log (budget, effective bits and measured sensitivity of every layer)."""
    from diffquant.methods.laq import allocate, sensitivity, trajectory_probe

    aq = {n: m for n, m in layers.items() if config.weight_for(n, io).method == "aq"}
    target = config.weight.target_bits or max(config.weight_for(n, io).target_bits for n in aq)
    if not target:
        raise ValueError("LAQ needs an effective-bit target (WeightConfig(method='aq', target_bits=...))")
    fixed_bits = fixed_weights = 0
    for n, m in layers.items():
        wc = config.weight_for(n, io)
        if n in aq or wc.method == "fp":
            continue
        qw = quantize_weight(m.weight, wc.to_spec(), n)
        fixed_bits += qw.stored_bits()
        fixed_weights += qw.numel
    shapes = {n: tuple(m.weight.shape) for n, m in aq.items()}
    unit = {n: {"sens": 1.0, "layer_error": 1.0} for n in aq}
    allocate(shapes, unit, target, fixed_bits, fixed_weights)  # an impossible target fails here, before any work
    sens = sensitivity(model, aq, trajectory_probe(model, scheduler), calib.inputs, progress=progress)
    wcs = {n: config.weight_for(n, io) for n in aq}
    kernel_aware = all(wc.kernel_aware for wc in wcs.values())
    alloc = allocate(shapes, sens, target, fixed_bits, fixed_weights, kernel_aware)
    per_layer = {n: (dataclasses.replace(wcs[n], target_bits=o.budget) if o.budget else WeightConfig("uniform", 8))
                 for n, o in alloc.items()}
    new = dataclasses.replace(config, layers={**per_layer, **config.layers}, laq=False)
    log = {n: {"budget": o.budget, "effective_bits": round(o.eff_bits, 4),
               **{k: float(f"{v:.4g}") for k, v in sens[n].items()}} for n, o in alloc.items()}
    return new, log


def _check_act_mode(config: QuantConfig) -> None:
    if config.recon is not None and config.act is not None and config.act.mode == "timestep":
        raise ValueError(f"recipe {config.name!r}: block reconstruction learns one activation range per layer, "
                         "and timestep-wise ranges (act mode 'timestep') are not supported with it. "
                         "Fix: use act mode 'static' with recon, or drop recon.")


def check_budget(model: nn.Module, config: QuantConfig | AQConfig) -> None:
    """Fails at once, before any calibration, when an AQ recipe's bit budget cannot be met (or its
    activation mode cannot go with its reconstruction)."""
    if isinstance(config, AQConfig):
        config = config.to_quant_config()
    _check_act_mode(config)
    io = io_layer_names(model)
    layers = {k: v for k, v in quantizable_layers(model).items() if config.selects(k)}
    aq = {n: m for n, m in layers.items() if config.weight_for(n, io).method == "aq"}
    if not aq:
        return
    if not config.laq:
        _check_aq_budget(config, layers, io)
        return
    from diffquant.methods.laq import allocate

    target = config.weight.target_bits or max(config.weight_for(n, io).target_bits for n in aq)
    fixed = [quantize_weight(m.weight, config.weight_for(n, io).to_spec(), n) for n, m in layers.items()
             if n not in aq and config.weight_for(n, io).method != "fp"]
    allocate({n: tuple(m.weight.shape) for n, m in aq.items()}, {n: {"sens": 1.0, "layer_error": 1.0} for n in aq},
             target, sum(q.stored_bits() for q in fixed), sum(q.numel for q in fixed))


def _check_aq_budget(config: QuantConfig, layers: dict, io: set[str]) -> None:
    """Tiny layers may fall back to uniform; a budget that no layer can meet is an error."""
    aq = {n: m for n, m in layers.items() if config.weight_for(n, io).method == "aq"}
    misfit = sum(m.weight.numel() for n, m in aq.items() if aq_spec_for(config.weight_for(n, io), m) is None)
    total = sum(m.weight.numel() for m in aq.values())
    if misfit == total:
        raise ValueError(f"recipe {config.name!r}: no additive setting fits its effective-bit budget in any "
                         "layer (codebooks and scales alone cost more). Fix: a higher target_bits.")


def quantize_layer_weight(name: str, mod: nn.Module, wc: WeightConfig, calib: CalibrationData | None = None,
                          search: AQSearch | None = None, resume_dir: str | Path | None = None,
                          ) -> tuple[QuantizedWeight, dict | None]:
    """One layer's weight under `wc`, and its AQ log entry (None for uniform / k-means). The one
    place that decides how a layer is stored, so that a recipe and Qua²SeDiMo's precomputed search
    space (which quantizes layers one by one) produce the same weights."""
    if wc.method == "aq" and aq_spec_for(wc, mod) is None:
        # a layer so small that codebooks cost more than its budget: uniform at the budget, rounded up
        wc = WeightConfig("uniform", bits=max(2, math.ceil(wc.target_bits)), clip="lp")
        return (quantize_weight(mod.weight, wc.to_spec(), name),
                {"fallback": f"uniform w{wc.bits} (no additive setting fits the budget)"})
    if wc.method == "aq":
        if calib is None:
            raise ValueError(f"layer {name!r} is additive (AQ), which needs calibration data. "
                             "Fix: pass calib=diffquant.calibrate.collect(model, scheduler).")
        return _aq_layer(name, mod, wc, calib, search or AQSearch(), resume_dir)
    return quantize_weight(mod.weight, wc.to_spec(), name), None


def aq_spec_for(wc: WeightConfig, mod: nn.Module):
    """The additive setting (an `AdditiveSpec`) layer `mod` gets under `wc`, or None when no setting
    fits its effective-bit budget (the layer then falls back to uniform). The one rule shared by
    `quantize_` and the cached search space, so a cached option is rebuilt exactly when it differs."""
    try:
        return wc.aq_spec(tuple(mod.weight.shape))
    except ValueError:
        if not wc.target_bits:  # a fixed (M, B, g) that cannot apply is the user's error, said as is
            raise
        return None


def _aq_layer(name: str, mod: nn.Module, wc: WeightConfig, calib: CalibrationData, search: AQSearch,
              resume_dir: str | Path | None) -> tuple[AdditiveWeight, dict]:
    spec = wc.aq_spec(tuple(mod.weight.shape))
    # one file per layer and setting, so recipes that give a layer different settings keep each other's work
    done = Path(resume_dir) / f"{name}.{spec.label}.safetensors" if resume_dir else None
    if done is not None and done.exists():
        from safetensors import safe_open

        with safe_open(str(done), "pt") as f:
            info = json.loads(f.metadata()["info"])
        same = (info["weight"]["spec"] == spec.__dict__ and info["weight"]["shape"] == list(mod.weight.shape)
                and info.get("search") == search.__dict__)
        if same:
            return AdditiveWeight.from_packed(load_file(str(done)), info["weight"]), {**info["log"], "resumed": True}
    if name not in calib:
        raise ValueError(f"calibration data has no inputs for layer {name!r}; collect it on this model's FP copy")
    h = gram(mod, calib.inputs[name], search.damp)
    res = quantize_layer(mod.weight, h, spec, search, name)
    entry = {"spec": spec.__dict__, "effective_bits": round(res.weight.effective_bits(), 4),
             "rel_error_init": res.rel_error_init, "rel_error": res.rel_error, "rounds": res.rounds,
             "seconds": round(res.seconds, 2)}
    if done is not None:
        done.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(done) as tmp:
            save_file(res.weight.packed_state(), str(tmp),
                      metadata={"info": json.dumps({"weight": res.weight.meta(), "log": entry,
                                                    "search": search.__dict__})})
    return res.weight, entry


def calibrate_activations(model: nn.Module, calib: CalibrationData) -> None:
    """Fits every calibrated activation quantizer to the layer's recorded inputs: one range over all
    timesteps (static) or one per recorded step (timestep)."""
    for name, mod in quantized_layers(model).items():
        if mod.act is None or not mod.act.spec.needs_calibration:
            continue
        if name not in calib:
            raise ValueError(f"calibration data has no inputs for layer {name!r}; collect it on this model's FP copy")
        mod.act.start_observing()
        for x, step in zip(calib.inputs[name], calib.steps[name], strict=True):
            mod.act.observe(x, step)
        mod.act.finish_observing(calib.timesteps or None)
