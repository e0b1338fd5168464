"""Calibration by reconstruction: Q-Diffusion's per-step objective and AccuQuant's multi-step one.

Both run unit by unit (`recon.blocks` in forward order, then the layers outside blocks), learn the
same parameters (`recon.Trainable`: AdaRound roundings, AQ codebooks and scales, LSQ activation
ranges) with the same optimiser, iterations and batches, on the same FP sampling trajectories (DDIM
with the model's guidance, `trajectories` noises from RECON_SEED). Only the loss differs:

- **perstep** (Q-Diffusion = BRECQ + AdaRound + LSQ with timestep-aware data): items are the FP
  model's inputs at every step of its trajectories; the unit's output on the *quantized* model's
  input (earlier units already calibrated) is matched to the FP unit's output on the FP input, each
  timestep independently. The "rest" unit matches the model output.
- **accuquant**: from the FP latent x_s at step s (s uniform in 0..S-M), the quantized model (units
  before this one calibrated, this one learning, later ones at nearest rounding) takes M guided DDIM
  steps to x~_{s+M}; the loss is ||x~_{s+M} - x_{s+M}||^2 against the FP trajectory. Gradients:
  - `grad="exact"`: back-propagation through all M steps (M steps of graph alive: memory grows with M);
  - `grad="o1"`: one step's graph at a time. A first pass without gradients runs the chain and gives
    d = dL/dx~_{s+M}. The second pass re-runs each step k from its stored input, and back-propagates
    c_k * d into the parameters, where c_k = prod over the later steps j of a scalar stand-in for
    the step's Jacobian dx~_{j+1}/dx~_j: `jacobian="x0"` assumes the model's x0 estimate does not move
    with x (c = sqrt(1 - abar_prev) / sqrt(1 - abar)), `jacobian="output"` assumes its raw output
    does not (the scheduler's own coefficient of x). Memory: one step's graph plus M latents.
    What the approximation drops is the model's own Jacobian in the later steps;
    `tests/methods/test_accuquant.py` measures how close the gradient stays to the exact one.
The reconstruction loss is summed over a sample's elements and averaged over the batch (BRECQ's),
then divided by the unit's loss at round-to-nearest (measured on a fixed probe before training), so
that the rounding regulariser (a mean over the unit's weights) has weight `reg` relative to the
error the unit starts from, whatever the unit's size, the model's or the objective's loss scale.
While a unit learns, the blocks after it run in full precision in AccuQuant's chain (swapped in from
the FP copy): the end-of-group error is then the one the calibrated prefix causes, not the sum with
later units' round-to-nearest error that their own calibration will remove.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from diffquant.io_utils import atomic_path
from diffquant.kernels import dispatch
from diffquant.methods.recon import Trainable, blocks, unit_layers
from diffquant.models import meta_of
from diffquant.nn.layers import QuantLayer
from diffquant.pipelines import balanced_labels, guided_ddim_step, latent_shape

RECON_SEED = 3_000_000  # trajectories for reconstruction: away from evaluation, calibration and PV seeds


@dataclass(frozen=True)
class ReconConfig:
    objective: str = "perstep"  # "perstep" (Q-Diffusion) or "accuquant"
    group_steps: int = 4  # accuquant: M, the DDIM steps simulated per loss
    grad: str = "o1"  # accuquant: "exact" (back-propagate through M steps) or "o1" (one step's graph)
    # o1: the scalar stand-in for a step's Jacobian, "output" or "x0"; "output" measured closer to the
    # exact gradient on the zoo U-Net (benchmarks/results/accuquant-memory.json, gradient_agreement)
    jacobian: str = "output"
    iters: int = 160  # per unit
    batch_size: int = 16  # trajectories (accuquant) or model inputs (perstep) per iteration
    trajectories: int = 64
    sample_steps: int = 20
    # Adam on AdaRound's V and AQ codebooks / scales. 0.1, not AdaRound's 1e-3 (tuned for 20k
    # iterations): in 160 iterations V must be able to cross the sigmoid (|V| ~ 6). The sweep behind
    # it: benchmarks/recon_sweep.py (zoo U-Net, W3A6 per-step, PSNR of 128 final samples to FP).
    lr: float = 0.1
    lr_act: float = 1e-3  # Adam, activation ranges
    # Adam, AQ codebooks and log-scales: they are values, not the logits of a rounding, so SeMI-PV's
    # step size, not AdaRound's
    lr_codebooks: float = 1e-3
    reg: float = 1.0  # AdaRound regulariser weight, relative to the unit's starting loss (see above)
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2  # fraction of iterations without the regulariser
    # accuquant: divide each group's loss by its round-to-nearest loss at the same start step, so that
    # every start weighs the same (the raw end-of-group loss varies ~13x over the start step at M=4 on
    # the zoo U-Net, smallest for the noisiest starts)
    balance_starts: bool = False
    # accuquant: first calibrate per step (the baseline's own run, same settings), then refine that
    # solution with the multi-step objective: roundings start at the per-step ones, ranges at its ranges
    from_perstep: bool = False
    # give a unit back its starting state (roundings, codebooks, ranges) when its probe loss after
    # learning is above the loss it started from: from scratch, a few units of the zoo U-Net ended worse
    # than round-to-nearest, its first block up to 2.1x (counts: benchmarks/results/recon-units.json)
    keep_start: bool = False
    guidance: float | None = None  # the model's own by default
    seed: int = RECON_SEED

    def __post_init__(self):
        if self.objective not in ("perstep", "accuquant"):
            raise ValueError(f"objective must be 'perstep' or 'accuquant', got {self.objective!r}")
        if self.grad not in ("exact", "o1"):
            raise ValueError(f"grad must be 'exact' or 'o1', got {self.grad!r}")
        if self.jacobian not in ("x0", "output"):
            raise ValueError(f"jacobian must be 'x0' or 'output', got {self.jacobian!r}")
        if not 1 <= self.group_steps <= self.sample_steps:
            raise ValueError(f"group_steps (M) must be in 1..sample_steps={self.sample_steps}, got {self.group_steps}")
        if self.iters < 1 or self.batch_size < 1 or self.trajectories < 1:
            raise ValueError("iters, batch_size and trajectories must be positive")


# --------------------------------------------------------------------------------------------------
# FP trajectories


@dataclass
class Trajectories:
    x: torch.Tensor  # (S + 1, N, C, H, W): x[0] the initial noise, x[k] after k DDIM steps
    labels: torch.Tensor  # (N,)
    timesteps: list[int]  # (S,)
    items: list[dict[str, torch.Tensor]]  # per step: the FP model's inputs (cond + null halves) and outputs


@torch.no_grad()
def fp_trajectories(model: nn.Module, scheduler, cfg: ReconConfig) -> Trajectories:
    """The FP model samples `cfg.trajectories` images; every latent and every model call is kept."""
    meta = meta_of(model)
    guidance = meta.guidance_scale if cfg.guidance is None else cfg.guidance
    scheduler.set_timesteps(cfg.sample_steps)
    labels = balanced_labels(cfg.trajectories)
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn((cfg.trajectories, *latent_shape(model)), generator=gen) * scheduler.init_noise_sigma
    xs, items = [x], []
    calls: list[dict] = []
    handle = model.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append({"x": args[0].clone(), "t": args[1].clone(),
                                                    "y": kwargs["class_labels"].clone(), "out": out.sample.clone()}),
        with_kwargs=True)
    try:
        for t in scheduler.timesteps:
            calls.clear()
            x = guided_ddim_step(model, scheduler, x, t, labels, guidance, meta.null_class)
            xs.append(x)
            items.append({k: torch.cat([c[k] for c in calls]) for k in calls[0]})
    finally:
        handle.remove()
    return Trajectories(torch.stack(xs), labels, [int(t) for t in scheduler.timesteps], items)


def step_coefficients(scheduler, timesteps: list[int], kind: str) -> list[float]:
    """Per DDIM step, the scalar that stands in for dx_prev/dx (see the module docstring)."""
    stride = scheduler.config.num_train_timesteps // len(timesteps)
    out = []
    for t in timesteps:
        a = float(scheduler.alphas_cumprod[t])
        p = t - stride
        a_prev = float(scheduler.alphas_cumprod[p]) if p >= 0 else float(scheduler.final_alpha_cumprod)
        if kind == "x0":
            out.append(math.sqrt(1 - a_prev) / math.sqrt(max(1 - a, 1e-12)))
        else:  # the model output held fixed: the step is linear in x with this coefficient
            probe = torch.full((1, 1), 0.5)
            out.append(float(scheduler.step(torch.zeros_like(probe), t, probe).prev_sample) / 0.5)
    return out


# --------------------------------------------------------------------------------------------------
# the two objectives


def _tensors(o) -> list[torch.Tensor]:
    if torch.is_tensor(o):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for x in o for t in _tensors(x)]
    if hasattr(o, "sample"):
        return [o.sample]
    return []


def _sq_err(pred: list[torch.Tensor], target: list[torch.Tensor]) -> torch.Tensor:
    """Squared error summed over a sample's elements, averaged over the batch (BRECQ's loss)."""
    return sum(((p - t) ** 2).reshape(len(p), -1).sum(1).mean() for p, t in zip(pred, target, strict=True))


class _Stop(Exception):
    pass


def _unit_io(model: nn.Module, unit: str, x, t, y, want: str):
    """The unit's call (args, kwargs) or its output when `model` runs on (x, t, y)."""
    if unit == "rest":
        return ((x, t), {"class_labels": y}) if want == "in" else _tensors(model(x, t, class_labels=y))
    block, got = model.get_submodule(unit), {}

    def pre(_m, args, kwargs):
        got["in"] = (args, kwargs)
        if want == "in":
            raise _Stop

    def post(_m, _a, _k, out):
        got["out"] = [o.detach() for o in _tensors(out)]
        raise _Stop

    h1 = block.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = block.register_forward_hook(post, with_kwargs=True)
    try:
        model(x, t, class_labels=y)
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()
    return got[want]


