"""Explanations and mixed-precision recipes from the trained predictors.

Qua²SeDiMo reads a unit's score for a setting off the GNN's per-hop node embeddings. diffquant
asks the predictor the question directly instead (a documented choice): the score of unit u with
option o is the mean predicted quality (lower is better) of the labelled configurations with u
switched to o, a partial dependence. It is standardised within each fold's model and averaged over
the folds weighted by their held-out Spearman, as in the paper. A unit's *sensitivity* is how much
worse its score gets at the lowest width than at the highest (averaged over methods).

The recipe for a target average of effective bits picks, per unit, the option minimising
score + lambda * (the unit's share of the model's bits); lambda is found by bisection so that the
configuration's exact effective bits meet the target, and the candidates along the way are ranked
by the ensemble's prediction of the whole configuration.

Partial dependence averages over random configurations, most of them far from the good ones (a
random unit is UAQ a third of the time), and the Lagrangian recipe inherits that: on the zoo U-Net
it mixed UAQ-4 and 2-bit k-means and measured worse at 3.9 bits than at 3.4. `descend` therefore
also walks down from each uniform configuration at the highest width, one width of one unit at a time, taking the
step a cost function (the ensemble, or the summed per-layer error) says is cheapest per bit saved
(or, `any_method`, any cheaper option of a unit: a random mix of methods at 4.02 bits measured better
than every uniform one on the U-Net).
The pipeline labels every candidate and keeps the best measured one: the predictor proposes, the
label decides.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from diffquant.sensitivity.graph import ModelGraph
from diffquant.sensitivity.predictor import GNNPredictor, node_features
from diffquant.sensitivity.space import Option, SearchSpace


def _fold_weights(weights: list[float]) -> np.ndarray:
    """Held-out Spearman per fold model as ensemble weights: negatives count 0; all 0 -> equal."""
    w = np.clip(np.nan_to_num(np.asarray(weights, dtype=np.float64)), 0, None)
    return w / w.sum() if w.sum() > 0 else np.full(len(w), 1 / len(w))


@torch.no_grad()
def ensemble_predict(models: list[GNNPredictor], weights: list[float], x: torch.Tensor, adj: torch.Tensor,
                     batch: int = 64) -> np.ndarray:
    w = _fold_weights(weights)
    out = np.zeros(len(x))
    for m, wi in zip(models, w, strict=True):
        out += wi * np.concatenate([m(x[i:i + batch], adj).numpy() for i in range(0, len(x), batch)])
    return out


@torch.no_grad()
def unit_scores(space: SearchSpace, graph: ModelGraph, models: list[GNNPredictor], weights: list[float],
                configs: list[dict[str, Option]], progress: bool = False) -> dict[str, dict[str, float]]:
    """unit -> option key -> score (standardised partial dependence; lower is better)."""
    adj = graph.adjacency()
    per_model = []
    for m in tqdm(models, desc="unit scores (per fold model)", disable=not progress):
        raw = {}
        for u in space.units:
            raw[u] = {}
            for o in space.options:
                switched = [{**c, u: o} for c in configs]
                raw[u][o.key] = float(np.mean(ensemble_predict([m], [1.0], node_features(space, graph, switched), adj)))
        vals = np.asarray([v for d in raw.values() for v in d.values()])
        mu, sd = vals.mean(), max(vals.std(), 1e-12)
        per_model.append({u: {k: (v - mu) / sd for k, v in d.items()} for u, d in raw.items()})
    w = _fold_weights(weights)
    return {u: {o.key: float(sum(wi * pm[u][o.key] for wi, pm in zip(w, per_model, strict=True)))
                for o in space.options} for u in space.units}


def sensitivity(space: SearchSpace, scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """unit -> score at the lowest width minus score at the highest, averaged over methods."""
    lo, hi = min(o.bits for o in space.options), max(o.bits for o in space.options)
    methods = sorted({o.method for o in space.options})
    return {u: float(np.mean([scores[u][f"{m}-{lo}"] - scores[u][f"{m}-{hi}"] for m in methods])) for u in space.units}


def _lower(space: SearchSpace, option: Option) -> Option | None:
    """The same method one width lower, or None at the lowest width."""
    narrower = [o for o in space.options if o.method == option.method and o.bits < option.bits]
    return max(narrower, key=lambda o: o.bits) if narrower else None


def _unit_bits(space: SearchSpace, unit: str, option: Option) -> float:
    return sum(space.layer_bits[n][option.key] * space.numel[n] for n in space.units[unit])


def descend(space: SearchSpace, base: Option, target_bits: float,
            cost: Callable[[list[dict[str, Option]]], np.ndarray], any_method: bool = False,
            fixed: dict[str, Option] | None = None) -> dict[str, Option]:
    """From every unit at `base`, change one unit per step, each time the change with the least
    increase in `cost` (lower is better) per effective bit saved, until the configuration is within
    `target_bits`. A change lowers the unit one width in its method, or, with `any_method`, takes any
    option that stores fewer bits for it (a cheaper option that also costs less goes first). Units in
    `fixed` keep the option given there throughout (e.g. the first and last layer at 8 bits)."""
    fixed = fixed or {}
    config = {u: fixed.get(u, base) for u in space.units}
    if space.effective_bits(config) <= target_bits:
        return config
    now_cost = float(cost([config])[0])
    now_bits = space.effective_bits(config)
    while now_bits > target_bits:
        if any_method:
            moves = [{**config, u: p} for u, o in config.items() if u not in fixed for p in space.options
                     if _unit_bits(space, u, p) < _unit_bits(space, u, o)]
        else:
            moves = [{**config, u: _lower(space, o)} for u, o in config.items()
                     if u not in fixed and _lower(space, o) is not None]
        if not moves:
            raise ValueError(f"target {target_bits} bits is below every configuration reachable from "
                             f"{base.key} ({now_bits:.3f} bits at the lowest width)")
        costs = cost(moves)
        saved = np.asarray([now_bits - space.effective_bits(m) for m in moves])
        best = int(np.argmin((costs - now_cost) / np.maximum(saved, 1e-9)))
        config, now_cost = moves[best], float(costs[best])
        now_bits = space.effective_bits(config)
    return config


def recipe_for_bits(space: SearchSpace, scores: dict[str, dict[str, float]], target_bits: float,
                    graph: ModelGraph | None = None, models: list[GNNPredictor] | None = None,
                    weights: list[float] | None = None) -> tuple[dict[str, Option], dict]:
    """The configuration at most `target_bits` effective bits that the scores prefer (see above)."""
    total = sum(space.numel.values())
    share = {u: {o.key: sum(space.layer_bits[n][o.key] * space.numel[n] for n in ls) / total
                 for o in space.options} for u, ls in space.units.items()}

    def pick(lam: float) -> dict[str, Option]:
        return {u: min(space.options, key=lambda o: scores[u][o.key] + lam * share[u][o.key] * len(space.units))
                for u in space.units}

    lo_bits = space.effective_bits({u: min(space.options, key=lambda o: share[u][o.key]) for u in space.units})
    if target_bits < lo_bits:
        raise ValueError(f"target {target_bits} bits is below the smallest configuration in the space "
                         f"({lo_bits:.3f} bits); choose a target of at least that")
    lo, hi, candidates = 0.0, 1.0, []
    while space.effective_bits(pick(hi)) > target_bits:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        c = pick(mid)
        if space.effective_bits(c) <= target_bits:
            hi = mid
            candidates.append(c)
        else:
            lo = mid
    candidates.append(pick(hi))
    info = {"lambda": hi, "candidates": len(candidates)}
    if models:
        x = node_features(space, graph, candidates)
        pred = ensemble_predict(models, weights or [1.0] * len(models), x, graph.adjacency())
        best = int(np.argmin(pred))
        info["predicted"] = float(pred[best])
        chosen = candidates[best]
    else:
        chosen = candidates[-1]
    info["effective_bits"] = space.effective_bits(chosen)
    return chosen, info
