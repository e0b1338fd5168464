"""Error accumulation along the sampling trajectory, made visible.

For a quantized model and its FP reference, from the same noises (seeds `seed + i`, the evaluation
protocol's) and the same guided DDIM steps:

- **per-step error** at step k: from the FP latent x_k, one quantized step against one FP step,
  RMS over samples and elements of x~_{k+1} - x_{k+1}: the error a single step adds, which per-step
  calibration minimises;
- **accumulated distance** at step k: the quantized model's own trajectory against the FP one, RMS of
  x~_{k+1} - x_{k+1}: what the sample actually inherits, which AccuQuant targets.

If errors simply added up, the accumulated distance would track the running sum of per-step
errors; the plot shows where it grows faster (errors amplified by later steps) or slower (damped).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffquant.models import meta_of
from diffquant.pipelines import balanced_labels, guided_ddim_step, latent_shape


def _rms(d: torch.Tensor) -> float:
    return float(d.pow(2).mean().sqrt())


@torch.no_grad()
def analyze(model, ref, scheduler, n: int = 64, steps: int = 20, seed: int = 0, batch_size: int = 64) -> dict:
    """Per-step error and accumulated distance of `model` from `ref` at every step index."""
    meta = meta_of(ref)
    scheduler.set_timesteps(steps)
    labels = balanced_labels(n)
    per_step = torch.zeros(steps)
    accumulated = torch.zeros(steps)
    for b in range(0, n, batch_size):
        lab = labels[b:b + batch_size]
        x = torch.stack([torch.randn(latent_shape(ref), generator=torch.Generator().manual_seed(seed + b + j))
                         for j in range(len(lab))]) * scheduler.init_noise_sigma
        xq = x.clone()
        g, null = meta.guidance_scale, meta.null_class
        for k, t in enumerate(scheduler.timesteps):
            x_next = guided_ddim_step(ref, scheduler, x, t, lab, g, null)
            per_step[k] += (guided_ddim_step(model, scheduler, x, t, lab, g, null) - x_next).pow(2).sum()
            xq = guided_ddim_step(model, scheduler, xq, t, lab, g, null)
            accumulated[k] += (xq - x_next).pow(2).sum()
            x = x_next
    numel = n * torch.Size(latent_shape(ref)).numel()
    return {"steps": steps, "n": n, "seed": seed, "timesteps": [int(t) for t in scheduler.timesteps],
            "per_step_rms": (per_step / numel).sqrt().tolist(),
            "accumulated_rms": (accumulated / numel).sqrt().tolist()}


def plot(results: dict[str, dict], out: str | Path, title: str = "") -> Path:
    """One figure, two panels: per-step error and accumulated distance against the step index, a line
    per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffquant.io_utils import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, r in results.items():
        k = list(range(1, r["steps"] + 1))
        axes[0].plot(k, r["per_step_rms"], marker=".", label=name)
        axes[1].plot(k, r["accumulated_rms"], marker=".", label=name)
    axes[0].set_title("per-step error (one step from the FP latent)")
    axes[1].set_title("accumulated distance from the FP trajectory")
    for ax in axes:
        ax.set_xlabel("DDIM step")
        ax.set_ylabel("RMS difference")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out
