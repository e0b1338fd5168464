"""Sample grids as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffquant.io_utils import atomic_path


def grid_image(images: np.ndarray, cols: int = 10, pad: int = 2, scale: int = 2) -> Image.Image:
    """uint8 images (N, 1, H, W) or (N, H, W) to one grayscale grid (row-major, `cols` per row)."""
    imgs = np.asarray(images)
    if imgs.ndim == 4:
        imgs = imgs[:, 0]
    n, h, w = imgs.shape
    rows = (n + cols - 1) // cols
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 128, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    img = Image.fromarray(canvas, mode="L")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def save_grid(images: np.ndarray, path: str | Path, cols: int = 10) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        grid_image(images, cols).save(tmp, format="PNG")
    return path
