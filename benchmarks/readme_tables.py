"""Writes the README's result tables from the JSON in benchmarks/results (between the markers
`<!-- tables:start -->` and `<!-- tables:end -->`), so the README never quotes a number by hand.

    python benchmarks/readme_tables.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from summarize import table  # noqa: E402

ROOT = Path(__file__).parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ORDER = ["fp", "w8a8", "w4a8", "w4a6", "w3a8", "w2a8", "w4a16", "w3a16", "w2a16", "aq-w4a8", "aq-w3a8", "aq-w2a8",
         "aq-w1.5a8", "aq-w4a8-noft", "aq-w3a8-noft", "aq-w2a8-noft", "aq-w1.5a8-noft", "aq-w2a8-semipv", "aq-w2a8-pv",
         "aq-w2a8-flat", "aq-w2a8-nolaq"]


def _key(r: dict) -> tuple:
    m = r["method"]
    return (ORDER.index(m), 0) if m in ORDER else (len(ORDER), m)


def _header(docs: list[dict], names: list[str]) -> str:
    """Each file with its sample count, commit, wall time and machine (files of one section can come from
    different machines: the numbers are machine-independent, the wall times are not)."""
    parts = []
    for d, n in zip(docs, names, strict=True):
        m = d.get("machine", {})
        parts.append(f"`{n}` (n={d['n']}, commit {d.get('commit', '?')[:10]}, wall {d.get('wall_time_s')} s, "
                     f"{m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')})")
    return ", ".join(parts)


def section(title: str, files: list[str], model: str) -> str:
    docs = [json.loads((RESULTS / f).read_text()) for f in files if (RESULTS / f).exists()]
    names = [f for f in files if (RESULTS / f).exists()]
    if not docs:
        return ""
    rows = sorted([r for d in docs for r in d["rows"] if r["model"] == model], key=_key)
    return f"**{title}**: {_header(docs, names)}\n\n{table(rows)}\n"


def _calibration_name(suffix: str) -> str:
    """'-accuquant-refine-m8' -> 'AccuQuant M=8 from the per-step solution' (M = 4 where none is named)."""
    if suffix in ("", "-perstep"):
        return {"": "RTN", "-perstep": "per-step (Q-Diffusion)"}[suffix]
    parts = suffix.split("-")[2:]
    m = next((p[1:] for p in parts if p.startswith("m")), "4")
    return (f"AccuQuant M={m}" + (", balanced" if "bal" in parts else "")
            + (" from the per-step solution" if "refine" in parts else "")
            + (", worse units kept at their start" if "keep" in parts else ""))


def accuquant_ratios(files: list[str], model: str, label: str) -> str:
    """FID-to-FP of every calibration of one setting, and its ratio to the per-step baseline's; rows from
    several result files (same size and seed), the first file's row winning where two hold one method."""
    files = [f for f in files if (RESULTS / f).exists()]
    if not files:
        return ""
    rows = {}
    for f in reversed(files):
        rows.update({r["method"]: r for r in json.loads((RESULTS / f).read_text())["rows"] if r["model"] == model})
    out = ["| setting | calibration | FID-to-FP | / per-step | class acc. | PSNR | SSIM |",
           "|---|---|---|---|---|---|---|"]
    for setting in ("w4a8", "w3a8", "w3a6"):
        base = rows.get(f"{setting}-perstep")
        for suffix in ("", "-perstep", "-accuquant-m2", "-accuquant-m2-keep", "-accuquant", "-accuquant-keep",
                       "-accuquant-m8", "-accuquant-m8-keep", "-accuquant-bal", "-accuquant-refine-m2",
                       "-accuquant-refine", "-accuquant-refine-m8"):
            r = rows.get(setting + suffix)
            if r is None:
                continue
            ratio = f"{r['fid_to_fp'] / base['fid_to_fp']:.2f}x" if base else "-"
            out.append(f"| {setting.upper()} | {_calibration_name(suffix)} | {r['fid_to_fp']:.3f} | {ratio} | "
                       f"{r['class_accuracy']:.3f} | {r['psnr']:.2f} | {r['ssim']:.3f} |")
    where = ", ".join(f"`{f}`" for f in files)
    return (f"**{label}, calibration objectives (1,000 samples; {where})**: FID-to-FP against the per-step "
            "baseline's at the same setting (target for AccuQuant: at most 0.7x)\n\n" + "\n".join(out) + "\n")


