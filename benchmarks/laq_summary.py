"""Where LAQ spent the bits: the weight-averaged effective bits of each layer kind, per AQ recipe, from
the per-layer allocation a quality run recorded (`laq` in each row).

    python benchmarks/laq_summary.py benchmarks/results/quality-quick-mnist-unet.json \
        --out benchmarks/results/laq-summary-mnist-unet.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from diffquant.io_utils import write_json
from diffquant.models import load
from diffquant.nn.swap import quantizable_layers
from diffquant.provenance import provenance

KINDS = ("time_emb_proj", "time_embedding", "conv_shortcut", "downsamplers", "upsamplers", "to_q", "to_k", "to_v",
         "to_out", "conv1", "conv2", "attn1", "ff.net", "norm1.linear", "proj_out", "pos_embed", "emb")


def kind(name: str) -> str:
    return next((k for k in KINDS if k in name), name.rsplit(".", 1)[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    doc = json.loads(args.results.read_text())
    sizes: dict[str, dict[str, int]] = {}
    out = {"source": str(args.results), "recipes": {}}
    for row in doc["rows"]:
        if "laq" not in row:
            continue
        model = row["model"]
        if model not in sizes:
            sizes[model] = {n: m.weight.numel() for n, m in quantizable_layers(load(model)[0]).items()}
        acc = defaultdict(lambda: [0.0, 0])
        at8 = []
        for name, e in row["laq"].items():
            w = sizes[model][name]
            acc[kind(name)][0] += w * e["effective_bits"]
            acc[kind(name)][1] += w
            if e["budget"] == 0.0:
                at8.append(name)
        out["recipes"][f"{model}/{row['method']}"] = {
            "effective_bits": row["effective_bits"],
            "bits_by_kind": {k: round(a / b, 3) for k, (a, b) in sorted(acc.items())},
            "kept_at_8bit": at8,
        }
        print(row["method"], out["recipes"][f"{model}/{row['method']}"]["bits_by_kind"])
    out.update(provenance())
    write_json(args.out, out)


if __name__ == "__main__":
    main()
