"""Frechet distance between Gaussians fitted to features (FID, sFID, FID-to-FP)."""

from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"features must be (N>=2, D), got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix S1^(1/2) S2 S1^(1/2), which has the same spectrum as S1 S2: no complex
    parts to discard and no failure on singular covariances (which scipy's sqrtm can hit).
    """
    r = _sqrt_psd(s1)
    eig = np.linalg.eigvalsh(r @ s2 @ r)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean, 0.0))


def fid_from_features(a, b) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
