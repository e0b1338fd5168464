"""The `mnist32` quality benchmark (BENCHMARK.md): every (model, method) side by side in one run.

    python benchmarks/quality.py --size quick                       # RTN recipes + peers, both models
    python benchmarks/quality.py --size full --methods fp           # FP at 5,000 samples
    python benchmarks/quality.py --models mnist-unet --methods fp,w4a8,peer:hqq-4 -n 200 --out /tmp/x.json

Writes benchmarks/results/quality-<size>.json (rows + commit + machine + wall time) and a folder
of sample grids beside it; re-running resumes, skipping rows already written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffquant.bench import SIZES, run_quality
from diffquant.config import RECIPES
from diffquant.peers import PEERS

RTN = ["w8a8", "w4a8", "w3a8", "w2a8", "w4a6"]
DEFAULT_METHODS = ["fp", *RTN, *[f"peer:{p}" for p in PEERS]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mnist-unet,mnist-dit")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"fp, recipes ({', '.join(RECIPES)}), recipe .json files, peer:NAME ({', '.join(PEERS)})")
    ap.add_argument("--size", choices=sorted(SIZES), default="quick")
    ap.add_argument("-n", type=int, default=None, help="override the sample count of --size")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="seed of sample 0 (another seed gives FP's own noise level)")
    args = ap.parse_args(argv)
    n = args.n or SIZES[args.size]
    size = args.size if args.n is None else f"n{n}"
    out = args.out or Path(__file__).parent / "results" / f"quality-{size}.json"
    run_quality(args.models.split(","), args.methods.split(","), n, out, seed=args.seed, resume=not args.no_resume,
                size=size)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
