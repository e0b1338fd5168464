"""SeMI-PV: data-free fine-tuning of an additively quantized denoiser (AQUATIC-Diff's last stage).

The FP model is the teacher and makes its own data: it samples `trajectories` images with the
evaluation sampler (DDIM, CFG), and every model call along the way, conditional and null halves
alike, becomes a training item (input x_t, timestep, label, the teacher's output). The quantized
student is trained to reproduce the teacher's output on the teacher's inputs.

Batches follow the sampling trajectory: batch k holds items of denoising step k mod S for random
trajectories, so consecutive batches move 1000/S timesteps down, then jump back to pure noise.

- **P step** (every step): Adam on the continuous parameters: the codebooks and (log-)scales of every
  additive layer, the biases of every quantized layer, and the affine parameters of the norms.
- **V step** (every `v_every` steps): the discrete codes. The gradient of the loss with respect to each
  additive layer's dequantized weight, summed since the last V step, gives a target
  W* = W^ - alpha * rms(W^) * G / rms(G) per row; every group then takes the codeword (of one codebook
  at a time, the others fixed) nearest to its target, but only the `v_fraction` of groups whose
  distance to the target improves most may change (PV-tuning's cap on code changes).
- **Selective momentum invalidation (SeMI)**, our design, since the rule is unpublished:
  (1) *code changes*: when a V step moves a group from codeword a to codeword b, Adam's first moment
  (exp_avg) of a's and b's rows in that codebook and of that output row's scale is zeroed: the
  momentum was accumulated for a different set of groups and points the wrong way. (2) *timestep
  jumps*: when the next batch's timestep differs from the last one's by more than `jump` (the wrap
  from the clean end of the trajectory back to pure noise), the first moment of every parameter is
  zeroed. Second moments (exp_avg_sq) are kept in both cases: they are per-parameter scale
  estimates that stay valid, and zeroing them would make the next steps explode.
  With `semi=False` momentum is never touched (plain PV-tuning).

**Keep the best.** Every `check_every` steps the student is scored on held-out teacher items (other
noise: `check_trajectories` trajectories from seed + 1), and training returns the best-scoring state,
the starting one included. At W4 the layer-wise result starts close to FP and the fixed-size Adam
steps can move it away: on the zoo DiT, 300 steps raised the training loss itself (0.0037 -> 0.0046)
and FID to FP from 0.045 to 0.216 (that run had V steps; see below). Fine-tuning should never make
the model it was given worse.

**The V step is off in the recipes** (`config.SEMI_P`, v_every=0): on both zoo models it did not help
at 2 bits and, at 4 bits, the moves the probe batch accepted undid on held-out items what the P
steps gained (benchmarks/pv_variants.py; docs/methods.md has the table). It stays here, tested,
for the ablation recipes and for models where it may pay.

Modes: "model" matches the denoiser's output; "block" adds, for every top-level block, the
normalised mean-squared difference of the student's and the teacher's block outputs (both models run
on the same x_t), which gives every block its own error signal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from diffquant.formats.additive import AdditiveWeight, dequantize_additive
from diffquant.io_utils import atomic_path
from diffquant.methods.recon import blocks
from diffquant.nn.layers import QuantLayer
from diffquant.pipelines import balanced_labels, sample_batch

PV_SEED = 2_000_000  # the teacher's trajectories: away from evaluation (0..) and calibration (1e6..) seeds


@dataclass(frozen=True)
class PVConfig:
    steps: int = 300
    trajectories: int = 64
    batch_size: int = 32
    lr: float = 1e-3
    v_every: int = 10  # 0: no V step (P only)
    v_fraction: float = 0.002  # at most this fraction of an additive layer's groups change per V step
    v_alpha: float = 0.05  # V-step target: W^ - alpha * rms(W^) * G / rms(G), per row
    v_tabu: bool = False  # a group may not move straight back to the codeword it last left
    probe_items: int = 4  # per denoising step, in the fixed batch that accepts or undoes a V step
    semi: bool = True
    jump: int = 250  # a timestep change larger than this between batches invalidates first moments
    mode: str = "model"  # "model" or "block"
    sample_steps: int = 20
    guidance: float | None = None  # the model's own by default
    seed: int = PV_SEED
    check_every: int = 25  # steps between scores on the held-out items (0: no check, keep the last state)
    check_trajectories: int = 8

    def __post_init__(self):
        if self.mode not in ("model", "block"):
            raise ValueError(f"mode must be 'model' or 'block', got {self.mode!r}")
        if not 0 <= self.v_fraction <= 1:
            raise ValueError(f"v_fraction must be in [0, 1], got {self.v_fraction}")


# --------------------------------------------------------------------------------------------------
# the teacher's data


@torch.no_grad()
def teacher_items(teacher: nn.Module, scheduler, cfg: PVConfig) -> list[dict[str, torch.Tensor]]:
    """Per denoising step: every input the teacher saw at that step and its output."""
    per_step: list[dict[str, list]] = [dict(x=[], t=[], y=[], out=[]) for _ in range(cfg.sample_steps)]
    state = {"step": 0}

    def hook(_mod, args, kwargs, output):
        x, t = args[0], args[1]
        d = per_step[state["step"]]
        d["x"].append(x.detach().clone())
        d["t"].append(t.detach().clone())
        d["y"].append(kwargs["class_labels"].detach().clone())
        d["out"].append(output.sample.detach().clone())

    handle = teacher.register_forward_hook(hook, with_kwargs=True)
    try:
        labels = balanced_labels(cfg.trajectories)
        for i in range(0, cfg.trajectories, 64):
            sample_batch(teacher, scheduler, labels[i:i + 64], i, seed=cfg.seed, steps=cfg.sample_steps,
                         guidance=cfg.guidance, callback=lambda s, t: state.update(step=s))
    finally:
        handle.remove()
    return [{k: torch.cat(v) for k, v in d.items()} for d in per_step]


# --------------------------------------------------------------------------------------------------
# making the additive layers trainable


class _Additive:
    """An additive layer's trainable view: fp32 codebooks, log-scales, integer codes."""

    def __init__(self, name: str, mod: QuantLayer):
        qw: AdditiveWeight = mod.qweight
        self.name, self.mod, self.spec, self.shape = name, mod, qw.spec, qw.shape
        self.codes = qw.codes.long().clone()
        self.books = nn.Parameter(qw.codebooks.float().clone())
        self.log_scale = nn.Parameter(qw.scale.float().log().clone())
        self.grad_sum = torch.zeros(self.shape[0], qw.numel // self.shape[0])
        self.w_hat: torch.Tensor | None = None
        self.changed = 0
        self.left = torch.full_like(self.codes, -1)  # per group and codebook: the codeword it last left

    def refresh(self) -> None:
        """Recompute the dequantized weight from the trainable tensors (a graph node, not a leaf)."""
        w = dequantize_additive(self.codes, self.books, self.log_scale.exp())
        w.retain_grad()
        self.w_hat = w
        self.mod.weight = w.reshape(self.shape)

    def accumulate(self) -> None:
        if self.w_hat is not None and self.w_hat.grad is not None:
            self.grad_sum += self.w_hat.grad

    def finish(self) -> None:
        qw = AdditiveWeight(self.codes.to(self.mod.qweight.codes.dtype), self.books.detach().half(),
                            self.log_scale.detach().exp().half(), self.shape, self.spec)
        self.mod.set_qweight(qw)

    @torch.no_grad()
    def v_step(self, fraction: float, alpha: float, tabu: bool = False) -> list[tuple]:
        """Move the codes toward W^ - alpha * step along the accumulated gradient. Returns the changes,
        (codebook, flat group indices, old codes, old `left`), so that they can be undone or invalidate
        momentum. With `tabu`, the codeword a group last left is not a candidate for it."""
        g_sum = self.grad_sum
        self.grad_sum = torch.zeros_like(g_sum)
        if fraction <= 0 or not g_sum.abs().sum():
            return []
        scale = self.log_scale.exp()
        books = self.books.detach()
        w_hat = dequantize_additive(self.codes, books, scale)
        row_rms = w_hat.pow(2).mean(1, keepdim=True).sqrt()
        g_rms = g_sum.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30)
        target = w_hat - alpha * row_rms * g_sum / g_rms
        out, d = w_hat.shape
        m_books, k_words, g = books.shape
        groups = d // g
        tgt = (target / scale[:, None]).reshape(out, groups, g)  # in codebook units
        budget = max(1, int(fraction * out * groups))
        changes = []
        for m in range(m_books):
            cur = books[m][self.codes[:, :, m]]  # (out, G, g)
            rest = dequantize_additive(self.codes, books, torch.ones(out)).reshape(out, groups, g) - cur
            want = (tgt - rest).reshape(-1, g)  # what codebook m should contribute
            dist = torch.cdist(want, books[m])
            left = self.left[:, :, m].reshape(-1)
            if tabu:
                back = (left >= 0).nonzero().squeeze(1)
                dist[back, left[back]] = float("inf")
            best_d, best_c = dist.min(1)
            flat = self.codes[:, :, m].reshape(-1)
            # cdist's matrix-product distances are off by rounding: a group whose nearest codeword is its
            # own would show a tiny spurious gain and use up the budget with a move that changes nothing
            gain = ((want - cur.reshape(-1, g)).norm(dim=1) - best_d).masked_fill(best_c == flat, 0)
            idx = gain.topk(min(budget, int((gain > 1e-12).sum()))).indices
            if len(idx) == 0:
                continue
            changes.append((m, idx, flat[idx].clone(), left[idx].clone()))
            left[idx] = flat[idx]
            flat[idx] = best_c[idx]
            self.codes[:, :, m] = flat.reshape(out, groups)
            self.left[:, :, m] = left.reshape(out, groups)
        return changes

    @torch.no_grad()
    def undo(self, changes) -> None:
        for m, idx, old, old_left in reversed(changes):
            for store, value in ((self.codes, old), (self.left, old_left)):
                flat = store[:, :, m].reshape(-1)
                flat[idx] = value
                store[:, :, m] = flat.reshape(store.shape[:2])

    def invalidate(self, changes, opt: torch.optim.Optimizer) -> None:
        """SeMI rule (1): zero the first moment of the codewords a change left or joined, and of the
        scales of the rows that changed."""
        groups = self.codes.shape[1]
        for m, idx, old, _ in changes:
            new = self.codes[:, :, m].reshape(-1)[idx]
            _zero_first_moment(opt, self.books, rows=(m, torch.cat([old, new]).unique()))
            _zero_first_moment(opt, self.log_scale, rows=(None, (idx // groups).unique()))


def _zero_first_moment(opt: torch.optim.Optimizer, p: torch.Tensor, rows=None) -> None:
    st = opt.state.get(p)
    if not st or "exp_avg" not in st:
        return
    if rows is None:
        st["exp_avg"].zero_()
    else:
        first, idx = rows
        if first is None:
            st["exp_avg"][idx] = 0
        else:
            st["exp_avg"][first, idx] = 0


# --------------------------------------------------------------------------------------------------


def _probe_batch(data, per_step: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A fixed batch with `per_step` items of every denoising step: the V step's acceptance test."""
    picks = [{k: v[torch.randperm(len(v), generator=gen)[:per_step]] for k, v in d.items()} for d in data]
    return {k: torch.cat([p[k] for p in picks]) for k in picks[0]}


@torch.no_grad()
def _probe_loss(student: nn.Module, layers: list[_Additive], probe: dict[str, torch.Tensor], chunk: int = 128) -> float:
    for layer in layers:
        layer.mod.weight = dequantize_additive(layer.codes, layer.books, layer.log_scale.exp()).reshape(layer.shape)
    err = sum(float((student(probe["x"][i:i + chunk], probe["t"][i:i + chunk],
                             class_labels=probe["y"][i:i + chunk]).sample - probe["out"][i:i + chunk]).pow(2).sum())
              for i in range(0, len(probe["x"]), chunk))
    return err / float(probe["out"].pow(2).sum())


def _check_set(teacher: nn.Module, scheduler, cfg: PVConfig) -> dict[str, torch.Tensor] | None:
    """Every teacher item of `check_trajectories` trajectories from other noise (held out)."""
    if not cfg.check_every:
        return None
    held = PVConfig(**{**cfg.__dict__, "trajectories": cfg.check_trajectories, "seed": cfg.seed + 1})
    items = teacher_items(teacher, scheduler, held)
    return {k: torch.cat([d[k] for d in items]) for k in items[0]}


def _state(layers: list[_Additive], params: list[nn.Parameter]) -> dict:
    return {"codes": [layer.codes.clone() for layer in layers], "params": [p.detach().clone() for p in params]}


@torch.no_grad()
def _load_state(layers: list[_Additive], params: list[nn.Parameter], st: dict) -> None:
    for layer, codes in zip(layers, st["codes"], strict=True):
        layer.codes.copy_(codes)
    for p, v in zip(params, st["params"], strict=True):
        p.copy_(v)


def _v_step(layers: list[_Additive], student: nn.Module, probe, cfg: PVConfig, opt) -> tuple[int, int]:
    """One V step over all additive layers, kept only if the probe batch's loss does not rise
    (a trust-region check: the linearised step can overshoot). Returns (codes proposed, codes changed);
    0 changed: the step was undone."""
    before = _probe_loss(student, layers, probe)
    changes = {id(layer): layer.v_step(cfg.v_fraction, cfg.v_alpha, cfg.v_tabu) for layer in layers}
    proposed = sum(len(change[1]) for c in changes.values() for change in c)
    if not proposed:
        return 0, 0
    if _probe_loss(student, layers, probe) > before:
        for layer in layers:
            layer.undo(changes[id(layer)])
        return proposed, 0
    for layer in layers:
        c = changes[id(layer)]
        layer.changed += sum(len(change[1]) for change in c)
        if cfg.semi:
            layer.invalidate(c, opt)
    return proposed, proposed


def _first_tensor(o):
    return o if torch.is_tensor(o) else o[0]


def pv_tune(student: nn.Module, teacher: nn.Module, scheduler, cfg: PVConfig = PVConfig(),
            progress: bool = True, state_file: str | Path | None = None, save_every: int = 50) -> dict:
    """Fine-tunes `student` (an additively quantized copy of `teacher`) in place; returns a log.

    With `state_file`, the whole training state (codes, trainable tensors, Adam's moments, the batch
    generator, the log) is written there every `save_every` steps, and a later call with the same
    config resumes from it; the file is removed when training finishes."""
    t0 = time.time()
    layers = [_Additive(n, m) for n, m in student.named_modules()
              if isinstance(m, QuantLayer) and isinstance(m.qweight, AdditiveWeight)]
    if not layers:
        raise ValueError("pv_tune needs a model with additive (AQ) layers; quantize it with an aq recipe first")
    data = teacher_items(teacher, scheduler, cfg)

    for p in student.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer in layers:
        params += [layer.books, layer.log_scale]
    for mod in student.modules():
        if isinstance(mod, QuantLayer) and mod.bias is not None:
            params.append(mod.bias)
        elif isinstance(mod, (nn.GroupNorm, nn.LayerNorm)) and mod.weight is not None:
            params += [mod.weight, mod.bias] if mod.bias is not None else [mod.weight]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)

    captured: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
    handles = []
    if cfg.mode == "block":
        for tag, model in (("s", student), ("t", teacher)):
            for name, block in blocks(model).items():
                handles.append(block.register_forward_hook(
                    lambda _m, _a, o, tag=tag, name=name: captured[tag].__setitem__(name, _first_tensor(o))))

    gen = torch.Generator().manual_seed(cfg.seed)
    probe = _probe_batch(data, cfg.probe_items, gen)
    check = _check_set(teacher, scheduler, cfg)
    initial = [layer.codes.clone() for layer in layers]
    log = {"loss": [], "v_proposed": [], "v_changes": [], "resets_jump": 0, "check": []}
    last_t, start, best = None, 0, None

    def keep_if_best(step: int) -> None:
        """Score the current state on the held-out items; keep a copy if it is the best so far."""
        nonlocal best
        score = _probe_loss(student, layers, check)
        log["check"].append((step, score))
        if best is None or score < best["loss"]:
            best = {"step": step, "loss": score, **_state(layers, params)}

    state_file = Path(state_file) if state_file else None
    if state_file is not None and state_file.exists():
        st = torch.load(state_file, weights_only=False)
        if st["cfg"] == cfg.__dict__ and st["layers"] == [(layer.name, layer.spec) for layer in layers]:
            _load_state(layers, params, st)
            for layer in layers:
                layer.changed = st["changed"][layer.name]
                layer.left.copy_(st["left"][layer.name])
            opt.load_state_dict(st["opt"])
            gen.set_state(st["gen"])
            log, last_t, start, best = st["log"], st["last_t"], st["step"], st["best"]
    if check is not None and start == 0:  # the starting state is a candidate too
        keep_if_best(0)

    def save_state(step: int) -> None:
        with atomic_path(state_file) as tmp:
            torch.save({"cfg": cfg.__dict__, "layers": [(layer.name, layer.spec) for layer in layers], "step": step,
                        "codes": [layer.codes for layer in layers], "params": [p.detach() for p in params],
                        "changed": {layer.name: layer.changed for layer in layers},
                        "left": {layer.name: layer.left for layer in layers}, "opt": opt.state_dict(),
                        "gen": gen.get_state(), "log": log, "last_t": last_t, "best": best}, tmp)

    student.eval()
    try:
        name = f"{'SeMI-' if cfg.semi else ''}{'PV' if cfg.v_every else 'P'} ({cfg.mode})"
        bar = tqdm(range(start, cfg.steps), desc=name,
                   disable=not progress, mininterval=5, initial=start, total=cfg.steps)
        for step in bar:
            d = data[step % cfg.sample_steps]
            idx = torch.randperm(len(d["x"]), generator=gen)[: cfg.batch_size]
            x, t, y, target = d["x"][idx], d["t"][idx], d["y"][idx], d["out"][idx]
            t_now = int(t[0])
            if cfg.semi and last_t is not None and abs(t_now - last_t) > cfg.jump:
                for p in params:
                    _zero_first_moment(opt, p)
                log["resets_jump"] += 1
            last_t = t_now
            for layer in layers:
                layer.refresh()
            pred = student(x, t, class_labels=y).sample
            loss = (pred - target).pow(2).mean() / target.pow(2).mean()
            if cfg.mode == "block":
                with torch.no_grad():
                    teacher(x, t, class_labels=y)
                for name, s_out in captured["s"].items():
                    t_out = captured["t"][name]
                    loss = loss + (s_out - t_out).pow(2).mean() / t_out.pow(2).mean().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for layer in layers:
                layer.accumulate()
            log["loss"].append(float(loss.detach()))
            if cfg.v_every and (step + 1) % cfg.v_every == 0:
                proposed, changed = _v_step(layers, student, probe, cfg, opt)
                log["v_proposed"].append(proposed)
                log["v_changes"].append(changed)
            if check is not None and (step + 1) % cfg.check_every == 0:
                keep_if_best(step + 1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(log['loss'][-20:]) / len(log['loss'][-20:]):.4f}")
            if state_file is not None and (step + 1) % save_every == 0 and step + 1 < cfg.steps:
                save_state(step + 1)
        if check is not None:  # the best held-out state, which may be the one training started from
            if cfg.steps % cfg.check_every:
                keep_if_best(cfg.steps)
            _load_state(layers, params, best)
            log["best_step"] = best["step"]
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for layer in layers:
                layer.finish()
        for p in student.parameters():
            p.requires_grad_(False)
    if state_file is not None:
        state_file.unlink(missing_ok=True)
    n = max(1, cfg.sample_steps)
    log["v_accepted"] = sum(1 for c in log["v_changes"] if c > 0)
    changed = sum(int((layer.codes != c).sum()) for layer, c in zip(layers, initial, strict=True))
    log.update(seconds=round(time.time() - t0, 1), loss_first=sum(log["loss"][:n]) / n,
               loss_last=sum(log["loss"][-n:]) / n, codes_changed=changed,  # net: a code moved and back is 0
               code_moves=sum(layer.changed for layer in layers))  # every accepted move, undone or not
    return log
