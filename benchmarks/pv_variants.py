"""SeMI-PV's V step, side by side in one run: how often codes move, how many of those moves stick, and
what the fine-tuned model is worth, for variants of the code update on the same layer-wise AQ model.

    python benchmarks/pv_variants.py --model mnist-dit --bits 2

Every variant starts from the same `aq-wBa8-noft` model (`aq-w4a8` at 4 bits) (layer-wise AQ, no fine-tuning; its layers
come from the quality benchmark's cache) and runs SeMI-PV with the recipe's settings plus the
variant's overrides. Scores: PSNR of 128 final samples against the FP model's from the same noise
(noise the fine-tuning never saw), the held-out distillation loss of the state kept, and the code
statistics: `code_moves` (accepted moves) against `codes_changed` (net: a code moved and moved back
counts 0). Each finished variant is written at once; a rerun skips variants already there with
the same settings.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path

import torch
from recon_sweep import open_sweep, psnr_to_fp, save_sweep, selected, sweep_parser  # same score, same file

RESULTS = Path(__file__).parent / "results"
# (label, PVConfig overrides). alpha sets how far the V step's target lies from the current weights
# (a fraction of the row's rms along the normalised gradient): a group changes code only when that
# target is nearer another codeword. The gradient behind a V step is summed over the last `v_every`
# training steps, and batch k holds items of denoising step k mod 20: with v_every=10, V steps
# alternate between the noisy and the clean half of the trajectory; with 20 each sees all of it.
VARIANTS = [
    ("default", {}),
    ("alpha=0.2", {"v_alpha": 0.2}),
    ("P only", {"v_every": 0}),
    ("tabu", {"v_tabu": True}),
    ("v_every=20", {"v_every": 20, "v_fraction": 0.004}),
    ("steps=600", {"steps": 600}),
    # P only, longer and with a smaller step: whether the 4-bit result has more to give
    ("P only steps=600", {"v_every": 0, "steps": 600}),
    ("P only lr=3e-4 steps=600", {"v_every": 0, "lr": 3e-4, "steps": 600}),
]


def main(argv: list[str] | None = None) -> int:
    ap = sweep_parser(__doc__, "mnist-dit")
    ap.add_argument("--bits", default="2", choices=("4", "3", "2", "1.5"), help="the AQ budget")
    args = ap.parse_args(argv)

    import diffquant as dq
    from diffquant.bench import Protocol
    from diffquant.config import RECIPES, SEMI_PV
    from diffquant.methods.pv_tuning import PVConfig, pv_tune
    from diffquant.pipelines import balanced_labels, sample

    torch.set_num_threads(1)
    out = args.json or RESULTS / f"pv-variants-{args.model}-w{args.bits}a8.json"
    variants = selected(VARIANTS, args.only)
    doc = open_sweep(out)
    rows = doc["rows"]
    header = {"benchmark": "pv_variants", "model": args.model, "recipe": f"aq-w{args.bits}a8", "n": args.n,
              "sample_seed": 777}
    t0 = time.time()
    teacher, scheduler = dq.load(args.model)[:2]
    plain = f"aq-w{args.bits}a8"  # aq-w4a8 does not fine-tune; the lower budgets have a -noft twin
    base, _, info = Protocol(n=args.n).build(args.model, plain if RECIPES[plain].finetune is None else f"{plain}-noft")
    labels, seed = balanced_labels(args.n), header["sample_seed"]
    fp_images = sample(teacher, scheduler, labels, seed=seed).float()

    def psnr(model) -> float:
        return psnr_to_fp(model, fp_images, scheduler, labels, seed)["psnr"]

    if "no fine-tuning" not in rows:
        rows["no fine-tuning"] = {"settings": None, "psnr": psnr(base), "effective_bits": info["effective_bits"]}
    for label, over in variants:
        settings = dataclasses.asdict(PVConfig(**{**dataclasses.asdict(SEMI_PV), **over}))
        if label in rows and rows[label]["settings"] == settings:
            continue
        t = time.time()
        student = copy.deepcopy(base)
        log = pv_tune(student, teacher, scheduler, PVConfig(**settings), progress=True)
        checks = dict(log["check"])
        rows[label] = {"settings": settings, "psnr": psnr(student), "seconds": round(time.time() - t, 1),
                       "best_step": log.get("best_step"), "check_best": checks.get(log.get("best_step")),
                       "check_start": checks.get(0), "check_last": checks.get(settings["steps"]),
                       "code_moves": log["code_moves"], "codes_changed": log["codes_changed"],
                       "v_proposed": sum(log["v_proposed"]), "v_accepted": log["v_accepted"],
                       "v_steps": len(log["v_changes"]),
                       "loss_first": log["loss_first"], "loss_last": log["loss_last"]}
        print(f"{label}: PSNR {rows[label]['psnr']} dB, proposed {sum(log['v_proposed'])}, "
              f"moves {log['code_moves']}, net {log['codes_changed']}, "
              f"best step {log.get('best_step')} ({rows[label]['seconds']} s)", flush=True)
        save_sweep(out, doc, header)  # after every variant: an interrupted run keeps what it finished
    save_sweep(out, doc, header, t0)
    print({k: v["psnr"] for k, v in rows.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
