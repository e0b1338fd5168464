"""Image-by-image comparison of a model's samples with the FP model's samples from the same noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] float images, (N, 1, H, W) or (N, H, W), to float64 in [0, 1]."""
    x = torch.as_tensor(x)
    x = x.double() / 255.0 if x.dtype == torch.uint8 else (x.double() + 1) / 2
    return x[:, None] if x.dim() == 3 else x


def psnr(a, b, max_db: float = 100.0) -> float:
    """Mean over images of 10 log10(1 / MSE), with identical images capped at `max_db`."""
    a, b = _unit(a), _unit(b)
    mse = (a - b).pow(2).flatten(1).mean(1)
    db = 10 * torch.log10(1.0 / mse.clamp_min(10 ** (-max_db / 10)))
    return float(db.mean())


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim(a, b) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 0.01, K2 0.03, valid region)."""
    a, b = _unit(a), _unit(b)
    c = a.shape[1]
    w = _gaussian_window().expand(c, 1, -1, -1)

    def filt(x):
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.mean())
