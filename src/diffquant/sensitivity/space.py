"""The search space: every weight layer's options (bits x method), precomputed once and cached.

A configuration maps each *unit* (a layer, or layers tied by design) to one option. Tied layers:
an attention's query, key and value projections read the same input and are quantized together
in Qua²SeDiMo's DiT experiments; diffquant ties them the same way in both zoo models (a documented
choice: `tied_units`). Options are the paper's methods at 2, 3 and 4 bits:

- `uaq`: per-output-channel asymmetric uniform with the clipping ratio chosen by an Lp search;
- `kmeans-c`: k-means with 2^b centroids per output channel;
- `kmeans-a`: one k-means over the whole tensor;

and, on request, AQUATIC-Diff's additive codebooks (`aq`, the layer's (M, B, g) chosen within b
effective bits, KAQ on k x k convolutions, no fine-tuning), which need calibration data.

Every option of every layer is quantized once (`SearchSpace.build`) and kept on disk, one file per
layer, so an interrupted build resumes and every later configuration is assembled by swapping
stored weights into one model (`apply`), with no re-quantization. Effective bits are exact: every
stored bit (codes, scales, zero points, centroids) over the number of weights.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from diffquant.config import QuantConfig, WeightConfig
from diffquant.formats.additive import AdditiveWeight
from diffquant.formats.base import QuantizedWeight
from diffquant.io_utils import atomic_path
from diffquant.nn.swap import quantizable_layers

PAPER_METHODS = ("uaq", "kmeans-c", "kmeans-a")
METHODS = (*PAPER_METHODS, "aq")
BITS = (2, 3, 4)


@dataclass(frozen=True, order=True)
class Option:
    method: str
    bits: int

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    @property
    def key(self) -> str:
        return f"{self.method}-{self.bits}"

    @classmethod
    def parse(cls, key: str) -> Option:
        method, _, bits = key.rpartition("-")
        if not bits.isdigit():
            raise ValueError(f"option keys look like 'uaq-3' or 'kmeans-c-4', got {key!r}")
        return cls(method, int(bits))

    def weight_config(self) -> WeightConfig:
        if self.method == "aq":
            return WeightConfig("aq", target_bits=float(self.bits))
        if self.method == "uaq":
            return WeightConfig("uniform", self.bits, clip="lp")
        return WeightConfig("kmeans", self.bits, scope="channel" if self.method == "kmeans-c" else "tensor")


def all_options(bits=BITS, methods=PAPER_METHODS) -> list[Option]:
    return [Option(m, b) for b in bits for m in methods]


def tied_units(layer_names: list[str]) -> dict[str, list[str]]:
    """unit name -> its layers, in forward order: an attention's to_q / to_k / to_v form one unit
    (named `<attention>.qkv`), every other layer is its own unit."""
    units: dict[str, list[str]] = {}
    for name in layer_names:
        m = re.fullmatch(r"(.*)\.to_[qkv]", name)
        units.setdefault(f"{m.group(1)}.qkv" if m else name, []).append(name)
    return units


def _stale(stored: QuantizedWeight, option: Option, mod: nn.Module) -> bool:
    """A cached `aq` option whose (M, B, g) is no longer what `choose_spec` picks for the layer (the
    rule changed since it was built): it is rebuilt rather than mixed with fresh options."""
    from diffquant.quantize import aq_spec_for

    if option.method != "aq":
        return False
    spec = aq_spec_for(option.weight_config(), mod)  # None: `quantize_layer_weight` falls back to uniform
    return (stored.spec if isinstance(stored, AdditiveWeight) else None) != spec


def _quantize(mod: nn.Module, option: Option, name: str, calib, search) -> QuantizedWeight:
    from diffquant.quantize import quantize_layer_weight

    return quantize_layer_weight(name, mod, option.weight_config(), calib, search)[0]


class SearchSpace:
    """Every option of every weight layer of `model`; `cache_dir` keeps one file per layer. `calib`
    (from `diffquant.calibrate.collect`) is needed only to build `aq` options not yet cached, with
    `search` (an `AQSearch`; the default's when None) as `quantize_` would use it."""

    def __init__(self, model: nn.Module, options: list[Option] | None = None, cache_dir: str | Path | None = None,
                 calib=None, search=None):
        self.model = model
        self.options = options or all_options()
        self.calib, self.search = calib, search
        self.layers = list(quantizable_layers(model))
        if not self.layers:
            raise ValueError("the model has no Linear or Conv2d layer to quantize")
        self.units = tied_units(self.layers)
        self.numel = {n: model.get_submodule(n).weight.numel() for n in self.layers}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.table: dict[str, dict[str, QuantizedWeight]] = {}
        self.rel_error: dict[str, dict[str, float]] = {}
        self.out_error: dict[str, dict[str, float]] = {}  # measure_output_error fills it
        self.layer_bits: dict[str, dict[str, float]] = {}

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods among the options, in `METHODS` order (the predictors' one-hot columns)."""
        present = {o.method for o in self.options}
        return tuple(m for m in METHODS if m in present)

    def build(self, progress: bool = True) -> SearchSpace:
        """Quantizes every layer with every option, or takes it from the layer's cache file (which
        keeps every option ever built for the layer, so adding options computes only those)."""
        missing_aq = [o.key for o in self.options if o.method == "aq"]
        for name in tqdm(self.layers, desc="search space", disable=not progress):
            path = self.cache_dir / f"{name}.pt" if self.cache_dir is not None else None
            stored = torch.load(path, weights_only=False)["weights"] if path is not None and path.exists() else {}
            mod = self.model.get_submodule(name)
            todo = [o for o in self.options if o.key not in stored or _stale(stored[o.key], o, mod)]
            if any(o.method == "aq" for o in todo) and self.calib is None:
                raise ValueError(f"options {missing_aq} are additive (AQ) and not cached (or cached with "
                                 f"another (M, B, g) rule) for layer {name!r}: "
                                 "building them needs calibration data. Fix: SearchSpace(model, options, cache_dir, "
                                 "calib=diffquant.calibrate.collect(model, scheduler)).")
            for o in todo:
                stored[o.key] = _quantize(mod, o, name, self.calib, self.search)
            if todo and path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(path) as tmp:
                    torch.save({"keys": list(stored), "weights": stored}, tmp)
            self._keep(name, {o.key: stored[o.key] for o in self.options})
        return self

    def measure_output_error(self, calib) -> dict[str, dict[str, float]]:
        """layer -> option -> relative error of the layer's output on the calibration inputs,
        tr(E H E^T) / tr(W H W^T) with H their Gram matrix, kept as `out_error`. The weight-space
        `rel_error` misjudges AQ, which puts its error where the inputs do not reach (on the zoo DiT
        its weights are ~15x further from FP than UAQ-4's while its outputs are closer)."""
        from diffquant.methods.aquatic import gram

        self.out_error = {}
        for name in self.layers:
            mod = self.model.get_submodule(name)
            if name not in calib:
                raise ValueError(f"calibration data has no inputs for layer {name!r}; collect it on this model")
            h = gram(mod, calib.inputs[name]).double()
            w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
            ref = float(torch.trace(w @ h @ w.T))
            self.out_error[name] = {}
            for k, q in self.table[name].items():
                e = q.dequantize().double().reshape(w.shape) - w
                self.out_error[name][k] = float(torch.trace(e @ h @ e.T)) / max(ref, 1e-30)
        return self.out_error

    def _keep(self, name: str, weights: dict[str, QuantizedWeight]) -> None:
        w = self.model.get_submodule(name).weight.detach().float()
        self.table[name] = weights
        self.rel_error[name] = {k: float((q.dequantize().reshape(w.shape) - w).pow(2).sum() / w.pow(2).sum())
                                for k, q in weights.items()}
        self.layer_bits[name] = {k: q.stored_bits() / q.numel for k, q in weights.items()}

    # ---------------------------------------------------------------------------- configurations

    def check(self, config: dict[str, Option]) -> None:
        missing = set(self.units) - set(config)
        unknown = set(config) - set(self.units)
        if missing or unknown:
            raise ValueError(f"a configuration names every unit once; missing {sorted(missing)[:3]}, "
                             f"unknown {sorted(unknown)[:3]} (units: SearchSpace.units)")

    def effective_bits(self, config: dict[str, Option]) -> float:
        """Every stored bit of the configuration over its number of weights."""
        self.check(config)
        bits = sum(self.layer_bits[n][config[u].key] * self.numel[n] for u, ls in self.units.items() for n in ls)
        return bits / sum(self.numel.values())

    def quantized_model(self) -> nn.Module:
        """A copy of the model with every layer wrapped (4-bit UAQ placeholders), ready for `apply`."""
        from diffquant.quantize import quantize_

        return quantize_(copy.deepcopy(self.model), QuantConfig(name="space", weight=WeightConfig("uniform", 4)))

    def apply(self, qmodel: nn.Module, config: dict[str, Option]) -> nn.Module:
        """Puts the stored weights of `config` into `qmodel` (from `quantized_model`), in place."""
        self.check(config)
        for unit, names in self.units.items():
            for n in names:
                qmodel.get_submodule(n).set_qweight(self.table[n][config[unit].key])
        return qmodel

    def to_recipe(self, config: dict[str, Option], name: str, act=None) -> QuantConfig:
        """The configuration as a recipe (`diffquant quantize MODEL --recipe FILE`): one exact-name
        override per layer. An `aq` layer's override names the (M, B, g) its searched weight has, not
        the bit budget it was chosen within: the rule that turns a budget into a setting may change
        (it did, b4a0bff), and a recipe must apply the configuration that was measured."""
        self.check(config)
        layers = {_escape(n): pin_aq_spec(config[u].weight_config(), self.table[n][config[u].key])
                  for u, ls in self.units.items() for n in ls}
        return QuantConfig(name=name, weight=WeightConfig("uniform", 4), act=act, layers=layers)


def pin_aq_spec(wc: WeightConfig, weight: QuantizedWeight) -> WeightConfig:
    """`wc` with an `aq` bit budget replaced by the fixed (M, B, g) of `weight`, the layer's weight
    under it; unchanged for other methods, fixed settings, or a budget no setting fit (that layer
    was quantized uniformly, and the budget reproduces that)."""
    if wc.method != "aq" or not wc.target_bits or not isinstance(weight, AdditiveWeight):
        return wc
    spec = weight.spec
    return replace(wc, bits=spec.bits, codebooks=spec.codebooks, group_size=spec.group, target_bits=0.0)


def _escape(name: str) -> str:
    """A layer name as a glob pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)
