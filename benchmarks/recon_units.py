"""What the multi-step objective did to each unit: its end-of-group probe loss before and after
the unit learned, for every reconstruction row of the quality files.

Why: a refinement (`*-accuquant-refine*`) starts each unit from the per-step solution, so a unit whose
probe loss rose would be a reason for a guard that keeps the per-step state. This reads the
reconstruction log that `benchmarks/quality.py` stores with every row (`recon.units`: `loss_rtn`, the
unit's loss when it starts learning, and `loss_after`) and says whether any unit got worse, and
whether the guard (`ReconConfig.keep_start`, the `*-keep` recipes) gave such a unit its start back.

    python benchmarks/recon_units.py --out benchmarks/results/recon-units.json [FILES...]
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from diffquant.io_utils import write_json
from diffquant.provenance import provenance

DEFAULT_GLOB = "benchmarks/results/quality-quick-mnist-*-accuquant*.json"


def unit_rows(path: Path) -> list[dict]:
    """One entry per reconstruction row: the method, its FID-to-FP and every unit's loss ratio."""
    doc = json.loads(path.read_text())
    out = []
    for r in doc.get("rows", []):
        rec = r.get("recon")
        if not rec or "units" not in rec:
            continue
        units = {u: {"start": v["loss_rtn"], "after": v["loss_after"], "ratio": v["loss_after"] / v["loss_rtn"],
                     "kept_start": bool(v.get("kept_start", False))}  # (rows before keep_start: never)
                 for u, v in rec["units"].items()}
        ratios = [v["ratio"] for v in units.values()]
        cfg = rec.get("config", {})
        multi = cfg.get("objective") == "accuquant"
        out.append({"file": path.name, "model": r["model"], "method": r["method"], "fid_to_fp": r.get("fid_to_fp"),
                    "objective": cfg.get("objective"), "keep_start": bool(cfg.get("keep_start", False)),
                    "group_steps": cfg.get("group_steps") if multi else None,
                    "from_perstep": bool(multi and cfg.get("from_perstep")),
                    "calib_seconds": rec.get("seconds"), "units": units,
                    "ratio_min": min(ratios), "ratio_max": max(ratios), "units_worse": sum(x > 1 for x in ratios),
                    "units_kept_start": sum(v["kept_start"] for v in units.values())})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help=f"quality JSON files (default: {DEFAULT_GLOB})")
    ap.add_argument("--out", default="benchmarks/results/recon-units.json")
    args = ap.parse_args()
    files = [Path(f) for f in (args.files or sorted(glob.glob(DEFAULT_GLOB)))]
    if not files:
        raise SystemExit(f"no quality files found (looked for {DEFAULT_GLOB}); pass their paths")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise SystemExit(f"no such quality file: {', '.join(missing)}; pass files written by benchmarks/quality.py")
    rows = [row for f in files for row in unit_rows(f)]
    print(f"{'model':<11} {'method':<28} {'M':>2} {'FID-to-FP':>9} {'unit ratio min-max':>19} worse")
    for r in rows:
        print(f"{r['model']:<11} {r['method']:<28} {r['group_steps'] or '-':>2} {r['fid_to_fp']:9.4f} "
              f"{r['ratio_min']:8.3f} - {r['ratio_max']:.3f} {r['units_worse']:>5}")
    summary = {"rows": len(rows)}
    for kind, keep in (("refine", lambda r: r["from_perstep"]),
                       ("scratch", lambda r: r["objective"] == "accuquant" and not r["from_perstep"]),
                       ("perstep", lambda r: r["objective"] == "perstep")):
        part = [r for r in rows if keep(r)]
        summary |= {f"{kind}_rows": len(part), f"{kind}_units": sum(len(r["units"]) for r in part),
                    f"{kind}_units_worse": sum(r["units_worse"] for r in part),
                    f"{kind}_units_kept_start": sum(r["units_kept_start"] for r in part),
                    f"{kind}_ratio_max": max((r["ratio_max"] for r in part), default=None)}
    print(json.dumps(summary))
    for r in rows:
        for u, v in r["units"].items():
            if v["ratio"] > 1:
                print(f"  worse: {r['model']} {r['method']} {u}: {v['start']:.4g} -> {v['after']:.4g} "
                      f"({v['ratio']:.2f}x){', start kept' if v['kept_start'] else ''}")
    write_json(args.out, {"benchmark": "recon-units", "summary": summary, "rows": rows, **provenance()})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