def _detach(o):
    if torch.is_tensor(o):
        return o.detach()
    if isinstance(o, tuple):
        return tuple(_detach(v) for v in o)
    if isinstance(o, list):
        return [_detach(v) for v in o]
    if isinstance(o, dict):
        return {k: _detach(v) for k, v in o.items()}
    return o


def _select(o, idx: torch.Tensor, n: int):
    """Rows `idx` of every batch-first tensor (first dimension n) inside a nested call."""
    if torch.is_tensor(o):
        return o[idx] if o.dim() > 0 and o.shape[0] == n else o
    if isinstance(o, (tuple, list)):
        return type(o)(_select(v, idx, n) for v in o)
    if isinstance(o, dict):
        return {k: _select(v, idx, n) for k, v in o.items()}
    return o


def _cat(parts: list):
    first = parts[0]
    if torch.is_tensor(first):
        return torch.cat(parts) if first.dim() > 0 else first
    if isinstance(first, tuple):
        return tuple(_cat([p[i] for p in parts]) for i in range(len(first)))
    if isinstance(first, list):
        return [_cat([p[i] for p in parts]) for i in range(len(first))]
    if isinstance(first, dict):
        return {k: _cat([p[k] for p in parts]) for k in first}
    return first


@torch.no_grad()
def _perstep_pool(student, teacher, unit: str, traj: Trajectories, pool: int, gen: torch.Generator):
    """`pool` model inputs drawn over all timesteps; the unit's quantized-model inputs and FP outputs."""
    allx = torch.cat([d["x"] for d in traj.items])
    allt = torch.cat([d["t"] for d in traj.items])
    ally = torch.cat([d["y"] for d in traj.items])
    idx = torch.randperm(len(allx), generator=gen)[:pool]
    ins, outs = [], []
    for chunk in idx.split(64):
        x, t, y = allx[chunk], allt[chunk], ally[chunk]
        ins.append(_detach(_unit_io(student, unit, x, t, y, "in")))
        outs.append(_unit_io(teacher, unit, x, t, y, "out"))
    return _cat(ins), _cat(outs), len(idx)


