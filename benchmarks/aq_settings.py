"""Which (M, B, g) should a layer get under a bit budget? The layer-wise error of the setting each
ranking rule picks, on real layers of the zoo models with their real calibration Gram matrices.

Three rules choose among the settings whose effective bits (codes, fp16 codebooks, fp16 scales) fit:
  - `code_bits`: the most code bits per weight (the rule before pairs and the per-codebook allowance);
    codewords of 4, 8 or 16 inputs, or one kernel slice (also on a convolution of one input channel,
    where the slice is the whole filter);
  - `rate_bits` (diffquant's `choose_spec`): codewords of 2 inputs too, and on codewords of at most 4
    weights each codebook beyond the first counts a quarter bit less (`aquatic.EXTRA_CODEBOOK_BITS`),
    and a one-input-channel convolution is grouped like a linear layer;
  - `rate_bits_all`: the same allowance on every codeword length, kernel slices included (the
    alternative the shipped rule was chosen against; only searched where it picks differently).
Each picked setting is searched with the recipes' default search (`AQSearch()`), and its relative
error ||(W - W^) X||^2 / ||W X||^2 is written side by side, with the ratios to `code_bits`.

    python benchmarks/aq_settings.py --models mnist-dit,mnist-unet \
        --out benchmarks/results/aq-settings.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from diffquant.bench import Protocol
from diffquant.formats.additive import AdditiveSpec
from diffquant.io_utils import write_json
from diffquant.methods.aquatic import (
    EXTRA_CODEBOOK_BITS,
    AQSearch,
    choose_spec,
    gram,
    quantize_layer,
    rate_bits,
    spec_options,
)
from diffquant.models import load
from diffquant.nn.swap import quantizable_layers
from diffquant.provenance import provenance


def one_channel_conv(shape: tuple[int, ...]) -> bool:
    return len(shape) == 4 and shape[1] == 1 and math.prod(shape[2:]) > 1


def _pick(shape: tuple[int, ...], budget: float, rank, earlier: bool = False):
    """Of the settings that fit, the highest `rank`; ties to fewer codebooks then longer codewords.
    `earlier`: the options before pairs, and with one kernel slice on one-input-channel convolutions."""
    out, d = shape[0], math.prod(shape[1:])
    if earlier and one_channel_conv(shape):
        opts = [AdditiveSpec(m, b, d) for m in range(1, 9) for b in range(4, 13)]
    else:
        opts = [s for s in spec_options(shape) if not earlier or s.group != 2]
    fits = [s for s in opts if s.effective_bits(out, d) <= budget]
    return max(fits, key=lambda s: (round(rank(s), 6), -s.codebooks, s.group)) if fits else None


def code_bits_pick(shape: tuple[int, ...], budget: float):
    """The earlier rule: most code bits, no pairs, KAQ on every k x k convolution."""
    return _pick(shape, budget, lambda s: s.code_bits_per_weight, earlier=True)


def rate_bits_all_pick(shape: tuple[int, ...], budget: float):
    """The allowance applied to every codeword length."""
    return _pick(shape, budget, lambda s: s.code_bits_per_weight - EXTRA_CODEBOOK_BITS * (s.codebooks - 1))


def representative_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The first layer of each distinct weight shape (layers of one shape get the same choices)."""
    seen, out = set(), {}
    for name, mod in quantizable_layers(model).items():
        shape = tuple(mod.weight.shape)
        if shape not in seen:
            seen.add(shape)
            out[name] = mod
    return out


def summarize(rows: list[dict]) -> dict:
    """Per model, budget and kind of layer (flat: linear and 1x1, codewords of at most 16 inputs;
    kernel_slice: k x k convolutions; one_channel_conv: k x k of one input channel, a patch embedding):
    how many layers each rule changed, and the range and geometric mean of their error ratios."""
    out: dict = {}
    for r in rows:
        shape = tuple(r["shape"])
        kind = ("one_channel_conv" if one_channel_conv(shape) else
                "kernel_slice" if len(shape) == 4 and math.prod(shape[2:]) > 1 else "flat")
        for rule in ("rate_bits", "rate_bits_all"):
            ratio = r.get(f"error_ratio_{rule}_vs_code_bits")
            if ratio is None or r[rule]["spec"] == r["code_bits"]["spec"]:
                continue
            out.setdefault(f"{r['model']} {kind} @{r['budget']:g} {rule}", []).append(ratio)
    return {k: {"changed_layers": len(v), "min_ratio": min(v), "max_ratio": max(v),
                "geomean_ratio": math.exp(sum(math.log(x) for x in v) / len(v))} for k, v in sorted(out.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist-dit,mnist-unet")
    ap.add_argument("--budgets", default="2,3,4", help="effective-bit budgets, comma-separated")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summary-only", action="store_true", help="recompute the summary of an existing --out")
    args = ap.parse_args()
    if args.summary_only:
        doc = json.loads(args.out.read_text())
        doc["summary"] = summarize(doc["rows"])
        write_json(args.out, doc)
        return
    budgets = [float(b) for b in args.budgets.split(",")]
    proto = Protocol(n=1)
    rows, t0 = [], time.time()
    for model_name in args.models.split(","):
        model, _ = load(model_name)
        calib = proto.calibration(model_name)
        for name, mod in representative_layers(model).items():
            shape = tuple(mod.weight.shape)
            out_f, d = shape[0], math.prod(shape[1:])
            h = gram(mod, calib.inputs[name], AQSearch().damp)
            cache: dict = {}
            for budget in budgets:
                try:
                    new = choose_spec(shape, budget)
                except ValueError:
                    continue
                old = code_bits_pick(shape, budget)
                row = {"model": model_name, "layer": name, "shape": list(shape), "budget": budget}
                alt = rate_bits_all_pick(shape, budget)
                for rule, spec in (("code_bits", old), ("rate_bits", new), ("rate_bits_all", alt)):
                    if spec is None or (rule == "rate_bits_all" and spec == new):
                        continue
                    if spec not in cache:
                        cache[spec] = quantize_layer(mod.weight.data, h, spec, name=name).rel_error
                    row[rule] = {"spec": spec.label,
                                 "effective_bits": round(spec.effective_bits(out_f, d), 4),
                                 "code_bits": round(spec.code_bits_per_weight, 4),
                                 "rate_bits": round(rate_bits(spec), 4), "rel_error": cache[spec]}
                if "code_bits" in row:
                    for rule in ("rate_bits", "rate_bits_all"):
                        if rule in row:
                            ratio = row[rule]["rel_error"] / row["code_bits"]["rel_error"]
                            row[f"error_ratio_{rule}_vs_code_bits"] = ratio
                rows.append(row)
                ratios = "  ".join(f"{k[12:]} {v:.3f}" for k, v in row.items() if k.startswith("error_ratio_"))
                print(f"{model_name} {name} {shape} @{budget}: {row.get('code_bits', {}).get('spec')} -> "
                      f"{row['rate_bits']['spec']}  {ratios}", flush=True)
    write_json(args.out, {"summary": summarize(rows), "rows": rows, "wall_s": round(time.time() - t0, 1),
                          **provenance()})


if __name__ == "__main__":
    main()
