"""Reconstruction hyper-parameters, side by side in one run: learning rate, rounding-regulariser
weight and iterations for one recipe's calibration (default: the per-step baseline at W3A6), scored
by the PSNR of 128 final samples against the FP model's from the same noise (a cheap, paired score;
`quality.py` gives the full metrics). This is the sweep behind `ReconConfig`'s defaults.

    python benchmarks/recon_sweep.py --model mnist-unet --recipe w3a6-perstep

Each finished variant is kept in the JSON at once; a rerun skips the variants already there for the
same model, recipe and commit-independent settings.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# (label, ReconConfig overrides): the learning rate at the default iterations, the regulariser weight
# at the chosen learning rate, and more iterations
VARIANTS = [
    ("lr=1e-3", {"lr": 1e-3}),
    ("lr=1e-2", {"lr": 1e-2}),
    ("lr=3e-2", {"lr": 3e-2}),
    ("lr=0.1", {"lr": 0.1}),
    ("lr=0.1 reg=0.01", {"lr": 0.1, "reg": 0.01}),
    ("lr=0.1 reg=10", {"lr": 0.1, "reg": 10.0}),
    ("lr=3e-2 iters=640", {"lr": 3e-2, "iters": 640}),
    # the compute control for AccuQuant's refinement of the per-step solution: as many more iterations
    ("lr=0.1 iters=320", {"lr": 0.1, "iters": 320}),
]


def psnr_to_fp(model, fp_images: torch.Tensor, scheduler, labels, seed: int) -> dict:
    from diffquant.pipelines import sample

    x = sample(model, scheduler, labels, seed=seed).float()
    mse = float(((x - fp_images) ** 2).mean())
    rng = float(fp_images.max() - fp_images.min())
    return {"psnr": round(10 * float(torch.log10(torch.tensor(rng ** 2 / mse))), 3), "mse": mse}


def sweep_parser(description: str, model: str) -> argparse.ArgumentParser:
    """The options every variant sweep has: the model, the sample count, a subset of variants, the JSON."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=model)
    ap.add_argument("-n", type=int, default=128, help="final samples scored against FP")
    ap.add_argument("--only", default=None, help="comma-separated variant labels (default: all)")
    ap.add_argument("--json", type=Path, default=None)
    return ap


def selected(variants: list, only: str | None) -> list:
    names = None if only is None else only.split(",")
    if names is not None and (unknown := set(names) - {label for label, _ in variants}):
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {[label for label, _ in variants]}")
    return [v for v in variants if names is None or v[0] in names]


def open_sweep(out: Path) -> dict:
    """The sweep's JSON so far (a rerun skips the variants already in it)."""
    return json.loads(out.read_text()) if out.exists() else {"rows": {}}


def save_sweep(out: Path, doc: dict, header: dict, t0: float | None = None) -> None:
    """Writes the rows with the header and provenance; with `t0`, the run's wall time too (the final write)."""
    from diffquant.io_utils import write_json
    from diffquant.provenance import provenance

    doc.update({**header, "rows": doc["rows"], **provenance()})
    if t0 is not None:
        doc["wall_time_s"] = round(time.time() - t0, 1)
    write_json(out, doc)


def main(argv: list[str] | None = None) -> int:
    ap = sweep_parser(__doc__, "mnist-unet")
    ap.add_argument("--recipe", default="w3a6-perstep")
    args = ap.parse_args(argv)

    import diffquant as dq
    from diffquant.config import get_recipe
    from diffquant.methods.accuquant import ReconConfig
    from diffquant.pipelines import balanced_labels, sample

    torch.set_num_threads(1)
    out = args.json or RESULTS / f"recon-sweep-{args.model}-{args.recipe}.json"
    base = get_recipe(args.recipe)
    if base.recon is None:
        raise SystemExit(f"{args.recipe} has no reconstruction to sweep; pick a *-perstep or *-accuquant recipe")
    variants = selected(VARIANTS, args.only)
    doc = open_sweep(out)
    header = {"benchmark": "recon_sweep", "model": args.model, "recipe": args.recipe, "n": args.n, "sample_seed": 777}
    t0 = time.time()
    model, scheduler = dq.load(args.model)[:2]
    calib = dq.collect(model, scheduler, n=64, steps=20, progress=False)
    labels, seed = balanced_labels(args.n), header["sample_seed"]
    fp_images = sample(model, scheduler, labels, seed=seed).float()
    rows = doc["rows"]
    if "rtn" not in rows:
        q = dq.quantize_(copy.deepcopy(model), dataclasses.replace(base, recon=None), calib=calib, scheduler=scheduler)
        rows["rtn"] = {"settings": None, **psnr_to_fp(q, fp_images, scheduler, labels, seed), "seconds": 0.0}
    for label, over in variants:
        settings = dataclasses.asdict(ReconConfig(**{**dataclasses.asdict(base.recon), **over}))
        if label in rows and rows[label]["settings"] == settings:
            continue
        t = time.time()
        cfg = dataclasses.replace(base, recon=ReconConfig(**settings))
        q = dq.quantize_(copy.deepcopy(model), cfg, calib=calib, scheduler=scheduler, progress=False)
        units = q.dq_recon_log["units"]
        rows[label] = {"settings": settings, **psnr_to_fp(q, fp_images, scheduler, labels, seed),
                       "seconds": round(time.time() - t, 1),
                       "loss_after_over_rtn": {u: round(v["loss_after"] / v["loss_rtn"], 4) for u, v in units.items()}}
        print(f"{label}: PSNR {rows[label]['psnr']} dB ({rows[label]['seconds']} s)", flush=True)
        save_sweep(out, doc, header)  # after every variant: an interrupted sweep keeps what it finished
    save_sweep(out, doc, header, t0)
    print({k: v["psnr"] for k, v in rows.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