def _perstep_loss(student, unit: str, pool, batch_idx: torch.Tensor) -> torch.Tensor:
    (args, kwargs), target, n = pool
    args, kwargs = _select(args, batch_idx, n), _select(kwargs, batch_idx, n)
    mod = student if unit == "rest" else student.get_submodule(unit)
    return _sq_err(_tensors(mod(*args, **kwargs)), [t[batch_idx] for t in target])


def _ddim_chain(student, scheduler, x, labels, timesteps, guidance, null_class):
    """M guided DDIM steps of the student from x, in the current grad mode; the latents along the way."""
    xs = [x]
    for t in timesteps:
        x = guided_ddim_step(student, scheduler, x, t, labels, guidance, null_class)
        xs.append(x)
    return xs


def group_loss_and_grad(student, scheduler, trainable: Trainable, x0, labels, target, timesteps: list[int],
                        guidance: float, null_class: int, grad: str, coeffs: list[float] | None = None,
                        extra: torch.Tensor | None = None, loss_scale: float = 1.0) -> float:
    """AccuQuant's end-of-group loss from x0 over `timesteps`; accumulates the gradient of
    `loss_scale * loss` (plus that of `extra`, the regulariser) into the trainable parameters.
    Returns the loss, unscaled."""
    if grad == "exact":
        trainable.refresh()
        xs = _ddim_chain(student, scheduler, x0, labels, timesteps, guidance, null_class)
        loss = _sq_err([xs[-1]], [target])
        (loss * loss_scale + (extra if extra is not None else 0)).backward()
        return float(loss.detach())
    with torch.no_grad():  # pass 1: the chain and dL/dx~ at its end
        trainable.refresh()
        xs = _ddim_chain(student, scheduler, x0, labels, timesteps, guidance, null_class)
    end = xs[-1].detach().requires_grad_(True)
    loss = _sq_err([end], [target])
    (d,) = torch.autograd.grad(loss * loss_scale, end)
    scale = 1.0
    for k in reversed(range(len(timesteps))):  # pass 2: one step's graph at a time
        trainable.refresh()
        step = _ddim_chain(student, scheduler, xs[k].detach(), labels, [timesteps[k]], guidance, null_class)
        step[-1].backward(d * scale)
        scale *= coeffs[k]
    if extra is not None:
        extra.backward()
    return float(loss.detach())


