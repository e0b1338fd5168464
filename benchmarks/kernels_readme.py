"""The README's kernel tables, from results/kernels.json and results/kernels-e2e.json.

    python benchmarks/kernels_readme.py          # rewrites README.md between the kernels markers
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- kernels:start -->", "<!-- kernels:end -->"


def kernel_table(doc: dict) -> str:
    rows = doc["rows"]
    tokens = sorted({r["tokens"] for r in rows if r["kind"] == "linear"})
    by = {(r["layer"], r["config"], r["tokens"], r["impl"]): r for r in rows}
    head = ("| layer | config | FLOP bound | " + " | ".join(f"{t} tok" for t in tokens)
            + " | vs aqlm (1 / 16 tok) |\n|---|---|---|" + "---|" * len(tokens) + "---|")
    lines = [head]
    for layer, cfg in dict.fromkeys((r["layer"], r["config"]) for r in rows):
        lut = [r for r in rows if r["layer"] == layer and r["config"] == cfg and r["impl"] == "diffquant_lut"]
        if lut[0]["kind"] == "linear":
            cells = [f"{by[(layer, cfg, t, 'diffquant_lut')]['speedup_vs_fp32']:.2f}x"
                     if (layer, cfg, t, "diffquant_lut") in by else "-" for t in tokens]
        else:  # a convolution has one token count: its pixels
            cells = ["-"] * len(tokens)
            cells[0] = f"{lut[0]['speedup_vs_fp32']:.2f}x at {lut[0]['tokens']} px"
        vs = []
        for t in (1, 16):
            a, q = by.get((layer, cfg, t, "aqlm")), by.get((layer, cfg, t, "diffquant_lut"))
            vs.append(f"{a['median_ms'] / q['median_ms']:.1f}x" if a and q else "-")
        bound = lut[0]["flop_bound"]
        lines.append(f"| {layer} | {cfg} | {bound:.2f} | " + " | ".join(cells) + f" | {' / '.join(vs)} |")
    return "\n".join(lines)


def e2e_table(doc: dict) -> str:
    lines = ["| case | wall (s) | weights held (MiB) | peak RSS (MiB) |", "|---|---|---|---|"]
    for r in doc["rows"]:
        wall = r.get("wall_s", r.get("forward_s"))
        lines.append(f"| {r['case']} | {wall:.2f} | {r['weights_held_mib']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    res = ROOT / "benchmarks" / "results"
    k = json.loads((res / "kernels.json").read_text())
    parts = [f"Speed-up of diffquant's lookup kernel over torch fp32 dense (`benchmarks/results/kernels.json`, commit "
             f"{k['provenance']['commit']}, {k['threads']} threads; median of 20 runs):", "", kernel_table(k)]
    e2e = res / "kernels-e2e.json"
    if e2e.exists():
        e = json.loads(e2e.read_text())
        parts += ["", f"End to end (`benchmarks/results/kernels-e2e.json`, commit {e['provenance']['commit']}; zoo: "
                      f"{e['n']} images x 20 DDIM steps; ldm4: one forward at batch 1):", "", e2e_table(e)]
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:a] + "\n" + "\n".join(parts) + "\n" + text[b:])


if __name__ == "__main__":
    main()
