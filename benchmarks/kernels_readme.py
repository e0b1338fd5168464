"""The README's kernel tables, from results/kernels-epyc.json and kernels.json (the two CPUs),
kernels-e2e.json and the GPU runs (kernels-gpu.json, kernels-gpu-gemv.json).

    python benchmarks/kernels_readme.py          # rewrites README.md between the kernels markers
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- kernels:start -->", "<!-- kernels:end -->"
CPU_RUNS = ("kernels-epyc.json", "kernels.json")  # AMD EPYC (Zen 4), Intel Xeon (Cascade Lake)
E2E_RUNS = ("kernels-e2e-epyc.json", "kernels-e2e.json")


def kernel_table(doc: dict) -> str:
    rows = doc["rows"]
    tokens = sorted({r["tokens"] for r in rows})  # a convolution's tokens: batch x pixels
    by = {(r["layer"], r["config"], r["tokens"], r["impl"]): r for r in rows}
    head = ("| layer | config | FLOP bound | " + " | ".join(f"{t} tok" for t in tokens)
            + " | best / FLOP bound | vs aqlm (1 / 16 tok) |\n|---|---|---|" + "---|" * len(tokens) + "---|---|")
    lines = [head]
    for layer, cfg in dict.fromkeys((r["layer"], r["config"]) for r in rows):
        lut = [r for r in rows if r["layer"] == layer and r["config"] == cfg and r["impl"] == "diffquant_lut"]
        cells = [f"{by[(layer, cfg, t, 'diffquant_lut')]['speedup_vs_fp32']:.2f}x"
                 if (layer, cfg, t, "diffquant_lut") in by else "-" for t in tokens]
        vs = []
        for t in (1, 16):
            a, q = by.get((layer, cfg, t, "aqlm")), by.get((layer, cfg, t, "diffquant_lut"))
            vs.append(f"{a['median_ms'] / q['median_ms']:.1f}x" if a and q else "-")
        bound = lut[0]["flop_bound"]
        frac = max(r["speedup_vs_fp32"] for r in lut) / bound  # the measured fraction of the FLOP-count bound
        lines.append(f"| {layer} | {cfg} | {bound:.2f} | " + " | ".join(cells) + f" | {frac:.2f} | {' / '.join(vs)} |")
    return "\n".join(lines)


def timing(doc: dict) -> str:
    """How a kernel table's medians were taken (runs before passes existed: 20 rounds, one pass)."""
    if "passes" in doc:
        return f"median over {doc['passes']} passes of the median of {doc['reps']} rounds"
    return "median of 20 runs"


def older_shapes(doc: dict) -> str:
    """A note for runs from before convolutions were timed at batch (and LDM-4's at their own resolutions)."""
    convs = [r for r in doc["rows"] if r["kind"] == "conv3x3"]
    if convs and not any("batch" in r for r in convs):
        return ("; this run timed convolutions at batch 1 only, and LDM-4's at a quarter of their pixels "
                "(`conv192@32` is LDM-4's 192-channel level, which runs at 64x64)")
    return ""


def e2e_table(doc: dict) -> str:
    """Wall time as the median over rounds (with the minimum) and as a ratio to the same model's FP case."""
    lines = ["| case | wall (s), median | min | speed-up vs FP | weights held (MiB) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|"]
    wall = {r["case"]: r.get("wall_s", r.get("forward_s")) for r in doc["rows"]}
    for r in doc["rows"]:
        w, fp = wall[r["case"]], wall.get(r["case"].split(":")[0] + ":fp")
        low = r.get("wall_s_min", r.get("forward_s_min"))
        lines.append(f"| {r['case']} | {w:.2f} | {f'{low:.2f}' if low is not None else '-'} | "
                     f"{f'{fp / w:.2f}x' if fp else '-'} | {r['weights_held_mib']:.1f} | {r['peak_rss_mib']:.0f} |")
    same, zoo_same = doc.get("ldm4_same_process"), doc.get("zoo_same_process")
    if zoo_same:
        cells = [f"{m} {s:.2f} s ({zoo_same['speedup_vs_fp'][m]:.2f}x FP)" for m, s in zoo_same["wall_s"].items()]
        lines += ["", "The zoo cases sampled together in one process (rotated rounds; the like-for-like comparison): "
                  + ", ".join(cells) + "."]
    if same:
        cells = [f"{m} {s:.2f} s ({same['speedup_vs_fp'][m]:.2f}x FP)" for m, s in same["forward_s"].items()]
        lines += ["", "The LDM-4 cases timed together in one process (rotated rounds; the like-for-like "
                  "comparison): " + ", ".join(cells) + "."]
    else:
        gap = (f" ({wall['ldm4:fp'] / wall['ldm4:reference']:.2f}x here)"
               if "ldm4:fp" in wall and "ldm4:reference" in wall else "")
        lines += ["", "This run timed each case in its own process only. LDM-4's `reference` runs the same dense "
                  f"products as its FP case (no activation quantization), so its ratio to FP{gap} is the size of "
                  "the per-process gap described above, which the other ratios carry too. Rerun `kernels_e2e.py` "
                  "on this CPU for the one-process figures."]
    return "\n".join(lines)


TRITON = {"triton_gemv": "gemv", "triton_dequant": "dequant", "triton_mm": "mm"}  # fp32-exact paths