# --------------------------------------------------------------------------------------------------
# the loop


def _state_file(resume_dir: str | Path | None, cfg: ReconConfig, name: str) -> Path | None:
    if resume_dir is None:
        return None
    key = f"{cfg.objective}-M{cfg.group_steps}-{cfg.grad}" if cfg.objective == "accuquant" else "perstep"
    key += "-bal" if cfg.objective == "accuquant" and cfg.balance_starts else ""
    key += "-refine" if cfg.objective == "accuquant" and cfg.from_perstep else ""
    key += "-keep" if cfg.keep_start else ""
    return Path(resume_dir) / f"recon-{name}-{key}.pt"


def _snapshot(layers: dict[str, QuantLayer]) -> dict:
    """What reconstruction changes in `layers`: the quantized weights (replaced, never edited in place,
    by `Trainable.finish`) and copies of the activation ranges. Saved in the resume file (every layer)
    and kept for `keep_start` (one unit's)."""
    return {"qweights": {n: m.qweight for n, m in layers.items()},
            "acts": {n: (m.act.lo.clone(), m.act.hi.clone()) for n, m in layers.items() if m.act is not None}}


def _restore(layers: dict[str, QuantLayer], snap: dict) -> None:
    for n, m in layers.items():
        m.set_qweight(snap["qweights"][n])
        if m.act is not None:
            m.act.lo.copy_(snap["acts"][n][0])
            m.act.hi.copy_(snap["acts"][n][1])


@contextlib.contextmanager
def _fp_blocks(student: nn.Module, teacher: nn.Module, names: list[str]):
    """The student's blocks `names` replaced by the teacher's (full precision) for the duration."""
    saved = {}
    try:
        for name in names:
            parent, _, child = name.rpartition(".")
            holder = student.get_submodule(parent) if parent else student
            saved[name] = (holder, child, getattr(holder, child))
            holder.register_module(child, teacher.get_submodule(name))
        yield
    finally:
        for holder, child, mod in saved.values():
            holder.register_module(child, mod)


