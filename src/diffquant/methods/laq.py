"""LAQ: layer-heterogeneous additive settings chosen from measured sensitivity, to a bit budget.

Per layer, we need how much the denoiser's output suffers for a given setting. Running the full AQ
search for every (layer, setting) pair would multiply the quantization time by the number of
settings, so the allocation uses a measured sensitivity and a rate-distortion model instead:

1. **Sensitivity.** For each layer alone, its weight is replaced by a 2-bit per-channel uniform copy,
   and the relative error of the whole denoiser's output is measured on a fixed probe batch of the FP
   model's own sampling trajectory (every denoising step, conditional and null halves). Dividing by
   the layer's own Gram-weighted relative weight error gives `sens`: output error per unit of
   layer error, which captures where the layer sits (a time-embedding projection and an early
   convolution of equal weight error hurt differently).
2. **Model.** A setting with c rate bits per weight (code bits, less a quarter bit per codebook beyond
   the first: `aquatic.rate_bits`) leaves a layer error of about e2 * 4^-(c - 2) (each
   extra bit quarters the mean-squared error), e2 the 2-bit error; the predicted output error is
   sens * e2 * 4^-(c - 2). Keeping a layer at 8-bit uniform counts as c = 8.
3. **Allocation.** Greedy on the marginal ratio: start every layer at its cheapest setting, then
   repeatedly upgrade the layer whose next setting buys the most predicted error per stored bit,
   while the model's average effective bits (fixed layers such as the 8-bit first and last layer
   included) stays within the target.

The result is a per-layer table written into the recipe (and so into the saved model's
diffquant.json): each layer gets its own effective-bit budget, or 8-bit uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from diffquant.formats import UniformSpec, UniformWeight
from diffquant.methods.aquatic import choose_spec, gram, rate_bits, relative_error

BUDGETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0)  # per-layer effective-bit budgets tried


@dataclass(frozen=True)
class Option:
    budget: float  # 0.0: 8-bit uniform
    eff_bits: float
    rate_bits: float  # aquatic.rate_bits (code bits less the extra-codebook allowance); 8 for uniform w8


def layer_options(shape: tuple[int, ...], kernel_aware: bool = True) -> list[Option]:
    """Distinct settings of a layer, cheapest first: AQ at each budget that fits, and 8-bit uniform."""
    out, d = shape[0], math.prod(shape[1:])
    seen, opts = set(), []
    for b in BUDGETS:
        try:
            s = choose_spec(shape, b, kernel_aware)
        except ValueError:
            continue
        if s in seen:
            continue
        seen.add(s)
        opts.append(Option(b, s.effective_bits(out, d), rate_bits(s)))
    opts.append(Option(0.0, 8 + 24 / d, 8.0))  # uniform w8: codes + an fp16 scale and 8-bit zero per row
    return sorted(opts, key=lambda o: o.eff_bits)


def trajectory_probe(model: nn.Module, scheduler) -> dict[str, torch.Tensor]:
    """The fixed probe batch that `sensitivity` measures on: 4 items drawn from 16 of the FP model's own
    sampling trajectories (every step), seeded, so every caller measures the same gains."""
    from diffquant.methods.pv_tuning import PVConfig, _probe_batch, teacher_items

    items = teacher_items(model, scheduler, PVConfig(trajectories=16, seed=3_000_000))
    return _probe_batch(items, 4, torch.Generator().manual_seed(0))


@torch.no_grad()
def sensitivity(model: nn.Module, layers: dict[str, nn.Module], probe: dict[str, torch.Tensor],
                calib_inputs: dict[str, list[torch.Tensor]], progress: bool = True) -> dict[str, dict]:
    """Per layer: output error of the whole model with only that layer at 2-bit uniform, its own
    Gram-weighted weight error, and their ratio."""
    from tqdm import tqdm

    ref = model(probe["x"], probe["t"], class_labels=probe["y"]).sample
    denom = ref.pow(2).mean()
    out = {}
    for name, mod in tqdm(layers.items(), desc="LAQ sensitivity", disable=not progress):
        w = mod.weight.data.clone()
        q = UniformWeight.quantize(w, UniformSpec(2, clip="lp"), name).dequantize()
        h = gram(mod, calib_inputs[name])
        e_layer = relative_error(w.reshape(w.shape[0], -1), q.reshape(w.shape[0], -1), h)
        mod.weight.data.copy_(q)
        try:
            y = model(probe["x"], probe["t"], class_labels=probe["y"]).sample
        finally:
            mod.weight.data.copy_(w)
        e_out = float((y - ref).pow(2).mean() / denom)
        out[name] = {"output_error": e_out, "layer_error": e_layer, "sens": e_out / max(e_layer, 1e-12)}
    return out


def allocate(shapes: dict[str, tuple[int, ...]], sens: dict[str, dict], target_bits: float,
             fixed_bits: float = 0.0, fixed_weights: int = 0, kernel_aware: bool = True) -> dict[str, Option]:
    """Greedy marginal-ratio allocation of per-layer options under an average of `target_bits`
    over all quantized weights (`fixed_*`: layers outside the allocation, such as the 8-bit I/O)."""
    opts = {n: layer_options(s, kernel_aware) for n, s in shapes.items()}
    size = {n: math.prod(s) for n, s in shapes.items()}
    e2 = {n: sens[n]["sens"] * sens[n]["layer_error"] for n in shapes}

    def pred(n: str, o: Option) -> float:
        return e2[n] * 4.0 ** (-(o.rate_bits - 2.0))

    pick = {n: 0 for n in shapes}
    budget = target_bits * (sum(size.values()) + fixed_weights) - fixed_bits
    used = sum(opts[n][0].eff_bits * size[n] for n in shapes)
    if used > budget:
        raise ValueError(f"target {target_bits} bits is below the cheapest setting of every layer "
                         f"({(used + fixed_bits) / (sum(size.values()) + fixed_weights):.3f}); raise the target")
    while True:
        best, best_ratio = None, 0.0
        for n in shapes:
            cur = opts[n][pick[n]]
            for j in range(pick[n] + 1, len(opts[n])):
                nxt = opts[n][j]
                cost = (nxt.eff_bits - cur.eff_bits) * size[n]
                if cost <= 0 or used + cost > budget:
                    continue
                ratio = (pred(n, cur) - pred(n, nxt)) / cost
                if ratio > best_ratio:
                    best, best_ratio = (n, j, cost), ratio
        if best is None:
            break
        n, j, cost = best
        pick[n] = j
        used += cost
    return {n: opts[n][pick[n]] for n in shapes}
