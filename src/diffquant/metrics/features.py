"""The feature network behind every quality metric.

Inception-v3 weights cannot be downloaded here, so the metrics use a small MNIST classifier that
the project trains and ships (`diffquant zoo train features`). Any network that maps images to
the three outputs below can be swapped in (for example an Inception-v3 built with weights a user
has on disk): see `FeatureExtractor`.
  pool     pooled penultimate features  -> FID, FID-to-FP, precision / recall
  spatial  an early spatial feature map -> sFID
  logits   class logits                 -> IS, class accuracy
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from diffquant.data import feature_split, load_mnist
from diffquant.io_utils import atomic_path, write_json
from diffquant.provenance import provenance

CHECKPOINT = Path(__file__).parent / "checkpoints" / "mnist_features.safetensors"


class FeatureExtractor(Protocol):
    """Anything that maps images in [-1, 1], (N, C, H, W), to a dict with the keys `pool` (N, D),
    `spatial` (N, S) and `logits` (N, K)."""

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]: ...


class MnistFeatureNet(nn.Module):
    """A 5-convolution classifier for 32x32 digits (about 300k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()

        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.block1 = nn.Sequential(conv(1, 32), conv(32, 32), nn.MaxPool2d(2))  # 32 x 16 x 16
        self.block2 = nn.Sequential(conv(32, 64), conv(64, 64), nn.MaxPool2d(2))  # 64 x 8 x 8
        self.block3 = nn.Sequential(conv(64, 128), nn.MaxPool2d(2))  # 128 x 4 x 4
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h1 = self.block1(x)
        h3 = self.block3(self.block2(h1))
        pool = h3.mean(dim=(2, 3))
        # sFID: the first 8 channels of the first block's map, pooled to 8x8 (512 dims), in the
        # spirit of sFID's first 7 channels of Inception's mixed_6/conv map.
        spatial = F.adaptive_avg_pool2d(h1[:, :8], 8).flatten(1)
        return {"pool": pool, "spatial": spatial, "logits": self.fc(self.dropout(pool))}


class BatchedExtractor:
    """Runs a feature network in eval mode over any number of images, in batches, without grad."""

    def __init__(self, net: nn.Module, batch_size: int = 500):
        self.net = net.eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(images), self.batch_size):
            for k, v in self.net(images[i:i + self.batch_size].float()).items():
                outs.setdefault(k, []).append(v.double())
        return {k: torch.cat(v) for k, v in outs.items()}


def load_feature_net(path: Path | None = None) -> BatchedExtractor:
    path = Path(path) if path else CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(
            f"The feature network checkpoint {path} is missing. Fix: run `diffquant zoo train features`."
        )
    net = MnistFeatureNet()
    net.load_state_dict(load_file(path))
    return BatchedExtractor(net)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What generated digits differ by, so that the measuring network does not break on it: random
    shifts of up to 2 pixels, thicker or thinner strokes, and small changes of brightness, contrast
    and noise. (Trained on clean shifts only, the network called every generated digit with a
    background at -0.91 instead of -1 an "8".)"""
    n = len(x)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=gen)

    thick = F.max_pool2d(x, 3, 1, 1)
    thin = -F.max_pool2d(-x, 3, 1, 1)
    w = u(-0.5, 0.5)
    x = torch.where(w > 0, torch.lerp(x, thick, w.clamp(min=0)), torch.lerp(x, thin, (-w).clamp(min=0)))
    x = (x + 1) * u(0.8, 1.1) - 1 + u(-0.05, 0.2)
    x = (x + u(0, 0.08) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx = torch.randint(0, 5, (n,), generator=gen)
    dy = torch.randint(0, 5, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(32)[None]).view(n, 1, 32, 1).expand(n, 1, 32, 36)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32)[None]).view(n, 1, 1, 32).expand(n, 1, 32, 32)
    return out.gather(3, cols)


def accuracy(net: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    logits = BatchedExtractor(net)(images)["logits"]
    return float((logits.argmax(1) == labels).double().mean())


def train_feature_net(out: Path | None = None, epochs: int = 24, batch_size: int = 128, lr: float = 2e-3,
                      seed: int = 0, progress: bool = True) -> dict:
    """Trains on the split of `feature_split` (4,000 train / 1,000 held out), writes the
    checkpoint and a JSON record beside it, and returns the record."""
    out = Path(out) if out else CHECKPOINT
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, test = feature_split(load_mnist())
    net = MnistFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train) / batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
    t0 = time.time()
    for _ in tqdm(range(epochs), desc="train features", disable=not progress):
        net.train()
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch_size):
            idx = perm[i:i + batch_size]
            x = _augment(train.images[idx], gen)
            loss = F.cross_entropy(net(x)["logits"], train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    record = {
        "split": "last 100 images of each class (file order) held out: 4,000 train / 1,000 test",
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_accuracy": accuracy(net, train.images, train.labels),
        "held_out_accuracy": accuracy(net, test.images, test.labels),
        "wall_time_s": round(time.time() - t0, 1),
        **provenance(),
    }
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    write_json(out.with_suffix(".json"), record)
    return record