@torch.no_grad()
def _probe_loss(student, scheduler, unit: str, cfg: ReconConfig, traj: Trajectories, pool, guidance: float,
                null_class: int) -> float:
    """The unit's loss before it learns (round-to-nearest weights, initial ranges): the scale that
    the reconstruction loss is divided by."""
    if cfg.objective == "perstep":
        return float(_perstep_loss(student, unit, pool, torch.arange(min(64, pool[2]))))
    starts = sorted({round(i * (cfg.sample_steps - cfg.group_steps) / 3) for i in range(4)})
    losses = [_group_loss(student, scheduler, cfg, traj, s, guidance, null_class) for s in starts]
    return sum(losses) / len(losses)


@torch.no_grad()
def _group_loss(student, scheduler, cfg: ReconConfig, traj: Trajectories, s: int, guidance: float,
                null_class: int) -> float:
    """The end-of-group loss from start step `s` on a fixed probe of trajectories."""
    m, n = cfg.group_steps, min(cfg.trajectories, 2 * cfg.batch_size)
    x = _ddim_chain(student, scheduler, traj.x[s][:n], traj.labels[:n], traj.timesteps[s:s + m], guidance,
                    null_class)[-1]
    return float(_sq_err([x], [traj.x[s + m][:n]]))


@torch.no_grad()
def _start_losses(student, scheduler, cfg: ReconConfig, traj: Trajectories, guidance: float,
                  null_class: int) -> list[float]:
    """The end-of-group loss from every start step, before the unit learns (balance_starts)."""
    return [max(_group_loss(student, scheduler, cfg, traj, s, guidance, null_class), 1e-12)
            for s in range(cfg.sample_steps - cfg.group_steps + 1)]


def reconstruct(student: nn.Module, teacher: nn.Module, scheduler, cfg: ReconConfig, progress: bool = True,
                resume_dir: str | Path | None = None, name: str = "model") -> dict:
    """Calibrates `student` (quantized, activation ranges initialised) in place against `teacher` (its
    FP copy), unit by unit; returns a log (per unit: final loss, seconds). With `resume_dir`, the
    model's state after every finished unit is kept there and a later call resumes after it."""
    from diffquant.quantize import quantized_layers  # (here: diffquant.quantize imports this module)

    t_start = time.time()
    units = unit_layers(student)
    every_layer = quantized_layers(student)
    if not units:
        raise ValueError("reconstruct needs a quantized model (diffquant.quantize_ first)")
    first = None
    if cfg.objective == "accuquant" and cfg.from_perstep:  # the per-step recipe's own calibration first
        base = ReconConfig(**{**asdict(cfg), "objective": "perstep", "from_perstep": False, "balance_starts": False,
                              "group_steps": ReconConfig.group_steps})
        first = reconstruct(student, teacher, scheduler, base, progress, resume_dir, name)
    meta = meta_of(teacher)
    guidance = meta.guidance_scale if cfg.guidance is None else cfg.guidance
    traj = fp_trajectories(teacher, scheduler, cfg)
    coeffs = step_coefficients(scheduler, traj.timesteps, cfg.jacobian) if cfg.grad == "o1" else None
    state_file = _state_file(resume_dir, cfg, name)
    log: dict = {"units": {}, "config": asdict(cfg)}
    done: list[str] = []
    if state_file is not None and state_file.exists():
        st = torch.load(state_file, weights_only=False)
        saved = {**asdict(ReconConfig()), **st["cfg"]}  # a field added since: its default is what ran
        if saved == asdict(cfg) and set(st["done"]) <= set(units):
            _restore(every_layer, st["snap"])
            done, log = st["done"], st["log"]
    for p in [*student.parameters(), *teacher.parameters()]:
        p.requires_grad_(False)
    student.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    order = list(units)
    with dispatch.force("reference"):  # the soft weights live in the dense path
        for unit, layers in units.items():
            if unit in done:
                continue
            t0 = time.time()
            later = [u for u in order[order.index(unit) + 1:] if u != "rest"]
            with _fp_blocks(student, teacher, later if cfg.objective == "accuquant" else []):
                _calibrate_unit(student, teacher, scheduler, cfg, unit, layers, traj, coeffs, guidance,
                                meta.null_class, gen, log, progress)
            log["units"][unit]["seconds"] = round(time.time() - t0, 1)
            done.append(unit)
            if state_file is not None:
                state_file.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(state_file) as tmp:
                    torch.save({"cfg": asdict(cfg), "done": done, "log": log, "snap": _snapshot(every_layer)}, tmp)
    log["seconds"] = round(time.time() - t_start, 1)
    log["blocks"] = list(blocks(student))
    if first is not None:
        log["perstep_first"] = first
    return log


