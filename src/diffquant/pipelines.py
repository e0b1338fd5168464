"""Seeded, batched DDIM / DDPM sampling of class-conditional diffusers denoisers with classifier-free
guidance.

Sample i always starts from the noise of `torch.Generator().manual_seed(seed + i)` (and draws its
DDPM step noise from that same generator), whatever the batch size or the model: a quantized model
and its full-precision reference are compared image by image.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from diffquant.data import to_uint8
from diffquant.io_utils import atomic_path
from diffquant.models import ddpm_from, from_model_space, meta_of

StepCallback = Callable[[int, int], None]  # (step index, timestep), called before each model call


def balanced_labels(n: int, num_classes: int = 10) -> torch.Tensor:
    """0, 1, ..., 9, 0, 1, ...: every class equally often, and sample i's label fixed by i."""
    return torch.arange(n) % num_classes


def parse_labels(spec: str, n: int, num_classes: int = 10) -> torch.Tensor:
    """'3' -> all 3s; '0-9' or '1,4,7' -> cycled over the n samples."""
    vals: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-", 1)
            vals.extend(range(int(a), int(b) + 1))
        elif part:
            vals.append(int(part))
    bad = [v for v in vals if not 0 <= v < num_classes]
    if not vals or bad:
        raise ValueError(f"--labels {spec!r}: labels must be integers in 0..{num_classes - 1}, e.g. '0-9' or '3,5'.")
    return torch.tensor(vals)[torch.arange(n) % len(vals)]


def latent_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    return (cfg.in_channels, cfg.sample_size, cfg.sample_size)


def guided_output(model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, guidance: float,
                  null_class: int) -> torch.Tensor:
    """Classifier-free guided model output (epsilon or v, as the scheduler's prediction_type says);
    one batched call for the conditional and the null halves."""
    if guidance == 1.0:
        return model(x, t, class_labels=labels).sample
    both = model(torch.cat([x, x]), torch.cat([t, t]),
                 class_labels=torch.cat([labels, torch.full_like(labels, null_class)])).sample
    cond, uncond = both.chunk(2)
    out_ch = x.shape[1]
    cond, uncond = cond[:, :out_ch], uncond[:, :out_ch]
    return uncond + guidance * (cond - uncond)


def guided_forward(model, n: int, timestep: int, seed: int = 0) -> Callable[[], torch.Tensor]:
    """One guided model call on `n` images of seeded noise at a fixed timestep, balanced labels, the model's own
    guidance: a sampling step's workload without the scheduler, which kernel timing in place repeats
    (`diffquant tune-kernels --model`, benchmarks/dispatch_accuracy.py)."""
    meta = meta_of(model)
    x = torch.randn(n, *latent_shape(model), generator=torch.Generator().manual_seed(seed))
    t, labels = torch.full((n,), timestep, dtype=torch.long), balanced_labels(n)
    return lambda: guided_output(model, x, t, labels, meta.guidance_scale, meta.null_class)


def guided_ddim_step(model, scheduler, x: torch.Tensor, t, labels: torch.Tensor, guidance: float,
                     null_class: int) -> torch.Tensor:
    """One deterministic guided DDIM step x_t -> x_prev, in the caller's grad mode (calibration and
    trajectory analysis step the model one call at a time)."""
    tt = torch.full((len(x),), int(t), dtype=torch.long)
    out = guided_output(model, scheduler.scale_model_input(x, t), tt, labels, guidance, null_class)
    return scheduler.step(out, t, x).prev_sample


@torch.no_grad()
def sample_batch(model, scheduler, labels: torch.Tensor, first_index: int, seed: int = 0, steps: int = 20,
                 guidance: float | None = None, sampler: str = "ddim", eta: float = 0.0,
                 callback: StepCallback | None = None) -> torch.Tensor:
    """Images in [-1, 1], (B, C, H, W), for samples first_index .. first_index + B - 1."""
    meta = meta_of(model)
    guidance = meta.guidance_scale if guidance is None else guidance
    if sampler == "ddpm":
        scheduler = ddpm_from(scheduler)
    elif sampler != "ddim":
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', not {sampler!r}")
    scheduler.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(seed + first_index + j) for j in range(len(labels))]
    shape = latent_shape(model)
    x = torch.stack([torch.randn(shape, generator=g) for g in gens])
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        if callback is not None:
            callback(i, int(t))
        tt = torch.full((len(x),), int(t), dtype=torch.long)
        out = guided_output(model, scheduler.scale_model_input(x, t), tt, labels, guidance, meta.null_class)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        needs_noise = sampler == "ddpm" or eta > 0
        x = scheduler.step(out, t, x, generator=gens if needs_noise else None, **kwargs).prev_sample
    return from_model_space(x, meta.space_to_depth).clamp(-1, 1)


def sample(model, scheduler, labels: torch.Tensor, seed: int = 0, steps: int = 20, guidance: float | None = None,
           sampler: str = "ddim", eta: float = 0.0, batch_size: int = 250, progress: bool = True,
           desc: str = "sample") -> torch.Tensor:
    """All samples in memory (float, [-1, 1])."""
    out = []
    for i in tqdm(range(0, len(labels), batch_size), desc=desc, disable=not progress):
        out.append(sample_batch(model, scheduler, labels[i:i + batch_size], i, seed, steps, guidance, sampler, eta))
    return torch.cat(out)


def sample_to_npz(model, scheduler, labels: torch.Tensor, out: Path, seed: int = 0, steps: int = 20,
                  guidance: float | None = None, sampler: str = "ddim", eta: float = 0.0, batch_size: int = 250,
                  progress: bool = True, desc: str = "sample") -> np.ndarray:
    """Samples to `out` (.npz with uint8 `images` (N, 1, H, W) and `labels`), resumable: finished
    batches wait in `out`.partial/ and are not redone after an interruption; the .npz appears
    atomically at the end. Returns the uint8 images."""
    out = Path(out)
    part = out.with_name(out.name + ".partial")
    part.mkdir(parents=True, exist_ok=True)
    key = f"seed{seed}-steps{steps}-g{guidance}-{sampler}-eta{eta}-bs{batch_size}"
    chunks = []
    starts = range(0, len(labels), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress):
        lab = labels[i:i + batch_size]
        f = part / f"{key}-{i:07d}-{len(lab)}.npz"
        if f.exists():
            with np.load(f) as z:
                if np.array_equal(z["labels"], lab.numpy()):
                    chunks.append(z["images"])
                    continue
        imgs = to_uint8(sample_batch(model, scheduler, lab, i, seed, steps, guidance, sampler, eta))
        with atomic_path(f) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=imgs, labels=lab.numpy())
        chunks.append(imgs)
    images = np.concatenate(chunks)
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, images=images, labels=labels.numpy(), seed=seed, steps=steps)
    shutil.rmtree(part, ignore_errors=True)
    return images
