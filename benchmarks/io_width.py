"""Would an 8-bit first and last layer rescue a Qua²SeDiMo mixed-precision recipe?

The paper's search space gives every layer 2-4 bits; diffquant's RTN and AQ recipes keep the first and
last layer at 8 bits. This probe, on the search space `benchmarks/sensitivity.py` built (its option
cache and label cache are reused), labels (same cheap label: FID to FP over 128 images):
- each uniform 4-bit configuration with its first / last layer at 4 bits and at UAQ-8;
- descents to each target with the first / last layer held at UAQ-8 (`descend(..., fixed=)`), from
  every uniform 4-bit start, keeping the method or taking any cheaper option, costed by the summed
  output error on calibration inputs (as the pipeline's AQ candidates are);
then writes the best-labelled one per target as a recipe and, with `--size`, measures it with full
metrics next to the shipped recipe and the uniform 4-bit ones (rows go to the same file
`mixed_quality.py` writes, so the protocol and the noise are the same).

    python benchmarks/io_width.py --model mnist-unet --target-bits 3.5 --size quick
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _rel(path: Path) -> Path:
    """`path` relative to the working directory where it lies below it: row names carry no machine's paths."""
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist-unet")
    ap.add_argument("--target-bits", default="3.5")
    ap.add_argument("--io-bits", type=int, default=8)
    ap.add_argument("--n", type=int, default=128, help="images per label (the sensitivity run's)")
    ap.add_argument("--size", choices=("quick", "full"), default=None, help="also measure the best recipe")
    ap.add_argument("--cache", type=Path, default=Path("runs/cache/sensitivity"))
    args = ap.parse_args(argv)

    import torch

    import diffquant as dq
    from diffquant.bench import SIZES, run_quality
    from diffquant.calibration.collect import collect
    from diffquant.io_utils import write_json
    from diffquant.nn.swap import io_layer_names
    from diffquant.provenance import provenance
    from diffquant.sensitivity.explain import descend
    from diffquant.sensitivity.predictor import summed_error
    from diffquant.sensitivity.sample import LabelConfig, Labeler, config_to_json, label_all
    from diffquant.sensitivity.space import Option, SearchSpace

    torch.set_num_threads(1)
    t0 = time.time()
    sens_dir = RESULTS / f"sensitivity-{args.model}"
    if not (sens_dir / "sensitivity.json").exists():
        raise SystemExit(f"{sens_dir / 'sensitivity.json'} is missing: run benchmarks/sensitivity.py --model "
                         f"{args.model} first")
    doc = json.loads((sens_dir / "sensitivity.json").read_text())
    cache = args.cache / args.model
    model, scheduler = dq.load(args.model)[:2]
    io_opt = Option("uaq", args.io_bits)
    options = [Option.parse(k) for k in doc["options"]] + [io_opt]
    calib = collect(model, scheduler, n=64, steps=20, progress=False)  # as the sensitivity pipeline collects it
    space = SearchSpace(model, options, cache_dir=cache / "space", calib=calib).build(progress=False)
    space.measure_output_error(calib)
    io_names = io_layer_names(model)
    fixed = {u: io_opt for u, ls in space.units.items() if set(ls) <= io_names}
    if not fixed:
        raise SystemExit(f"{args.model}: no unit is the first or last layer alone ({sorted(io_names)})")
    top = [o for o in options if o != io_opt and o.bits == max(p.bits for p in options if p != io_opt)]

    def cost(cs):
        return summed_error(space, cs, space.out_error)

    configs: dict[str, dict[str, Option]] = {}
    for o in top:
        configs[f"uniform-{o.key}"] = {u: o for u in space.units}
        configs[f"uniform-{o.key}-io{args.io_bits}"] = {u: fixed.get(u, o) for u in space.units}
    targets = [float(t) for t in args.target_bits.split(",")]
    for tb in targets:
        for o in top:
            for any_method in (False, True):
                try:
                    c = descend(space, o, tb, cost, any_method, fixed)
                except ValueError:  # this start cannot reach the target with the first / last layer held
                    continue
                configs[f"mp{tb:g}-io{args.io_bits}-{'any-method' if any_method else 'same'}-from-{o.key}"] = c
    labeler = Labeler(space, scheduler, LabelConfig(n=args.n))
    labels = dict(zip(configs, label_all(labeler, list(configs.values()), cache / f"labels-n{args.n}"), strict=True))
    out = {"benchmark": "io_width", "model": args.model, "io_bits": args.io_bits, "label_n": args.n,
           "io_units": sorted(fixed), "labels": {k: {f: v[f] for f in ("key", "bits", "fid_to_fp", "mse_to_fp")}
                                                  for k, v in labels.items()},
           "shipped": {k: v["label"] for k, v in doc["recipes"].items() if "label" in v}, "picked": {}}
    rec_dir = RESULTS / f"io-width-{args.model}"
    rec_dir.mkdir(exist_ok=True)
    for tb in targets:
        mine = [k for k in labels if k.startswith(f"mp{tb:g}-")]
        if not mine:
            continue
        best = min(mine, key=lambda k: labels[k]["fid_to_fp"])
        name = f"{args.model}-mp{tb:g}-io{args.io_bits}"
        space.to_recipe(configs[best], name).to_json(rec_dir / f"{name}.json")
        out["picked"][name] = {"from": best, "config": config_to_json(configs[best]), "label": out["labels"][best]}
    if args.size:
        shipped = [f"{args.model}-mp{tb:g}" for tb in targets if f"{args.model}-mp{tb:g}" in doc["recipes"]]
        uniform = [f"{args.model}-uniform-{o.key}" for o in top]
        methods = (["fp"] + [str(_rel(sens_dir) / f"{n}.json") for n in shipped + uniform]
                   + [str(_rel(rec_dir) / f"{n}.json") for n in out["picked"]])
        rows_file = RESULTS / f"quality-{args.size}-{args.model}-mixed.json"
        rows = run_quality([args.model], methods, SIZES[args.size], rows_file, size=args.size)["rows"]
        by = {Path(r["method"]).stem: r for r in rows if r["method"] in methods and r["method"] != "fp"}
        out["quality"] = {"rows_file": rows_file.name, "size": args.size,
                          "fid_to_fp": {k: v["fid_to_fp"] for k, v in by.items()},
                          "effective_bits": {k: v["effective_bits"] for k, v in by.items()}}
    out["wall_time_s"] = round(time.time() - t0, 1)
    out.update(provenance())
    write_json(RESULTS / f"io-width-{args.model}.json", out)
    for k, v in out["labels"].items():
        print(f"{k:48s} bits {v['bits']:.2f}  label FID-to-FP {v['fid_to_fp']:.3f}  MSE {v['mse_to_fp']:.5f}")
    for k, v in out.get("quality", {}).get("fid_to_fp", {}).items():
        print(f"{args.size} {k:40s} FID-to-FP {v:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
