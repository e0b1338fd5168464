"""Quantization configs as dataclasses with a JSON round trip, and the named recipes.

A recipe is a QuantConfig: one default weight setting, per-layer overrides (glob patterns, first
match wins), an optional activation setting, and include / exclude patterns on module names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path

from diffquant.formats import AdditiveSpec, KMeansSpec, UniformSpec
from diffquant.io_utils import write_json
from diffquant.methods.accuquant import ReconConfig
from diffquant.methods.pv_tuning import PVConfig
from diffquant.nn.act import ActSpec


@dataclass(frozen=True)
class WeightConfig:
    method: str = "uniform"  # "uniform", "kmeans", "aq" (additive codebooks), or "fp" (leave unquantized)
    bits: int = 4  # uniform / kmeans: bits per weight; aq: bits per code (2^bits codewords per codebook)
    group_size: int = 0  # uniform: 0 = per output channel; aq: codeword length (0: kernel slice / 8)
    symmetric: bool = False  # uniform
    clip: str = "minmax"  # uniform: "minmax" or "lp"
    scope: str = "channel"  # kmeans: "channel" (K-Means-C) or "tensor" (K-Means-A)
    codebooks: int = 2  # aq: M, the number of codebooks summed per group
    target_bits: float = 0.0  # aq: > 0 chooses (M, B, g) per layer within this many effective bits
    kernel_aware: bool = True  # aq: a k x k convolution's group is one kernel slice (KAQ)

    def __post_init__(self):
        if self.method not in ("uniform", "kmeans", "aq", "fp"):
            raise ValueError(f"weight method must be 'uniform', 'kmeans', 'aq' or 'fp', got {self.method!r}")
        if self.method == "aq" and self.target_bits < 0:
            raise ValueError(f"aq target_bits must be >= 0, got {self.target_bits}")
        if self.method != "aq":
            self.to_spec()  # validates the rest
        elif not self.target_bits:
            AdditiveSpec(self.codebooks, self.bits, self.group_size or 8)

    def to_spec(self) -> UniformSpec | KMeansSpec | None:
        if self.method == "uniform":
            return UniformSpec(self.bits, self.group_size, self.symmetric, self.clip)
        if self.method == "kmeans":
            return KMeansSpec(self.bits, self.scope)
        return None

    def aq_spec(self, shape: tuple[int, ...]) -> AdditiveSpec:
        """The additive setting of a layer of this shape: chosen within `target_bits`, or fixed."""
        from diffquant.methods.aquatic import choose_spec

        if self.target_bits:
            return choose_spec(tuple(shape), self.target_bits, self.kernel_aware)
        ksz = math.prod(shape[2:]) if len(shape) == 4 else 1
        g = self.group_size or (ksz if self.kernel_aware and ksz > 1 else 8)
        return AdditiveSpec(self.codebooks, self.bits, g)


@dataclass(frozen=True)
class QuantConfig:
    name: str = "custom"
    weight: WeightConfig = field(default_factory=WeightConfig)
    act: ActSpec | None = None
    # Per-layer weight overrides, pattern -> setting; "@io" stands for the model's first and last layer.
    layers: dict[str, WeightConfig] = field(default_factory=dict)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    act_exclude: tuple[str, ...] = ()  # layers whose inputs stay in full precision
    finetune: PVConfig | None = None  # SeMI-PV distillation after the layer-wise AQ step
    laq: bool = False  # AQ layers: per-layer budgets from measured sensitivity (LAQ), average = target_bits
    recon: ReconConfig | None = None  # reconstruction after rounding: per-step (Q-Diffusion) or AccuQuant
    split_skips: bool = False  # U-Net skip concatenations: separate activation ranges for the two halves

    def weight_for(self, name: str, io_layers: set[str]) -> WeightConfig:
        for pattern, wc in self.layers.items():
            if (pattern == "@io" and name in io_layers) or fnmatchcase(name, pattern):
                return wc
        return self.weight

    def selects(self, name: str) -> bool:
        return any(fnmatchcase(name, p) for p in self.include) and not any(fnmatchcase(name, p) for p in self.exclude)

    def act_for(self, name: str) -> ActSpec | None:
        if self.act is None or any(fnmatchcase(name, p) for p in self.act_exclude):
            return None
        return self.act

    def to_dict(self) -> dict:
        d = asdict(self)
        d["include"], d["exclude"], d["act_exclude"] = list(self.include), list(self.exclude), list(self.act_exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}; allowed: {sorted(known)}")
        d = dict(d)
        d["weight"] = WeightConfig(**d.get("weight", {}))
        d["act"] = ActSpec(**d["act"]) if d.get("act") else None
        d["finetune"] = PVConfig(**d["finetune"]) if d.get("finetune") else None
        d["recon"] = ReconConfig(**d["recon"]) if d.get("recon") else None
        d["layers"] = {k: WeightConfig(**v) for k, v in d.get("layers", {}).items()}
        for k in ("include", "exclude", "act_exclude"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


IO_8BIT = {"@io": WeightConfig("uniform", 8)}


@dataclass(frozen=True)
class AQConfig:
    """AQUATIC-Diff as one object, for `diffquant.quantize_(model, AQConfig(...), calib=...)`.

    Either a budget (`target_bits`: each layer gets the (M, B, g) with the most rate bits, code bits
    less an allowance per extra codebook on short codewords (`methods.aquatic.rate_bits`), whose
    effective bits, codebooks and scales included, fit) or a fixed setting (`codebooks` and `bits`,
    with `group` 0 meaning one kernel slice for k x k convolutions and 8 inputs otherwise)."""

    target_bits: float = 2.0
    codebooks: int = 0  # with bits: a fixed setting instead of the budget
    bits: int = 0
    group: int = 0
    kernel_aware: bool = True
    act_bits: int | None = 8  # static per-tensor activations; None: weight-only
    io_bits: int = 8  # the first and last layer, uniform
    finetune: PVConfig | None = None  # e.g. PVConfig() for SeMI-PV (needs quantize_(..., scheduler=))
    laq: bool = False  # with target_bits: per-layer budgets from measured sensitivity (needs scheduler=)

    def to_quant_config(self) -> QuantConfig:
        fixed = bool(self.codebooks and self.bits)
        wc = WeightConfig("aq", bits=self.bits or 8, group_size=self.group, codebooks=self.codebooks or 1,
                          target_bits=0.0 if fixed else self.target_bits, kernel_aware=self.kernel_aware)
        act = ActSpec(self.act_bits, "static") if self.act_bits and self.act_bits < 16 else None
        label = f"M{self.codebooks}B{self.bits}" if fixed else f"w{self.target_bits:g}"
        return QuantConfig(name=f"aq-{label}a{self.act_bits or 16}", weight=wc, act=act,
                           layers={"@io": WeightConfig("uniform", self.io_bits)}, finetune=self.finetune,
                           laq=self.laq and not fixed)


def _rtn(name: str, wbits: int, abits: int | None, act_mode: str = "static") -> QuantConfig:
    """Round-to-nearest: per-output-channel asymmetric min-max weights; static per-tensor
    activations calibrated over timesteps (or dynamic per-token); the first and last layer's weights
    at 8 bits."""
    act = ActSpec(abits, act_mode) if abits and abits < 16 else None
    return QuantConfig(name=name, weight=WeightConfig("uniform", wbits), act=act, layers=dict(IO_8BIT))


SEMI_PV = PVConfig()  # P and V steps, both momentum-invalidation rules
# What the AQ recipes use: P steps only, with SeMI's timestep-jump rule. The V step (code moves) was
# measured to hurt or not help on both zoo models at 2 and 4 bits (benchmarks/pv_variants.py).
SEMI_P = PVConfig(v_every=0)
SEMI_P_LONG = PVConfig(v_every=0, steps=900, trajectories=128)  # the same, 3x the steps on 2x the data


RECON_SETTINGS = ((4, 8), (3, 8), (3, 6))


def _recon(name: str, wbits: int, abits: int, objective: str, m: int = 4, balance: bool = False,
           refine: bool = False, keep: bool = False) -> QuantConfig:
    """Q-Diffusion's baseline (`perstep`) or AccuQuant (`accuquant`, groups of M DDIM steps, O(1)
    memory): the same RTN grid (per-channel Lp-clipped) and 8-bit first / last layer, split skip
    activations, then reconstruction of AdaRound roundings and LSQ activation ranges, unit by unit;
    the two differ only in the objective."""
    recon = ReconConfig(objective=objective, group_steps=m, balance_starts=balance, from_perstep=refine,
                        keep_start=keep)
    return QuantConfig(name=name, weight=WeightConfig("uniform", wbits, clip="lp"), act=ActSpec(abits, "static"),
                       layers=dict(IO_8BIT), recon=recon, split_skips=True)


def _aq(name: str, target_bits: float, abits: int | None, finetune: PVConfig | None = SEMI_P,
        kernel_aware: bool = True, laq: bool = True, recon: ReconConfig | None = None,
        act_mode: str = "static") -> QuantConfig:
    """AQUATIC-Diff: additive codebooks chosen per layer within `target_bits` effective bits (codebooks
    and scales counted), KAQ on k x k convolutions, Gram-weighted layer-wise search, then SeMI
    distillation (P steps; `SEMI_PV` adds the V steps); the same A8 and 8-bit first / last layer as
    the RTN recipes, so the two differ only in how the weights are quantized."""
    act = ActSpec(abits, act_mode) if abits and abits < 16 else None
    return QuantConfig(name=name, weight=WeightConfig("aq", target_bits=target_bits, kernel_aware=kernel_aware),
                       act=act, layers=dict(IO_8BIT), finetune=finetune, laq=laq, recon=recon,
                       split_skips=recon is not None)


RECIPES: dict[str, QuantConfig] = {
    r.name: r
    for r in [
        _rtn("w8a8", 8, 8),
        _rtn("w4a8", 4, 8),
        _rtn("w3a8", 3, 8),
        _rtn("w2a8", 2, 8),
        _rtn("w4a6", 4, 6),
        _rtn("w3a6", 3, 6),
        _rtn("w4a16", 4, None),
        _rtn("w3a16", 3, None),
        _rtn("w2a16", 2, None),
        # the cost of static per-tensor A8 on its own: per-token ranges computed at run time instead
        _rtn("w8a8-dyn", 8, 8, act_mode="dynamic"),
        # ... and static ranges per denoising step (a table looked up by timestep), no run-time min/max
        _rtn("w8a8-ts", 8, 8, act_mode="timestep"),
        # Fine-tuning is part of every AQ recipe: P steps with SeMI's timestep-jump rule, the best held-out
        # state kept. The code-moving V step stays in the ablations: on the zoo models it did not help at 2
        # bits and hurt at 4 (128-sample PSNR to FP: DiT 4 bits 30.4 dB P only, 27.7 with V steps, the
        # start; benchmarks/results/pv-variants-*.json).
        *[_aq(f"aq-w{b:g}a8", b, 8) for b in (4, 3, 2, 1.5)],
        *[_aq(f"aq-w{b:g}a16", b, None) for b in (4, 3, 2, 1.5)],
        # longer distillation: 3x the steps on 2x the FP trajectories (DiT W4A8 at 1,000 samples: FID-to-FP
        # 0.017 against the recipe's 0.031; benchmarks/results/quality-quick-mnist-dit-pairs.json)
        *[_aq(f"aq-w{b:g}a8-long", b, 8, finetune=SEMI_P_LONG) for b in (4, 2)],
        _aq("aq-w4a8-long-dyn", 4, 8, finetune=SEMI_P_LONG, act_mode="dynamic"),  # per-token A8
        _aq("aq-w4a8-long-ts", 4, 8, finetune=SEMI_P_LONG, act_mode="timestep"),  # static A8 per timestep
        # ablations: without fine-tuning, full SeMI-PV (with V steps), plain PV (V steps, no momentum
        # invalidation), flat groups on convolutions instead of kernel slices (KAQ), one budget per layer
        # instead of LAQ
        *[_aq(f"aq-w{b:g}a8-noft", b, 8, finetune=None) for b in (4, 3, 2, 1.5)],
        _aq("aq-w2a8-semipv", 2, 8, finetune=SEMI_PV),
        _aq("aq-w2a8-pv", 2, 8, finetune=PVConfig(semi=False)),
        _aq("aq-w2a8-flat", 2, 8, kernel_aware=False),
        _aq("aq-w2a8-nolaq", 2, 8, laq=False),
        # reconstruction on AQ weights instead of SeMI-PV: codebooks, scales and activation ranges learned
        # block by block against the per-step or the multi-step objective (codes fixed)
        *[_aq(f"aq-w{b:g}a8-{obj}", b, 8, finetune=None, recon=ReconConfig(objective=obj))
          for b in (3, 2) for obj in ("perstep", "accuquant")],
        # AccuQuant against its per-step baseline (Q-Diffusion), at W4A8, W3A8 and W3A6
        *[_recon(f"w{w}a{a}-{obj}", w, a, obj) for w, a in RECON_SETTINGS for obj in ("perstep", "accuquant")],
        *[_recon(f"w{w}a{a}-accuquant-m{m}", w, a, "accuquant", m) for w, a in RECON_SETTINGS for m in (2, 8)],
        *[_recon(f"w{w}a{a}-accuquant-bal", w, a, "accuquant", balance=True) for w, a in RECON_SETTINGS],
        # ... with a unit that learned itself worse than its start given its start back (keep_start)
        *[_recon(f"w{w}a{a}-accuquant{'' if m == 4 else f'-m{m}'}-keep", w, a, "accuquant", m, keep=True)
          for w, a in RECON_SETTINGS for m in (2, 4, 8)],
        # AccuQuant as a refinement of the per-step solution (the per-step run, then the multi-step objective)
        *[_recon(f"w{w}a{a}-accuquant-refine", w, a, "accuquant", refine=True) for w, a in RECON_SETTINGS],
        # ... with a longer (M = 8) or shorter (M = 2) simulated horizon
        *[_recon(f"w{w}a{a}-accuquant-refine-m{m}", w, a, "accuquant", m, refine=True)
          for w, a in RECON_SETTINGS for m in (2, 8)],
    ]
}


def describe(r: QuantConfig) -> str:
    """One line saying what a recipe does."""
    w = r.weight
    if w.method == "aq":
        how = (f"AQ additive codebooks within {w.target_bits:g} effective bits" if w.target_bits else
               f"AQ {w.codebooks}x{w.bits}-bit codebooks")
        how += ", KAQ" if w.kernel_aware else ", flat groups"
        how += ", LAQ per-layer budgets" if r.laq else ", one budget per layer"
        if r.finetune is not None:
            steps = "PV" if r.finetune.v_every else "P-only"
            how += f", SeMI-{steps} fine-tuning" if r.finetune.semi else f", {steps} (no momentum invalidation)"
    else:
        how = f"W{w.bits} {w.method} per-channel {w.clip}"
    if r.recon is not None:
        learned = "codebooks + scales + LSQ" if w.method == "aq" else "AdaRound + LSQ"
        how += (f", per-step block reconstruction ({learned})" if r.recon.objective == "perstep" else
                f", AccuQuant reconstruction over {r.recon.group_steps} DDIM steps ({r.recon.grad} gradient)"
                + (", from the per-step solution" if r.recon.from_perstep else "")
                + (", a unit that ends worse than its start reverted" if r.recon.keep_start else ""))
    act = f"A{r.act.bits} {r.act.mode}" if r.act else "A16 (fp activations)"
    if r.split_skips and r.act:
        act += ", split skip concatenations"
    return f"{how}; {act}; first/last layer W8"


def get_recipe(name_or_file: str | Path) -> QuantConfig:
    """A named recipe, or a JSON recipe file."""
    key = str(name_or_file)
    if key in RECIPES:
        return RECIPES[key]
    path = Path(key)
    if path.suffix == ".json" or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        try:
            return QuantConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"recipe file {path} is not a valid recipe: {e}") from None
    raise KeyError(f"unknown recipe {key!r}. Named recipes: {', '.join(RECIPES)}; or give a recipe .json file.")
