"""Timestep-aware calibration data: the inputs of every quantizable layer, recorded while the FP
model samples (so they cover the whole trajectory, from pure noise to the clean image), subsampled
to a fixed memory budget per layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from diffquant.nn.swap import quantizable_layers
from diffquant.pipelines import balanced_labels, sample_batch

CALIB_SEED = 1_000_000  # far from the evaluation seeds (0 ..), so calibration never sees test noise


@dataclass
class CalibrationData:
    """Per layer: a list of input batches (items chosen at random from each model call) and the
    denoising step index each batch was recorded at; `timesteps[step]` is that step's timestep value
    (what timestep-wise activation ranges are looked up by at run time)."""

    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    steps: dict[str, list[int]] = field(default_factory=dict)
    num_steps: int = 0
    timesteps: list[int] = field(default_factory=list)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.inputs.values() for t in ts)

    def layer_inputs(self, name: str) -> torch.Tensor:
        return torch.cat(self.inputs[name])

    def __contains__(self, name: str) -> bool:
        return name in self.inputs


@torch.no_grad()
def collect(model, scheduler, n: int = 64, steps: int = 20, batch_size: int = 64, seed: int = CALIB_SEED,
            max_bytes_per_layer: int = 4 << 20, guidance: float | None = None, layers: list[str] | None = None,
            progress: bool = True) -> CalibrationData:
    """Samples n images with the FP model and records subsampled inputs of each quantizable layer at
    every step. Memory: at most about `max_bytes_per_layer` per layer (at least one item per call)."""
    from tqdm import tqdm

    targets = {k: v for k, v in quantizable_layers(model).items() if layers is None or k in layers}
    data = CalibrationData(num_steps=steps)
    calls = steps * math.ceil(n / batch_size)
    state = {"step": 0}
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        def fn(_module, args):
            x = args[0].detach()
            item_bytes = x[0].numel() * x.element_size()
            keep = max(1, min(len(x), max_bytes_per_layer // max(1, item_bytes * calls)))
            idx = torch.randperm(len(x), generator=gen)[:keep]
            data.inputs.setdefault(name, []).append(x[idx].clone())
            data.steps.setdefault(name, []).append(state["step"])
        return fn

    def record_timestep(step: int, t: int) -> None:
        if step == len(data.timesteps):
            data.timesteps.append(t)

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in targets.items()]
    try:
        labels = balanced_labels(n)
        for i in tqdm(range(0, n, batch_size), desc="calibration data", disable=not progress):
            sample_batch(model, scheduler, labels[i:i + batch_size], i, seed=seed, steps=steps, guidance=guidance,
                         callback=lambda s, t: (state.update(step=s), record_timestep(s, t)))
    finally:
        for h in handles:
            h.remove()
    return data
