"""The `diffquant` command line. Every command has --help with an example."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import click

from diffquant.config import RECIPES

# Errors that are the user's to fix: shown as one clear line, never as a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError)


def _user_errors() -> tuple[type[BaseException], ...]:
    from diffquant.data import DataError
    from diffquant.models import ModelLoadError
    from diffquant.serialization import CheckpointError

    return USER_ERRORS + (ModelLoadError, CheckpointError, DataError)


class Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _user_errors() as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="diffquant")
def main():
    """diffquant: post-training quantization of diffusion models, real low-bit checkpoints, honest metrics.

    \b
    Example:
      diffquant demo
      diffquant quantize mnist-unet --recipe w4a8 --out runs/unet-w4a8
      diffquant eval runs/unet-w4a8 --ref mnist-unet -n 1000 --json runs/unet-w4a8.json
    """


@main.command()
@click.option("-n", "n", default=1000, show_default=True, help="samples per method (the 'quick' size)")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(path_type=Path))
@click.option("--model", default="mnist-unet", show_default=True)
@click.option("--methods", default="fp,w8a8,w4a8,w2a8", show_default=True)
def demo(n, out, model, methods):
    """Quantize a built-in model with FP, W8A8, W4A8 and W2A8, evaluate, and write an HTML report.

    \b
    Example:
      diffquant demo                  # mnist-unet, 1,000 samples per method, runs/demo/report.html
    """
    from diffquant.bench import run_quality
    from diffquant.report import make_report

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    doc = run_quality([model], methods.split(","), n, out / "results.json", size="quick" if n == 1000 else str(n))
    html = make_report([out / "results.json"], out / "report.html")
    click.echo(f"\nreport: {html}  ({len(doc['rows'])} rows, {time.time() - t0:.0f} s)")


@main.group()
def zoo():
    """The built-in models: list them, or reproduce them from scratch."""


@zoo.command("list")
def zoo_list():
    """List the built-in models and whether their checkpoints are present.

    \b
    Example:
      diffquant zoo list
    """
    from diffquant.zoo.registry import CHECKPOINT_DIR, ZOO

    for name, s in ZOO.items():
        present = (CHECKPOINT_DIR / name / "diffquant.json").exists()
        click.echo(f"{name:12s} {'trained' if present else 'missing'}  {s.description}")


@zoo.command("train")
@click.argument("name")
@click.option("--steps", type=int, default=None, help="override the spec's step count")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="default: the shipped checkpoint folder")
@click.option("--state-dir", type=click.Path(path_type=Path), default=None, help="resumable training state")
def zoo_train(name, steps, out, state_dir):
    """Train a zoo model (mnist-unet, mnist-dit) or the feature network (features). Resumable: an
    interrupted run continues from its last saved step when started again.

    \b
    Example:
      diffquant zoo train mnist-unet
      diffquant zoo train features
    """
    if name == "features":
        from diffquant.metrics.features import train_feature_net

        click.echo(json.dumps(train_feature_net(out), indent=2))
        return
    from diffquant.zoo.registry import spec
    from diffquant.zoo.train import train

    spec(name)
    click.echo(f"wrote {train(name, out, state_dir, steps)}")


def _labels(labels: str | None, n: int):
    from diffquant.pipelines import balanced_labels, parse_labels

    return balanced_labels(n) if labels is None else parse_labels(labels, n)


@main.command()
@click.argument("model")
@click.option("-n", "n", default=64, show_default=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help=".npz (images + labels) or .png (grid)")
@click.option("--labels", default=None, help="e.g. '0-9' or '3' (default: balanced)")
@click.option("--seed", default=0, show_default=True, help="sample i starts from the noise of seed + i")
@click.option("--steps", default=20, show_default=True)
@click.option("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim", show_default=True)
@click.option("--batch-size", default=250, show_default=True)
def sample(model, n, out, labels, seed, steps, guidance, sampler, batch_size):
    """Draw seeded samples from MODEL (a zoo name or a folder).

    \b
    Example:
      diffquant sample mnist-unet -n 64 --out grid.png
      diffquant sample runs/unet-w4a8 --labels 0-9 -n 1000 --out samples.npz
    """
    from diffquant.grids import save_grid
    from diffquant.models import load
    from diffquant.pipelines import sample_to_npz

    if out.suffix not in (".npz", ".png"):
        raise ValueError(f"--out must end in .npz or .png, got {out.name!r}")
    m, s = load(model)
    lab = _labels(labels, n)
    npz = out if out.suffix == ".npz" else out.with_suffix(".npz.tmp-samples.npz")
    images = sample_to_npz(m, s, lab, npz, seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                           batch_size=batch_size)
    if out.suffix == ".png":
        save_grid(images, out)
        npz.unlink(missing_ok=True)
    click.echo(f"wrote {out}")


@main.command()
@click.argument("model")
@click.option("--recipe", required=True, help=f"a named recipe ({', '.join(RECIPES)}) or a recipe .json file")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--calib-n", default=64, show_default=True, help="images sampled for timestep-aware calibration")
@click.option("--steps", default=20, show_default=True, help="sampling steps of the calibration trajectory")
@click.option("--calib-mode", type=click.Choice(["none", "perstep", "accuquant"]), default=None,
              help="reconstruction after rounding: Q-Diffusion's per-step objective or AccuQuant's "
                   "(default: the recipe's; 'none' turns it off)")
@click.option("--group-steps", "-M", type=int, default=None, help="AccuQuant: DDIM steps simulated per loss")
@click.option("--calib-grad", type=click.Choice(["o1", "exact"]), default=None,
              help="AccuQuant: gradient through one step at a time (O(1) memory) or through all M")
@click.option("--recon-iters", type=int, default=None, help="reconstruction iterations per block")
@click.option("--act-mode", type=click.Choice(["static", "timestep", "dynamic"]), default=None,
              help="activation ranges: one per tensor, one per tensor and denoising step (looked up by "
                   "timestep), or per token at run time (default: the recipe's)")
def quantize(model, recipe, out, calib_n, steps, calib_mode, group_steps, calib_grad, recon_iters, act_mode):
    """Quantize MODEL with a recipe and write a packed low-bit folder, usable as MODEL everywhere.
    Interrupted runs resume: finished AQ layers and reconstruction blocks are kept beside OUT.

    \b
    Example:
      diffquant quantize mnist-unet --recipe w4a8 --out runs/unet-w4a8
      diffquant quantize mnist-dit --recipe my_recipe.json --out runs/dit-custom
      diffquant quantize mnist-unet --recipe w3a6-accuquant -M 8 --out runs/unet-w3a6-aq8
      diffquant quantize mnist-unet --recipe w4a8 --calib-mode perstep --out runs/unet-w4a8-qdiff
      diffquant quantize mnist-dit --recipe aq-w4a8 --act-mode timestep --out runs/dit-aq4-ts
    """
    from diffquant.calibration.collect import collect
    from diffquant.checkpoint import save
    from diffquant.config import get_recipe
    from diffquant.models import load
    from diffquant.quantize import check_budget, needs_calibration, quantize_

    cfg = _with_act_mode(_with_recon(get_recipe(recipe), calib_mode, group_steps, calib_grad, recon_iters), act_mode)
    m, s = load(model)
    check_budget(m, cfg)  # an impossible bit budget fails here, not after minutes of calibration
    calib = collect(m, s, n=calib_n, steps=steps) if needs_calibration(cfg) else None
    # finished AQ layers are kept beside the output, so an interrupted run resumes at its layer
    resume = out.parent / f".{out.name}.layers"
    quantize_(m, cfg, calib=calib, progress=True, resume_dir=resume, scheduler=s)
    extra = {k: getattr(m, f"dq_{k}_log") for k in ("aq", "laq", "finetune", "recon")
             if getattr(m, f"dq_{k}_log", None)} or None
    path = save(m, out, s, source=model, extra=extra)
    shutil.rmtree(resume, ignore_errors=True)
    meta = json.loads((path / "diffquant.json").read_text())
    click.echo(f"wrote {path}: {meta['effective_bits']:.3f} effective bits, {meta['checkpoint_bytes']:,} bytes")


def _with_act_mode(cfg, mode):
    """The recipe with --act-mode applied (a clear error where it cannot apply)."""
    import dataclasses

    if mode is None:
        return cfg
    if cfg.act is None:
        raise click.UsageError(f"recipe {cfg.name!r} keeps activations in full precision; --act-mode needs a "
                               "recipe with activation bits (e.g. w4a8, aq-w4a8)")
    if mode == "timestep" and cfg.recon is not None:
        raise click.UsageError(f"recipe {cfg.name!r} reconstructs block by block, which learns one activation "
                               "range per layer; use --act-mode static with it, or --calib-mode none")
    split = cfg.act.split if mode != "dynamic" else 0
    return dataclasses.replace(cfg, act=dataclasses.replace(cfg.act, mode=mode, split=split, steps=0),
                               split_skips=cfg.split_skips and mode != "dynamic")


def _with_recon(cfg, mode, m, grad, iters):
    """The recipe with the command line's reconstruction options applied (a clear error if they
    make no sense together)."""
    import dataclasses

    from diffquant.methods.accuquant import ReconConfig

    if mode == "none":
        return dataclasses.replace(cfg, recon=None)
    base = cfg.recon
    if mode is None and base is None:
        if m is not None or grad is not None or iters is not None:
            raise click.UsageError(f"recipe {cfg.name!r} has no reconstruction; add --calib-mode perstep|accuquant "
                                   "to use --group-steps / --calib-grad / --recon-iters")
        return cfg
    changes = {k: v for k, v in (("objective", mode), ("group_steps", m), ("grad", grad), ("iters", iters))
               if v is not None}
    if changes.get("objective", (base or ReconConfig()).objective) == "perstep" and ("group_steps" in changes
                                                                                     or "grad" in changes):
        raise click.UsageError("--group-steps and --calib-grad apply to --calib-mode accuquant only")
    try:
        recon = dataclasses.replace(base or ReconConfig(), **changes)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if cfg.act is not None and cfg.act.mode == "static":
        return dataclasses.replace(cfg, recon=recon, split_skips=True)
    return dataclasses.replace(cfg, recon=recon)


@main.command("analyze-trajectory")
@click.argument("models", nargs=-1, required=True)
@click.option("--ref", required=True, help="the FP reference model (zoo name or folder)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder for trajectory.json and .png")
@click.option("-n", "n", default=64, show_default=True, help="trajectories (seeds 0..n-1 of the evaluation)")
@click.option("--steps", default=20, show_default=True)
def analyze_trajectory(models, ref, out, n, steps):
    """Plot how far each quantized MODEL's trajectory drifts from REF's: the error one step adds, and
    the distance accumulated since the noise, against the step index.

    \b
    Example:
      diffquant analyze-trajectory runs/unet-w3a6 runs/unet-w3a6-perstep runs/unet-w3a6-accuquant \\
          --ref mnist-unet --out runs/trajectory-w3a6
    """
    from diffquant.io_utils import write_json
    from diffquant.models import load
    from diffquant.provenance import provenance
    from diffquant.trajectory import analyze, plot

    fp, sched = load(ref)
    results = {}
    for name in models:
        m, _ = load(name)
        results[Path(name).name] = analyze(m, fp, sched, n=n, steps=steps)
        acc = results[Path(name).name]["accumulated_rms"]
        click.echo(f"{name}: accumulated RMS distance after step 1 {acc[0]:.4f}, at the end {acc[-1]:.4f}")
    write_json(out / "trajectory.json", {"ref": ref, "results": results, **provenance()})
    png = plot(results, out / "trajectory.png", title=f"trajectory error against {ref}")
    click.echo(f"wrote {out / 'trajectory.json'} and {png}")


@main.command()
@click.argument("model")
@click.option("--target-bits", required=True, help="average effective bits of the recipe(s), e.g. 3.5 or 3.5,3.9")
@click.option("--act-bits", type=int, default=None, help="activation bits in the recipe (dynamic per token), e.g. 6")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="folder for recipes, JSON and plots")
@click.option("--configs", default=120, show_default=True, help="random configurations to label")
@click.option("-n", "n", default=128, show_default=True, help="images per configuration label")
@click.option("--workers", default=1, show_default=True, help="processes labelling configurations")
@click.option("--folds", default=5, show_default=True)
@click.option("--epochs", default=300, show_default=True, help="GNN training epochs per fold")
@click.option("--cache", default="runs/cache/sensitivity", show_default=True, type=click.Path(path_type=Path))
@click.option("--with-aq", is_flag=True, help="also search additive-codebook (AQ) options at 2/3/4 bits per layer "
              "(built once with calibration data; searched by summed per-layer error, chosen by their labels)")
@click.option("--with-w8", is_flag=True, help="also let a layer stay at 8-bit uniform (uaq-8), as LAQ keeps its most "
              "sensitive layers; searched by summed per-layer error weighted by each layer's measured gain")
def sensitivity(model, target_bits, act_bits, out, configs, n, workers, folds, epochs, cache, with_aq, with_w8):
    """Qua²SeDiMo: label random mixed configurations of MODEL, train the GNN quality predictor,
    explain which layers are sensitive, and write a mixed-precision recipe per target.

    \b
    Example:
      diffquant sensitivity mnist-unet --target-bits 3.5 --act-bits 6 --out runs/unet-mp
      diffquant quantize mnist-unet --recipe runs/unet-mp/mnist-unet-mp3.5a6.json --out runs/unet-mp35
    """
    from diffquant.sensitivity.pipeline import SensitivitySettings, run

    try:
        targets = [float(t) for t in target_bits.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected numbers such as 3.5 or 3.5,3.9, got {target_bits!r}",
                                 param_hint="--target-bits") from None
    settings = SensitivitySettings(configs=configs, n=n, workers=workers, folds=folds, epochs=epochs,
                                   extra_options=("aq",) * with_aq + ("uaq-8",) * with_w8)
    doc = run(model, out, targets, act_bits, settings, cache=cache)
    rho = {k: v["mean"]["spearman"] for k, v in doc["predictors"].items()}
    click.echo(f"held-out Spearman: GNN {rho['gnn']:.3f}, trees {rho['trees']:.3f}, "
               f"summed error {rho['summed_error']:.3f}")
    for r in doc["recipes"].values():
        click.echo(f"wrote {out / r['file']}: {r['effective_bits']:.3f} bits, FID-to-FP ({n} images) "
                   f"{r['label']['fid_to_fp']:.3f}")


@main.command("eval")
@click.argument("model")
@click.option("--ref", required=True, help="the FP reference model (zoo name or folder)")
@click.option("-n", "n", default=1000, show_default=True)
@click.option("--json", "json_out", required=True, type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=20, show_default=True)
def eval_(model, ref, n, json_out, seed, steps):
    """Sample MODEL and REF from the same noise and write every metric of the mnist32 protocol.
    Samples are cached under runs/cache (keyed by the weights' hash) and resume after an interruption.

    \b
    Example:
      diffquant eval runs/unet-w4a8 --ref mnist-unet -n 1000 --json runs/unet-w4a8-eval.json
    """
    from diffquant.bench import Protocol
    from diffquant.checkpoint import checkpoint_bytes
    from diffquant.io_utils import write_json
    from diffquant.metrics.evaluate import evaluate
    from diffquant.models import resolve
    from diffquant.provenance import provenance

    t0 = time.time()
    proto = Protocol(n, seed, steps)  # samples are cached per weights and resumable
    ref_images = proto.samples(ref, "fp")
    images = proto.samples(str(model), "eval")
    metrics = evaluate(images, proto.labels, ref_images=ref_images)
    meta_file = resolve(model) / "diffquant.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    metrics.update(
        model=str(model), ref=str(ref), seed=seed, steps=steps,
        effective_bits=meta.get("effective_bits", 32.0),
        checkpoint_bytes=checkpoint_bytes(resolve(model)),
        wall_time_s=round(time.time() - t0, 1), **provenance(),
    )
    write_json(json_out, metrics)
    click.echo(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, dict)}, indent=2))


@main.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", default="report.html", show_default=True, type=click.Path(path_type=Path))
def report(results, out):
    """Make an HTML report (tables, sample grids, bits-vs-quality plots) from benchmark JSON files.

    \b
    Example:
      diffquant report benchmarks/results/quality-full.json --out report.html
    """
    from diffquant.report import make_report

    click.echo(f"wrote {make_report(list(results), out)}")


@main.command()
def recipes():
    """List the named recipes.

    \b
    Example:
      diffquant recipes
    """
    from diffquant.config import describe

    width = max(len(n) for n in RECIPES)
    for name, r in RECIPES.items():
        click.echo(f"{name:{width}s}  {describe(r)}")


@main.command("tune-kernels")
@click.option("--quick", is_flag=True, help="fewer shapes and token counts (about a minute)")
@click.option("--reps", default=10, show_default=True, help="timed runs per case (median)")
@click.option("--out", default=None, type=click.Path(path_type=Path),
              help="thresholds file to write [default: the user's kernel cache, which dispatch reads]")
@click.option("--show", is_flag=True, help="print the thresholds in effect and where they come from; measure nothing")
@click.option("--model", "model_dir", default=None,
              help="instead, time every AQ layer of this quantized model in place, on both paths, at --batch, and "
                   "store the faster path per layer shape and token count (they override the thresholds)")
@click.option("--batch", default=64, show_default=True, help="with --model: images per forward (as in sampling)")
@click.option("--rounds", default=5, show_default=True, help="with --model: timed forwards per path (median)")
def tune_kernels(quick, reps, out, show, model_dir, batch, rounds):
    """Measure where the CPU lookup-table kernel beats fp32 dense on this machine, for AQ dispatch.

    Which path is faster depends on the CPU (on an AMD EPYC the lookup won at many tokens where an Intel
    Xeon's MKL did not), so AQ layers use thresholds measured on this microarchitecture when there are
    any: this command's, then the ones shipped for this CPU, then the strictest shipped ones.
    With --model, the layers of one model are timed where they run, between the others (which evicts their
    weights from cache) and at the model's batch: the choices made from that win over the thresholds.

    \b
    Example:
      diffquant tune-kernels --quick
      diffquant tune-kernels --model runs/unet-aq-w2a8 --batch 64
      diffquant tune-kernels --show
    """
    from diffquant.kernels import cpu, dispatch, tune
    from diffquant.provenance import cpu_key, cpu_model, git_commit

    if not show:
        if not cpu.available():
            raise ValueError("the CPU lookup-table kernel could not be built here (install g++ and ninja); "
                             "AQ layers use the reference path, so there is nothing to tune")
        if model_dir is not None:
            if batch < 1 or rounds < 1:
                raise ValueError(f"--batch and --rounds must be at least 1 (got {batch} and {rounds})")
            _tune_in_place(model_dir, batch, rounds, out or tune.user_thresholds_path())
        else:
            click.echo(f"measuring the lookup kernel against fp32 dense on {cpu_model()} ({cpu_key()})", err=True)
            t0 = time.time()
            rows = tune.measure(quick=quick, reps=reps, log=lambda m: click.echo(m, err=True))
            path = out or tune.user_thresholds_path()
            tune.store_entry(path, {"source": "diffquant tune-kernels" + (" --quick" if quick else ""),
                                    "commit": git_commit(), "machine": cpu_model(),
                                    "wall_s": round(time.time() - t0, 1), **tune.break_even(rows), "rows": rows})
            click.echo(f"wrote {path}")
        dispatch.reload_thresholds()
    click.echo(f"thresholds in effect: {dispatch.threshold_source()}")
    for n, (bound, elems) in sorted(dispatch.thresholds().items()):
        rule = "dense always" if bound >= 1e9 else f"lookup when FLOP bound >= {bound:g} and in*out >= {elems:,}"
        click.echo(f"  {n:5d} tokens: {rule}")


def _tune_in_place(model_dir: str, batch: int, rounds: int, path: Path) -> None:
    """`tune-kernels --model`: one guided forward at `batch` (mid-trajectory timestep) is the workload."""

    from diffquant.kernels import in_place, tune
    from diffquant.models import load
    from diffquant.pipelines import guided_forward
    from diffquant.provenance import cpu_model, git_commit

    model, sched = load(model_dir)
    layers = in_place.aq_layers(model)
    if not layers:
        raise ValueError(f"{model_dir} has no additive-codebook (AQ) layers, so there is no kernel to choose; "
                         "quantize it with an AQ recipe first (e.g. `diffquant quantize mnist-unet --recipe aq-w2a8`)")
    forward = guided_forward(model, batch, sched.config.num_train_timesteps // 2)
    click.echo(f"timing {len(layers)} AQ layers of {model_dir} in place, batch {batch}, "
               f"{rounds} rounds per path", err=True)
    t0 = time.time()
    rows = in_place.measure(model, forward, rounds, progress=lambda r, n: click.echo(f"  round {r}/{n}", err=True))
    choices = in_place.choose_per_shape(rows)
    before = in_place.summed_ms(rows, lambda r: "lut" if r["auto_pick"] == "lut" else "reference")
    after = in_place.summed_ms(rows, lambda r: choices[tuple(r["key"])])
    n = tune.store_shape_choices(path, rows, choices, {
        "source": "diffquant tune-kernels --model", "model": str(model_dir), "batch": batch, "commit": git_commit(),
        "machine": cpu_model(), "wall_s": round(time.time() - t0, 1)})
    changed = sum((r["auto_pick"] == "lut") != (choices[tuple(r["key"])] == "lut") for r in rows)
    click.echo(f"{len(choices)} shapes ({sum(v == 'lut' for v in choices.values())} on the lookup); "
               f"{changed} of {len(rows)} layers change path; their summed time in this measurement "
               f"{before:.1f} ms with the thresholds, {after:.1f} ms with these choices")
    click.echo(f"wrote {path} ({n} shape choices for this CPU)")


if __name__ == "__main__":
    main()
