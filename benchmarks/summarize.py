"""Markdown tables from benchmark JSON files (what the README and the issue notes quote).

    python benchmarks/summarize.py benchmarks/results/quality-quick.json [more.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLS = [("method", "{}"), ("effective_bits", "{:.2f}"), ("checkpoint_bytes", "{:,}"), ("fp32_size_ratio", "{:.1f}x"),
        ("fid", "{:.2f}"),
        ("sfid", "{:.2f}"), ("is", "{:.2f}"), ("precision", "{:.3f}"), ("recall", "{:.3f}"),
        ("fid_to_fp", "{:.3f}"), ("class_accuracy", "{:.3f}"), ("psnr", "{:.2f}"), ("ssim", "{:.3f}")]


def table(rows: list[dict]) -> str:
    rows = [{**r, "fp32_size_ratio": r["fp32_checkpoint_bytes"] / r["checkpoint_bytes"]}
            if r.get("fp32_checkpoint_bytes") and r.get("checkpoint_bytes") else r for r in rows]
    lines = ["| " + " | ".join(c for c, _ in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        lines.append("| " + " | ".join(f.format(r[c]) if r.get(c) is not None else "-" for c, f in COLS) + " |")
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    for p in paths:
        doc = json.loads(Path(p).read_text())
        m = doc.get("machine", {})
        print(f"### {Path(p).name}: n={doc['n']}, commit {doc.get('commit', '?')[:12]}, {m.get('cpu')} "
              f"({m.get('cores')} cores), torch {m.get('torch')}, wall {doc.get('wall_time_s')} s\n")
        for model in dict.fromkeys(r["model"] for r in doc["rows"]):
            print(f"**{model}**\n")
            print(table([r for r in doc["rows"] if r["model"] == model]))
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
