"""`diffquant sensitivity`: from a model to a mixed-precision recipe, its explanations and plots.

space -> random configurations + the uniform ones -> labels -> predictors in k folds -> unit scores
-> recipe at the target bits. Everything expensive is cached under `cache` (the option table,
every label), so a second call with another target only re-fits and re-searches.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffquant.io_utils import write_json
from diffquant.nn.act import ActSpec
from diffquant.pipelines import latent_shape
from diffquant.provenance import provenance
from diffquant.sensitivity.explain import descend, ensemble_predict, recipe_for_bits, sensitivity, unit_scores
from diffquant.sensitivity.graph import extract_graph
from diffquant.sensitivity.predictor import TrainConfig, cross_validate, node_features, summed_error, target_of
from diffquant.sensitivity.sample import (
    LabelConfig,
    config_key,
    config_to_json,
    label_parallel,
    random_configs,
)
from diffquant.sensitivity.space import Option, SearchSpace, all_options

ROLES = (("io", r"^(conv_in|conv_out|pos_embed\.proj|proj_out_2)$"),
         ("time/class embedding",
          r"time_embedding|timestep_embedder|time_emb_proj|class_embedding|norm1\.linear|proj_out_1"),
         ("attention q/k/v", r"\.(qkv|to_[qkv])$"),
         ("attention out", r"to_out"),
         ("feed-forward", r"\.ff\."),
         ("skip / shortcut", r"conv_shortcut"),
         ("down / up sampler", r"samplers"),
         ("resnet conv", r"resnets\.\d+\.conv[12]$"))


def layer_role(unit: str) -> str:
    for role, pattern in ROLES:
        if re.search(pattern, unit):
            return role
    return "other"


@dataclass(frozen=True)
class SensitivitySettings:
    configs: int = 120
    n: int = 128
    workers: int = 1
    folds: int = 5
    epochs: int = 300
    target: str = "fid_to_fp"
    explain_configs: int = 32  # labelled configurations the partial dependence averages over
    # options searched beside the paper's (by summed output error, not in the random configurations):
    # a method at every width ("aq") or one option ("uaq-8": a layer kept at 8-bit uniform, as LAQ does)
    extra_options: tuple[str, ...] = ()


def uniform_configs(space: SearchSpace) -> list[dict[str, Option]]:
    return [{u: o for u in space.units} for o in space.options]


def run(model_name: str, out: str | Path, target_bits: list[float], act_bits: int | None = None,
        settings: SensitivitySettings = SensitivitySettings(), cache: str | Path = "runs/cache/sensitivity",
        progress: bool = True) -> dict:
    import diffquant as dq

    out, cache = Path(out), Path(cache) / model_name
    model, scheduler = dq.load(model_name)[:2]
    space = SearchSpace(model, cache_dir=cache / "space").build(progress=progress)
    full, gain = _with_extra_options(space, model, scheduler, settings.extra_options, cache / "space", progress)
    configs = random_configs(space, settings.configs, seed=0)
    uniform = uniform_configs(full)
    label_dir = cache / f"labels-n{settings.n}"
    labels = label_parallel(model_name, cache / "space", configs + uniform, label_dir, LabelConfig(n=settings.n),
                            workers=settings.workers)
    by_key = {lab["key"]: lab for lab in labels}
    rand = [c for c in configs if config_key(c) in by_key]
    y = target_of([by_key[config_key(c)] for c in rand], settings.target)
    graph = extract_graph(model, torch.randn(1, *latent_shape(model)), torch.tensor([500]), torch.tensor([0]))
    cv = cross_validate(space, graph, rand, y, k=settings.folds, cfg=TrainConfig(epochs=settings.epochs),
                        progress=progress)
    weights = [f["spearman"] for f in cv["gnn"]]
    scores = unit_scores(space, graph, cv["models"], weights, rand[:settings.explain_configs], progress=progress)
    sens = sensitivity(space, scores)
    act = ActSpec(act_bits, "dynamic") if act_bits else None
    recipes: dict = {}
    out.mkdir(parents=True, exist_ok=True)
    acts = [(None, "")] + ([(act, f"a{act_bits}")] if act else [])  # weight-only, and with activations
    uni_labels = {o.key: by_key[config_key(c)] for o, c in zip(full.options, uniform, strict=True)
                  if config_key(c) in by_key}
    adj = graph.adjacency()

    def gnn_cost(cs):
        return ensemble_predict(cv["models"], weights, node_features(space, graph, cs), adj)

    def error_cost(cs):
        return summed_error(space, cs)

    def full_error(cs):  # AQ's weight-space error says nothing of its outputs: compare outputs
        return summed_error(full, cs, full.out_error)

    # the same, each unit's error weighted by its sensitivity from the predictors (floored at a twentieth
    # of the largest): the plain sum treats a fragile ResNet convolution like a tolerant projection
    floor = 0.05 * max(max(sens.values()), 1e-6)
    unit_weight = {u: max(v, floor) for u, v in sens.items()}

    def weighted_error(cs):
        return summed_error(full, cs, full.out_error, unit_weight)

    # the same, each layer's output error scaled by its measured gain to the denoiser's output (LAQ's
    # sensitivity): the predictors never saw options beyond 4 bits, so they cannot say which layers need 8
    gained = gain_weighted(full.out_error, gain)

    def gain_error(cs):
        return summed_error(full, cs, gained)

    for tb in target_bits:
        candidates = {"lagrangian": recipe_for_bits(space, scores, tb, graph, cv["models"], weights)[0]}
        for base in _descent_bases(space, uni_labels, tb):
            candidates[f"descent-gnn-from-{base.key}"] = descend(space, base, tb, gnn_cost)
            candidates[f"descent-error-from-{base.key}"] = descend(space, base, tb, error_cost)
            candidates[f"descent-error-any-method-from-{base.key}"] = descend(space, base, tb, error_cost, True)
        predicted = dict(zip(candidates, gnn_cost(list(candidates.values())), strict=True))
        if full is not space:  # the predictors never saw the extra options: the summed errors search them
            extra = "+".join(settings.extra_options)
            for base in _descent_bases(full, uni_labels, tb):
                if base not in space.options:
                    candidates[f"descent-error-from-{base.key}"] = descend(full, base, tb, full_error)
                costs = (("error", full_error), ("weighted-error", weighted_error), ("gain-error", gain_error))
                for tag, cost in costs:
                    candidates[f"descent-{tag}-any-method+{extra}-from-{base.key}"] = (
                        descend(full, base, tb, cost, True))
        got = label_parallel(model_name, cache / "space", list(candidates.values()), label_dir,
                             LabelConfig(n=settings.n), workers=settings.workers)
        measured = {g["key"]: g for g in got}
        tried = {k: {"predicted": float(predicted[k]) if k in predicted else None, **_brief(measured[config_key(c)])}
                 for k, c in candidates.items()}
        how = min(tried, key=lambda k: tried[k]["fid_to_fp"])  # the label decides
        config = candidates[how]
        info = {"search": how, "effective_bits": full.effective_bits(config), "candidates": tried,
                "label": _brief(measured[config_key(config)])}
        for spec, tag in acts:
            name = f"{model_name}-mp{tb:g}{tag}"
            full.to_recipe(config, name, act=spec).to_json(out / f"{name}.json")
            recipes[name] = {"file": f"{name}.json", "config": config_to_json(config), **info}
    for o, c in zip(full.options, uniform, strict=True):  # the single-method baselines, as recipes too
        for spec, tag in acts:
            full.to_recipe(c, f"{model_name}-uniform-{o.key}{tag}", act=spec).to_json(
                out / f"{model_name}-uniform-{o.key}{tag}.json")
    doc = {"model": model_name, "settings": settings.__dict__, "units": len(space.units),
           "options": [o.key for o in full.options], "paper_options": [o.key for o in space.options],
           "graph": {"nodes": len(graph.names), "edges": len(graph.edges)},
           "predictors": {k: {"folds": cv[k], "mean": cv[f"{k}_mean"]} for k in ("gnn", "trees", "summed_error")},
           "heldout": {"pred": [float(v) for v in cv["heldout"]], "true": [float(v) for v in y]},
           "labels": [_brief(by_key[config_key(c)]) for c in rand],
           "uniform": {k: _brief(lab) for k, lab in uni_labels.items()},
           "option_errors": _option_errors(full), "unit_scores": scores, "layer_gain": gain,
           "sensitivity": sens, "roles": {u: layer_role(u) for u in space.units},
           "blocks": _unit_blocks(space, graph), "recipes": recipes, **provenance()}
    write_json(out / "sensitivity.json", doc)
    plot(doc, out)
    return doc


def extra_option_list(extras: tuple[str, ...]) -> list[Option]:
    """`SensitivitySettings.extra_options` as options: "aq" -> aq-2, aq-3, aq-4; "uaq-8" -> itself."""
    out: list[Option] = []
    for e in extras:
        out += [Option.parse(e)] if e[-1:].isdigit() else all_options(methods=(e,))
    return out


def gain_weighted(errors: dict[str, dict[str, float]], gain: dict[str, float]) -> dict[str, dict[str, float]]:
    """Each layer's per-option output errors scaled by its gain to the denoiser's output: the cost the
    gain-weighted descents sum."""
    return {n: {k: gain[n] * e for k, e in errs.items()} for n, errs in errors.items()}


def _with_extra_options(space: SearchSpace, model, scheduler, extras: tuple[str, ...], cache_dir: Path,
                        progress: bool) -> tuple[SearchSpace, dict[str, float]]:
    """The search space with `extras` added, every option's output error measured
    (`SearchSpace.measure_output_error`), and every layer's gain: the denoiser's relative output error
    per unit of the layer's own output error (`methods.laq.sensitivity`, on the FP model's trajectory).
    AQ options need calibration data, collected here as the quantization benchmarks collect it, so that
    a recipe re-quantizes to the same weights."""
    if not extras:
        return space, {}
    from diffquant.calibration.collect import collect
    from diffquant.methods.laq import sensitivity as layer_gain
    from diffquant.methods.laq import trajectory_probe

    calib = collect(model, scheduler, n=64, steps=20, progress=progress)
    options = space.options + [o for o in extra_option_list(extras) if o not in space.options]
    full = SearchSpace(model, options=options, cache_dir=cache_dir, calib=calib)
    full.build(progress=progress).measure_output_error(calib)
    layers = {n: model.get_submodule(n) for n in full.layers}
    probe = trajectory_probe(model, scheduler)  # LAQ's, so the gains are the ones LAQ allocates by
    gain = {n: v["sens"] for n, v in layer_gain(model, layers, probe, calib.inputs, progress=progress).items()}
    return full, gain


def _option_errors(space: SearchSpace) -> dict[str, dict[str, float]]:
    """option -> median over the layers of its relative weight error and (when measured) output error."""
    out = {}
    for o in space.options:
        out[o.key] = {"weight": float(np.median([space.rel_error[n][o.key] for n in space.layers]))}
        if space.out_error:
            out[o.key]["output"] = float(np.median([space.out_error[n][o.key] for n in space.layers]))
    return out


def _descent_bases(space: SearchSpace, uniform_labels: dict[str, dict], target_bits: float) -> list[Option]:
    """Where descents start: each method's widest option whose labelled uniform configuration is above
    the target and can reach it (the method's narrowest option is within it)."""
    def widest(m: str) -> Option:
        return max((o for o in space.options if o.method == m), key=lambda o: o.bits)

    def reachable(o: Option) -> bool:
        lowest = min((p for p in space.options if p.method == o.method), key=lambda p: p.bits)
        return space.effective_bits({u: lowest for u in space.units}) <= target_bits

    return [o for o in map(widest, space.methods) if o.key in uniform_labels
            and uniform_labels[o.key]["bits"] > target_bits and reachable(o)]


def _brief(label: dict) -> dict:
    return {k: label[k] for k in ("key", "bits", "fid_to_fp", "mse_to_fp")}


def _unit_blocks(space: SearchSpace, graph) -> dict[str, int]:
    return {u: graph.block[graph.index[ls[0]]] for u, ls in space.units.items()}


def plot(doc: dict, out: Path) -> None:
    """sensitivity-by-role.png (box), sensitivity-by-block.png (bar), recipe-<name>.png (the denoiser's
    layers in forward order coloured by chosen bits), pareto.png (bits against label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sens, roles, blocks = doc["sensitivity"], doc["roles"], doc["blocks"]
    names = sorted(set(roles.values()), key=lambda r: -np.median([sens[u] for u in sens if roles[u] == r]))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.boxplot([[sens[u] for u in sens if roles[u] == r] for r in names], tick_labels=names)
    ax.set_ylabel("sensitivity (score at 2 bits - at 4)")
    ax.tick_params(axis="x", rotation=30)
    ax.set_title(f"{doc['model']}: sensitivity per layer role")
    fig.tight_layout()
    fig.savefig(out / "sensitivity-by-role.png", dpi=120)
    plt.close(fig)
    bs = sorted(set(blocks.values()))
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar([str(b) for b in bs], [np.mean([sens[u] for u in sens if blocks[u] == b]) for b in bs])
    ax.set_xlabel("block index (0: before the first block, last: after the last)")
    ax.set_ylabel("mean sensitivity")
    ax.set_title(f"{doc['model']}: sensitivity per block")
    fig.tight_layout()
    fig.savefig(out / "sensitivity-by-block.png", dpi=120)
    plt.close(fig)
    for name, rec in doc["recipes"].items():
        units = list(rec["config"])
        bits = [Option.parse(rec["config"][u]).bits for u in units]
        fig, ax = plt.subplots(figsize=(10, 2.6))
        colors = {2: "tab:red", 3: "tab:orange", 4: "tab:green", 8: "tab:blue"}
        ax.bar(range(len(units)), [1] * len(units), color=[colors.get(b, "grey") for b in bits], width=1.0)
        for i in range(1, len(units)):
            if blocks[units[i]] != blocks[units[i - 1]]:
                ax.axvline(i - 0.5, color="black", lw=0.8)
        ax.set_yticks([])
        ax.set_xlabel("units in forward order (lines: block boundaries); red 2 bits, orange 3, green 4, blue 8")
        ax.set_title(f"{name}: {rec['effective_bits']:.2f} effective bits")
        fig.tight_layout()
        fig.savefig(out / f"recipe-{name}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    lab = doc["labels"]
    ax.scatter([x["bits"] for x in lab], [x["fid_to_fp"] for x in lab], s=8, alpha=0.5, label="random configurations")
    uni = doc["uniform"]
    ax.scatter([v["bits"] for v in uni.values()], [v["fid_to_fp"] for v in uni.values()], marker="s", color="black",
               label="uniform")
    for k, v in uni.items():
        ax.annotate(k, (v["bits"], v["fid_to_fp"]), fontsize=6)
    picks = [v for v in doc["recipes"].values() if "label" in v]
    if picks:
        ax.scatter([v["label"]["bits"] for v in picks], [v["label"]["fid_to_fp"] for v in picks], marker="*",
                   s=120, color="tab:red", label="predictor's recipes")
    ax.set_yscale("log")
    ax.set_xlabel("effective bits")
    ax.set_ylabel(f"FID to FP ({doc['settings']['n']} images)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)


def load(out: str | Path) -> dict:
    return json.loads((Path(out) / "sensitivity.json").read_text())