def noise_verdicts(file: str, model: str, label: str) -> str:
    """FP's band per metric over its seeds, then every quantized row: FID-to-FP against FP's own rerun,
    and the metrics on which it falls outside the band (z in FP standard deviations)."""
    path = RESULTS / file
    doc = json.loads(path.read_text()) if path.exists() else {"models": {}}
    if model not in doc["models"]:
        return ""
    d = doc["models"][model]
    names = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "precision", "recall": "recall",
             "class_accuracy": "accuracy"}
    band = ", ".join(f"{names[m]} {b['band'][0]:.3f}-{b['band'][1]:.3f}" for m, b in d["bands"].items())
    out = [f"**{label}, within noise of FP? (`{file}`, commit {doc['commit'][:10]})**: FP at seeds "
           f"{', '.join(str(s) for s in d['seeds'])}; 95% band of one more FP run: {band}. FP rerun at another "
           f"seed scores FID-to-FP {d['fp_rerun_fid_to_fp_mean']:.4f} (mean).", "",
           "| method | file | bits | FID-to-FP | / FP rerun | outside FP's band (z) |", "|---|---|---|---|---|---|"]
    for j in sorted(d["judged"], key=lambda j: j["fid_to_fp"]):
        outside = ", ".join(f"{names[m]} ({j['metrics'][m]['z']:+.1f})" for m in j["outside_band_on"]) or "none"
        method = j["method"].rsplit("/", 1)[-1].removesuffix(".json")
        bits = f"{j['effective_bits']:.2f}" if j.get("effective_bits") is not None else "-"
        out.append(f"| {method} | {j['file'].removeprefix('quality-').removesuffix('.json')} | {bits} | "
                   f"{j['fid_to_fp']:.4f} | {j['fid_to_fp_over_fp_rerun']:.2f}x | {outside} |")
    return "\n".join(out) + "\n"


def main() -> int:
    blocks = [
        section("U-Net, full size (5,000 samples)", ["quality-full-mnist-unet.json",
                                                     "quality-full-mnist-unet-perstep.json"], "mnist-unet"),
        section("DiT, full size (5,000 samples)", ["quality-full-mnist-dit.json", "quality-full-mnist-dit-peers.json",
                                                    "quality-full-mnist-dit-abl.json",
                                                    "quality-full-mnist-dit-flat.json",
                                                    "quality-full-mnist-dit-kaq.json",
                                                    "quality-full-mnist-dit-perstep.json"], "mnist-dit"),
        section("U-Net, quick size (1,000 samples)", ["quality-quick-mnist-unet.json"], "mnist-unet"),
        section("DiT, quick size (1,000 samples)", ["quality-quick-mnist-dit.json", "quality-quick-mnist-dit-aq.json"],
                "mnist-dit"),
        section("AQ recipes after the (M, B, g) rule change (pairs, one codebook preferred; "
                "`benchmarks/aq_settings.py`), DiT, full size", ["quality-full-mnist-dit-pairs.json"], "mnist-dit"),
        section("AQ recipes after the (M, B, g) rule change, U-Net, full size",
                ["quality-full-mnist-unet-pairs.json"], "mnist-unet"),
        section("AQ recipes after the (M, B, g) rule change, U-Net, quick size",
                ["quality-quick-mnist-unet-pairs.json"], "mnist-unet"),
        section("AQ recipes after the (M, B, g) rule change, DiT, quick size",
                ["quality-quick-mnist-dit-pairs.json"], "mnist-dit"),
        section("A8 ranges per timestep (act mode `timestep`), DiT, quick size",
                ["quality-quick-mnist-dit-ts.json", "quality-quick-mnist-dit-ts-aq.json"], "mnist-dit"),
        section("A8 ranges per timestep and per token, U-Net, quick size", ["quality-quick-mnist-unet-ts.json"],
                "mnist-unet"),
        accuquant_ratios(["quality-quick-mnist-unet-accuquant.json", "quality-quick-mnist-unet-accuquant-m2.json",
                          "quality-quick-mnist-unet-accuquant-m8.json", "quality-quick-mnist-unet-accuquant-keep.json"],
                         "mnist-unet", "U-Net"),
        accuquant_ratios(["quality-quick-mnist-dit-accuquant.json", "quality-quick-mnist-dit-accuquant-b.json",
                          "quality-quick-mnist-dit-accuquant-c.json", "quality-quick-mnist-dit-accuquant-m2.json",
                          "quality-quick-mnist-dit-accuquant-m8.json"], "mnist-dit", "DiT"),
        section("FP with other noise (seeds 10,000+): the seed-to-seed noise of each metric, U-Net",
                ["quality-quick-fp-seed10000.json"], "mnist-unet"),
        section("FP with other noise, DiT", ["quality-quick-fp-seed10000.json"], "mnist-dit"),
        section("FP with other noise, U-Net, full size (5,000 samples)", ["quality-full-fp-seed10000.json"],
                "mnist-unet"),
        section("FP with other noise, DiT, full size (5,000 samples)", ["quality-full-fp-seed10000.json"],
                "mnist-dit"),
        noise_verdicts("fp-noise-full.json", "mnist-unet", "U-Net, full size"),
        noise_verdicts("fp-noise-full.json", "mnist-dit", "DiT, full size"),
    ]
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- tables:start -->", "<!-- tables:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {start} / {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + start + "\n" + "\n".join(b for b in blocks if b) + end + tail)
    print(f"wrote {len(blocks)} tables into {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
