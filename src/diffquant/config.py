"""Quantization configs as dataclasses with a JSON round trip, and the named recipes.

A recipe is a QuantConfig: one default weight setting, per-layer overrides (glob patterns, first
match wins), an optional activation setting, and include / exclude patterns on module names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path

from diffquant.formats import KMeansSpec, UniformSpec
from diffquant.nn.act import ActSpec


@dataclass(frozen=True)
class WeightConfig:
    method: str = "uniform"  # "uniform", "kmeans", or "fp" (leave the layer unquantized)
    bits: int = 4
    group_size: int = 0  # uniform: 0 = per output channel
    symmetric: bool = False  # uniform
    clip: str = "minmax"  # uniform: "minmax" or "lp"
    scope: str = "channel"  # kmeans: "channel" (K-Means-C) or "tensor" (K-Means-A)

    def __post_init__(self):
        if self.method not in ("uniform", "kmeans", "fp"):
            raise ValueError(f"weight method must be 'uniform', 'kmeans' or 'fp', got {self.method!r}")
        self.to_spec()  # validates the rest

    def to_spec(self) -> UniformSpec | KMeansSpec | None:
        if self.method == "uniform":
            return UniformSpec(self.bits, self.group_size, self.symmetric, self.clip)
        if self.method == "kmeans":
            return KMeansSpec(self.bits, self.scope)
        return None


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
        d["layers"] = {k: WeightConfig(**v) for k, v in d.get("layers", {}).items()}
        for k in ("include", "exclude", "act_exclude"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


IO_8BIT = {"@io": WeightConfig("uniform", 8)}


def _rtn(name: str, wbits: int, abits: int | None) -> QuantConfig:
    """Round-to-nearest: per-output-channel asymmetric min-max weights; static per-tensor
    activations calibrated over timesteps; the first and last layer's weights at 8 bits."""
    act = ActSpec(abits, "static") if abits and abits < 16 else None
    return QuantConfig(name=name, weight=WeightConfig("uniform", wbits), act=act, layers=dict(IO_8BIT))


RECIPES: dict[str, QuantConfig] = {
    r.name: r
    for r in [
        _rtn("w8a8", 8, 8),
        _rtn("w4a8", 4, 8),
        _rtn("w3a8", 3, 8),
        _rtn("w2a8", 2, 8),
        _rtn("w4a6", 4, 6),
        _rtn("w4a16", 4, None),
        _rtn("w3a16", 3, None),
        _rtn("w2a16", 2, None),
    ]
}


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
