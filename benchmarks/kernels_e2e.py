"""End to end: whole models with the AQ kernels against the dequantized path and FP.

1. The zoo's AQ W2A8 U-Net (a folder written by `diffquant quantize mnist-unet --recipe aq-w2a8 --out DIR`):
   sampling N images (20 DDIM steps, batch N) as FP, as AQ on the dequantized dense path
   (`reference`), with dispatch's choice per layer (`auto`: the zoo's layers are small, so mostly dense),
   and on the lookup kernels everywhere with the dense copies dropped (`lut`).
2. One forward at batch 1 of a randomly initialised denoiser with LDM-4 ImageNet's shapes (diffusers
   UNet2DModel, 192-384-576-960 channels, 64x64x3 input, 264M parameters with aq_speed.LDM4), every Linear / Conv2d
   holding random AQ codes: 2x8 (g = 8) for linears and 1x1 convs, KAQ 1x8 (g = 9) for 3x3 convs;
   FP dense, AQ dequantized-dense, AQ `auto` (dispatch: lookup where measured faster), AQ `lut`.

The LDM-4 cases are also timed together in one process (`ldm4_same_process`: FP, one AQ model run as
`reference` and as `auto`, one AQ model without dense copies run as `lut`, in rotated rounds): timed each in
its own process, `reference` measured 1.29-1.33x FP in three runs although it runs the same dense
products, while in one process the FP model and the same model holding the AQ weights' values took the
same time (ad hoc). So the gap belongs to the processes, not to the computation, and the same-process
ratios are the like-for-like ones. The zoo cases are sampled together in one process too (`zoo_same_process`):
once dispatch keeps every zoo layer dense, its `auto` and `reference` cases run the same products (equal
checksums), so any gap between them in separate processes is the processes'.

Each case runs in a fresh process, so that its peak resident memory (ru_maxrss) is its own; the
memory the weights take is `weights_held_mib` (peak RSS includes loading through dense weights).
Cases run in `--rounds` rounds, each round every case once in a rotated order, and a row reports the
median and the minimum over rounds: on a shared VM one slow stretch otherwise lands on one case and
decides the comparison (one zoo sampling run took 10.9 s and, the same morning, 38.5 s).

    python benchmarks/kernels_e2e.py --unet runs/unet-aq-w2a8 --json benchmarks/results/kernels-e2e.json
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffquant.io_utils import write_json
from diffquant.kernels.dispatch import threshold_source
from diffquant.provenance import provenance

sys.path.insert(0, str(Path(__file__).parent))
from aq_speed import LDM4  # noqa: E402  (LDM-4 ImageNet's U-Net widths, shared with the AQ speed benchmark)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def held_mib(model) -> float:
    """Bytes the model holds for its weights: parameters, buffers (a quantized layer's dense copy is one),
    the quantized tensors and the kernels' prepared layout. Peak RSS cannot show this: loading passes
    through the dense weights either way."""
    from diffquant.nn.layers import QuantLayer

    seen, n = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for mod in model.modules():
        if isinstance(mod, QuantLayer):
            tensors += [t for t in vars(mod.qweight).values() if torch.is_tensor(t)]
            ks = getattr(mod, "_kstate", None)  # (impl, (codebooks, codes, scale)) in the kernel's layout
            tensors += list(ks[1]) if ks else []
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return round(n / 2**20, 1)


def case_zoo(unet: str, mode: str, n: int) -> dict:
    from diffquant.kernels import dispatch
    from diffquant.models import load
    from diffquant.pipelines import balanced_labels, sample

    m, s = load("mnist-unet" if mode == "fp" else unet)
    if mode == "lut":
        codes_only(m)
    labels = balanced_labels(n)
    rss0 = _rss_mib()
    with dispatch.force({"fp": "reference", "reference": "reference", "auto": "auto", "lut": "lut"}[mode]):
        t = time.perf_counter()
        x = sample(m, s, labels, seed=0, steps=20, batch_size=n, progress=False)
        wall = time.perf_counter() - t
    return {"wall_s": round(wall, 3), "weights_held_mib": held_mib(m), "rss_before_sampling_mib": round(rss0, 1),
            "peak_rss_mib": round(_rss_mib(), 1), "checksum": float(x.float().mean())}


def ldm4_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 64x64x3 latent, timestep 500, class 1: the LDM-4 forward every case times."""
    return torch.randn(1, 3, 64, 64), torch.tensor([500]), torch.tensor([1])


def require_unet(unet: str, hint: str) -> None:
    """Stop with the command that makes `unet` when it is not a saved model folder."""
    if not Path(unet).is_dir():
        sys.exit(f"error: {unet} is not a quantized model folder; make it with "
                 f"`diffquant quantize mnist-unet --recipe aq-w2a8 --out {unet}`{hint}")


def ldm4_aq_model(seed: int = 0):
    from diffusers import UNet2DModel

    from diffquant.formats.additive import AdditiveSpec, AdditiveWeight
    from diffquant.nn.layers import QuantConv2d, QuantLinear
    from diffquant.nn.swap import quantizable_layers, set_module

    torch.manual_seed(seed)
    model = UNet2DModel(**LDM4).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, mod in quantizable_layers(model).items():
        w = mod.weight
        out, in_flat = w.shape[0], w[0].numel()
        kaq = w.dim() == 4 and w.shape[-1] == 3 and w.shape[-2] == 3
        spec = AdditiveSpec(1, 8, 9) if kaq else AdditiveSpec(2, 8, 8)
        if in_flat % spec.group or (w.dim() == 4 and mod.groups != 1):
            continue
        cb = torch.randn(spec.codebooks, 1 << spec.bits, spec.group, generator=gen) * w.std().item()
        codes = torch.randint(0, 1 << spec.bits, (out, in_flat // spec.group, spec.codebooks), generator=gen)
        qw = AdditiveWeight(codes, cb, torch.ones(out), tuple(w.shape), spec)
        new = QuantLinear(qw, mod.bias) if w.dim() == 2 else QuantConv2d(qw, mod.bias, mod)
        set_module(model, name, new)
    return model


def case_ldm4(mode: str, reps: int) -> dict:
    from diffquant.kernels import dispatch

    if mode == "fp":
        from diffusers import UNet2DModel

        torch.manual_seed(0)  # a reproducible checksum
        model = UNet2DModel(**LDM4).eval()
    else:
        model = codes_only(ldm4_aq_model()) if mode == "lut" else ldm4_aq_model()
    x, t, y = ldm4_inputs()
    rss0 = _rss_mib()
    force = {"fp": "reference", "reference": "reference", "auto": "auto", "lut": "lut"}[mode]
    times = []
    with torch.no_grad(), dispatch.force(force):
        model(x, t, class_labels=y)
        for _ in range(reps):
            t0 = time.perf_counter()
            out = model(x, t, class_labels=y).sample
            times.append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model.parameters())
    return {"forward_s": round(sorted(times)[len(times) // 2], 3), "weights_held_mib": held_mib(model),
            "rss_after_build_mib": round(rss0, 1),
            "peak_rss_mib": round(_rss_mib(), 1), "fp32_params_left": params, "checksum": float(out.mean())}


def codes_only(model):
    """`model` with every AQ (additive) layer's dense copy dropped (`free_dense`): what the `lut` cases run."""
    from diffquant.nn.layers import QuantLayer

    for mod in model.modules():
        if isinstance(mod, QuantLayer) and mod.qweight.format == "additive":
            mod.free_dense()
    return model


def rotated(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Every call once untimed (dense copies and kernel layouts are made on first use), then `rounds` rounds of
    each once, in an order rotated by one per round: seconds per call."""
    names, times = list(calls), {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(round(time.perf_counter() - t0, 3))
    return times


def forced(model_call: Callable[[], object], impl: str) -> Callable[[], object]:
    from diffquant.kernels import dispatch

    def call():
        with torch.no_grad(), dispatch.force(impl):
            return model_call()
    return call


def same_process_result(times: dict[str, list[float]], key: str) -> dict:
    med = {mode: statistics.median(v) for mode, v in times.items()}
    return {key: {m: round(v, 3) for m, v in med.items()}, f"{key}_rounds": times,
            "speedup_vs_fp": {m: round(med["fp"] / v, 3) for m, v in med.items()}}


def ldm4_same_process(rounds: int) -> dict:
    """The four LDM-4 cases in this one process, one forward of each per round in a rotated order: the
    median forward per case over `rounds`, and the ratio of FP's to each."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    fp = UNet2DModel(**LDM4).eval()
    aq, aq_codes_only = ldm4_aq_model(), codes_only(ldm4_aq_model())
    x, t, y = ldm4_inputs()
    calls = {"fp": forced(lambda: fp(x, t, class_labels=y), "reference"),
             "reference": forced(lambda: aq(x, t, class_labels=y), "reference"),
             "auto": forced(lambda: aq(x, t, class_labels=y), "auto"),
             "lut": forced(lambda: aq_codes_only(x, t, class_labels=y), "lut")}
    return same_process_result(rotated(calls, rounds), "forward_s")


def zoo_same_process(unet: str, n: int, rounds: int) -> dict:
    """The four zoo cases in this one process (sampling `n` images, 20 steps), rotated rounds: `reference` and
    `auto` share one model, so their products are the same whenever dispatch keeps a layer dense."""
    from diffquant.models import load
    from diffquant.pipelines import balanced_labels, sample

    fp, sched = load("mnist-unet")
    aq, _ = load(unet)
    aq_codes_only = codes_only(load(unet)[0])
    labels = balanced_labels(n)

    def sampling(model):
        return lambda: sample(model, sched, labels, seed=0, steps=20, batch_size=n, progress=False)

    calls = {"fp": forced(sampling(fp), "reference"), "reference": forced(sampling(aq), "reference"),
             "auto": forced(sampling(aq), "auto"), "lut": forced(sampling(aq_codes_only), "lut")}
    return same_process_result(rotated(calls, rounds), "wall_s")


def run_case(case: str, args) -> dict:
    """One case in a fresh process (its own peak RSS)."""
    p = subprocess.run([sys.executable, __file__, "--case", case, "--unet", args.unet, "-n", str(args.n),
                        "--reps", str(args.reps), "--same-process-rounds", str(args.same_process_rounds),
                        "--zoo-same-process-rounds", str(args.zoo_same_process_rounds)],
                       capture_output=True, text=True)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        sys.exit(f"case {case} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[0][7:])


def summarize(case: str, results: list[dict]) -> dict:
    """A case's row: its time as the median over rounds (the key the single-run rows had), with the
    minimum and every round's value; memory and checksum from the first round (they do not vary)."""
    key = "wall_s" if case.startswith("zoo:") else "forward_s"
    times = [r[key] for r in results]
    return {"case": case, **results[0], key: round(statistics.median(times), 3), f"{key}_min": min(times),
            f"{key}_rounds": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unet", default="runs/unet-aq-w2a8", help="a saved AQ W2A8 mnist-unet folder")
    ap.add_argument("-n", type=int, default=64, help="images to sample (one batch)")
    ap.add_argument("--reps", type=int, default=3, help="LDM-4 forwards per process (median)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every case, rotated (median and min)")
    ap.add_argument("--same-process-rounds", type=int, default=7,
                    help="rounds of the LDM-4 cases timed together in one process (0: skip)")
    ap.add_argument("--zoo-same-process-rounds", type=int, default=3,
                    help="rounds of the zoo cases sampled together in one process (0: skip)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", default="zoo,ldm4", help="which models: zoo, ldm4 or both (ldm4 needs no saved model)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: one case in this process
    args = ap.parse_args()
    if args.case:
        kind, mode = args.case.split(":")
        if mode == "same_process":
            r = (ldm4_same_process(args.same_process_rounds) if kind == "ldm4"
                 else zoo_same_process(args.unet, args.n, args.zoo_same_process_rounds))
        else:
            r = case_zoo(args.unet, mode, args.n) if kind == "zoo" else case_ldm4(mode, args.reps)
        print("RESULT " + json.dumps(r))
        return
    kinds = [k for k in args.only.split(",") if k]
    if not kinds or set(kinds) - {"zoo", "ldm4"}:
        sys.exit(f"error: --only {args.only!r}: give zoo, ldm4 or zoo,ldm4")
    if "zoo" in kinds:
        require_unet(args.unet, ", or run --only ldm4")
    cases = [f"{k}:{m}" for k in kinds for m in ("fp", "reference", "auto", "lut")]
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases[r % len(cases):] + cases[:r % len(cases)]:
            runs[case].append(run_case(case, args))
            print(f"round {r + 1}/{args.rounds} {case}: {runs[case][-1]}", flush=True)
    rows = [summarize(case, runs[case]) for case in cases]
    for row in rows:
        print(row, flush=True)
    same = zoo_same = None
    if "ldm4" in kinds and args.same_process_rounds > 0:
        same = run_case("ldm4:same_process", args)
        print(f"ldm4 in one process: {same}", flush=True)
    if "zoo" in kinds and args.zoo_same_process_rounds > 0:
        zoo_same = run_case("zoo:same_process", args)
        print(f"zoo in one process: {zoo_same}", flush=True)
    out = {"provenance": provenance(), "threads": torch.get_num_threads(),
           "thresholds": threshold_source(),
           "unet": args.unet if "zoo" in kinds else None, "n": args.n,
           "rounds": args.rounds, "rows": rows, "ldm4_same_process": same, "zoo_same_process": zoo_same}
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