def gpu_table(full: dict, gemv: dict | None) -> str:
    """Per shape and token count: the best correct fp32-exact Triton path's speed-up over cuBLAS fp32,
    kernel time (CUDA-graph replay); then the TF32 product against cuBLAS TF32 and cuBLAS fp16's speed-up,
    for scale. The GEMV rows of `gemv` (a re-run after a bad
    autotune config was removed) replace those of `full`."""
    rows = [r for r in full["rows"] if "error" not in r]
    if gemv:
        rows = [r for r in rows if r["impl"] != "triton_gemv"] + [r for r in gemv["rows"] if r["impl"] == "triton_gemv"]
    tokens = sorted({r["tokens"] for r in rows})
    best: dict = {}
    fp16: dict = {}
    ms = {(r["layer"], r["config"], r["tokens"], r["impl"]): r["graph_ms"] for r in rows}
    for r in rows:
        key = (r["layer"], r["config"], r["tokens"])
        if r["impl"] == "cublas_fp16":
            fp16[key] = r["graph_speedup_vs_fp32"]
        if r["impl"] in TRITON and r["max_rel_error"] < 1e-3 and r["graph_speedup_vs_fp32"]:
            if key not in best or r["graph_speedup_vs_fp32"] > best[key][0]:
                best[key] = (r["graph_speedup_vs_fp32"], TRITON[r["impl"]])
    lines = ["| layer | config | " + " | ".join(f"{t} tok" for t in tokens)
             + " | mm-tf32 / cuBLAS tf32 (4096 tok) | cuBLAS fp16 (1 / 4096 tok) |",
             "|---|---|" + "---|" * len(tokens) + "---|---|"]
    for layer, cfg in dict.fromkeys((r["layer"], r["config"]) for r in rows):
        cells = [f"{best[(layer, cfg, t)][0]:.2f}x {best[(layer, cfg, t)][1]}" if (layer, cfg, t) in best else "-"
                 for t in tokens]
        f16 = " / ".join(f"{fp16[(layer, cfg, t)]:.2f}x" for t in (tokens[0], tokens[-1]) if (layer, cfg, t) in fp16)
        t32, m32 = ms.get((layer, cfg, tokens[-1], "cublas_tf32")), ms.get((layer, cfg, tokens[-1], "triton_mm_tf32"))
        tf = f"{t32 / m32:.2f}x" if t32 and m32 else "-"
        lines.append(f"| {layer} | {cfg} | " + " | ".join(cells) + f" | {tf} | {f16} |")
    return "\n".join(lines)


def gpu_e2e_table(full: dict) -> str:
    lines = ["| implementation | batch 1 (ms) | batch 8 (ms) | weights (MiB) | forward's own peak, batch 8 (MiB) |",
             "|---|---|---|---|---|"]
    for impl in dict.fromkeys(r["impl"] for r in full["e2e"]):
        by = {r["batch"]: r for r in full["e2e"] if r["impl"] == impl}
        lines.append(f"| {impl} | {by[1]['median_ms']:.1f} | {by[8]['median_ms']:.1f} | {by[1]['weight_mib']:.0f} | "
                     f"{by[8]['work_peak_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    res = ROOT / "benchmarks" / "results"
    parts: list[str] = []
    for name in CPU_RUNS:  # the same kernel on each CPU the project ran on
        if not (res / name).exists():
            continue
        k = json.loads((res / name).read_text())
        parts += [f"Speed-up of diffquant's lookup kernel over torch fp32 dense (`benchmarks/results/{name}`, commit "
                  f"{k['provenance']['commit']}, {k['provenance']['machine']['cpu']}, {k['threads']} threads; "
                  f"{timing(k)}; a convolution's tokens are batch x pixels, so `ldm4.conv960@8` at batch 1 "
                  f"is 64 tokens{older_shapes(k)}):", "", kernel_table(k), ""]
    parts = parts[:-1]
    for name in E2E_RUNS:
        if not (res / name).exists():
            continue
        e = json.loads((res / name).read_text())
        what = (f"zoo: {e['n']} images x 20 DDIM steps; " if e.get("unet") else "") + "ldm4: one forward at batch 1"
        parts += ["", f"End to end (`benchmarks/results/{name}`, commit {e['provenance']['commit']}, "
                      f"{e['provenance']['machine']['cpu']}; {what}; {e.get('rounds', 1)} rounds, "
                      "each case in a fresh process):", "", e2e_table(e)]
    gpu = res / "kernels-gpu.json"
    if gpu.exists():
        g = json.loads(gpu.read_text())
        gemv_path = res / "kernels-gpu-gemv.json"
        gv = json.loads(gemv_path.read_text()) if gemv_path.exists() else None
        parts += ["", f"GPU ({g['device']}, Triton {g['triton']}; `benchmarks/results/kernels-gpu.json`, commit "
                      f"{g['provenance']['commit']}" + (f", GEMV rows from `kernels-gpu-gemv.json`, commit "
                                                         f"{gv['provenance']['commit']}" if gv else "")
                  + "): the best correct fp32 Triton path's speed-up over cuBLAS fp32 (TF32 off), kernel time "
                    "(CUDA-graph replay of 20 calls, median of 10):", "", gpu_table(g, gv)]
        if "e2e" in g:
            parts += ["", "GPU end to end: DiT-XL/2's 112 linears (2x8 codes), one forward of 256 tokens per image, "
                          "eager:", "", gpu_e2e_table(g)]
    readme = ROOT / "README.md"
    text = readme.read_text()
    a, b = text.index(START) + len(START), text.index(END)
    readme.write_text(text[:a] + "\n" + "\n".join(parts) + "\n" + text[b:])


if __name__ == "__main__":
    main()