def _calibrate_unit(student, teacher, scheduler, cfg: ReconConfig, unit: str, layers: dict, traj: Trajectories,
                    coeffs, guidance: float, null_class: int, gen: torch.Generator, log: dict, progress: bool):
    """One unit's reconstruction: `cfg.iters` Adam steps on its Trainable, then hard rounding."""
    pool = None
    if cfg.objective == "perstep":
        pool = _perstep_pool(student, teacher, unit, traj, max(256, 4 * cfg.batch_size), gen)
    loss0 = max(_probe_loss(student, scheduler, unit, cfg, traj, pool, guidance, null_class), 1e-12)
    per_start = _start_losses(student, scheduler, cfg, traj, guidance, null_class) \
        if cfg.objective == "accuquant" and cfg.balance_starts else None
    start = _snapshot(layers) if cfg.keep_start else None
    tr = Trainable(layers, teacher, from_codes=cfg.objective == "accuquant" and cfg.from_perstep)
    groups = [{"params": tr.round_params, "lr": cfg.lr}, {"params": tr.aq_params, "lr": cfg.lr_codebooks}]
    if tr.act_params:
        groups.append({"params": tr.act_params, "lr": cfg.lr_act})
    opt = torch.optim.Adam(groups)
    losses = []
    bar = tqdm(range(cfg.iters), desc=f"{cfg.objective} {unit}", disable=not progress, mininterval=5)
    for it in bar:
        warm = it < cfg.warmup * cfg.iters
        frac = (it - cfg.warmup * cfg.iters) / max(1.0, (1 - cfg.warmup) * cfg.iters)
        beta = cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1 - frac)
        opt.zero_grad(set_to_none=True)
        tr.refresh()
        # the rounding regulariser, where there are roundings: a unit of AQ layers only has none, and its
        # constant zero cannot be back-propagated
        extra = None if warm or not tr.round_params else cfg.reg * tr.reg(beta)
        if cfg.objective == "perstep":
            idx = torch.randint(0, pool[2], (cfg.batch_size,), generator=gen)
            loss_t = _perstep_loss(student, unit, pool, idx)
            (loss_t / loss0 + (0 if extra is None else extra)).backward()
            loss = float(loss_t.detach())
        else:
            m = cfg.group_steps
            s = int(torch.randint(0, cfg.sample_steps - m + 1, (1,), generator=gen))
            idx = torch.randint(0, cfg.trajectories, (cfg.batch_size,), generator=gen)
            loss = group_loss_and_grad(student, scheduler, tr, traj.x[s][idx], traj.labels[idx],
                                       traj.x[s + m][idx], traj.timesteps[s:s + m], guidance,
                                       null_class, cfg.grad, coeffs[s:s + m] if coeffs else None, extra,
                                       loss_scale=1 / (per_start[s] if per_start is not None else loss0))
        opt.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]) / loss0:.4g}", refresh=False)
    tr.finish()
    after = _probe_loss(student, scheduler, unit, cfg, traj, pool, guidance, null_class)
    kept = start is not None and after > loss0
    if kept:
        _restore(layers, start)
    log["units"][unit] = {"loss_rtn": loss0, "loss_after": after, "loss_first": sum(losses[:10]) / len(losses[:10]),
                          "loss_last": sum(losses[-10:]) / len(losses[-10:]), "layers": len(layers),
                          "kept_start": kept}
