"""`diffquant zoo train NAME`: reproduces a zoo denoiser from scratch (DDPM v-prediction objective, EMA,
classifier-free-guidance label dropout). Resumable: a training state is saved every
`checkpoint_every` steps and picked up again by the next call with the same state folder."""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from diffquant.data import load_mnist
from diffquant.io_utils import write_dir_atomic
from diffquant.models import build, make_scheduler, save_fp, to_model_space
from diffquant.provenance import provenance
from diffquant.zoo.registry import CHECKPOINT_DIR, SCHEDULER_CONFIG, spec, spec_dict


def _lr_at(step: int, cfg) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    total = cfg.schedule_steps or cfg.steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(name: str, out: Path | None = None, state_dir: Path | None = None, steps: int | None = None,
          progress: bool = True) -> Path:
    s = spec(name)
    cfg = s.train if steps is None else type(s.train)(**{**s.train.__dict__, "steps": steps})
    out = Path(out) if out else CHECKPOINT_DIR / name
    state_dir = Path(state_dir) if state_dir else Path("runs") / "zoo" / name
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "train_state.pt"

    torch.manual_seed(cfg.seed)
    data = load_mnist()
    model = build(s)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    noise_sched = DDPMScheduler.from_config(SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses, elapsed = 0, [], 0.0
    if state_file.exists():
        st = torch.load(state_file, weights_only=False)
        model.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, losses, elapsed = st["step"], st["losses"], st["elapsed"]
        print(f"resuming {name} at step {step}/{cfg.steps} from {state_file}")

    def save_state():
        tmp = state_file.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "losses": losses, "elapsed": elapsed}, tmp)
        os.replace(tmp, state_file)

    alphas = noise_sched.alphas_cumprod
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {name}", disable=not progress, mininterval=5)
    t0 = time.time() - elapsed
    while step < cfg.steps:
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=gen)
        x0 = to_model_space(data.images[idx], s.space_to_depth)
        labels = data.labels[idx].clone()
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
        labels[drop] = 10
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        pred = model(xt, t, class_labels=labels).sample
        target = noise if noise_sched.config.prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        step += 1
        elapsed = time.time() - t0
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / 50:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_state()
    bar.close()

    record = {
        "zoo": spec_dict(s),
        "train_config": cfg.__dict__,
        "steps_done": step,
        "wall_time_s": round(elapsed, 1),
        "final_loss_avg100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "loss_every_100": [sum(losses[i:i + 100]) / len(losses[i:i + 100]) for i in range(0, len(losses), 100)],
        "weights": "EMA",
        "parameters": sum(p.numel() for p in ema.parameters()),
        **provenance(),
    }
    ema.dq_meta = model.dq_meta
    write_dir_atomic(out, lambda tmp: save_fp(ema, make_scheduler(), tmp, {"training": record}))
    return out
