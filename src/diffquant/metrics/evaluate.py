"""All quality metrics of the `mnist32` protocol for one set of samples."""

from __future__ import annotations

import numpy as np
import torch

from diffquant.data import from_uint8, load_mnist
from diffquant.metrics.features import FeatureExtractor, load_feature_net
from diffquant.metrics.fid import fid_from_features, frechet_distance, gaussian_stats
from diffquant.metrics.inception_score import inception_score
from diffquant.metrics.paired import psnr, ssim
from diffquant.metrics.prdc import precision_recall

_REAL: dict[int, dict[str, torch.Tensor]] = {}


def real_features(extractor: FeatureExtractor, real_images: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Features of the real images (default: all 5,000), cached per extractor."""
    if real_images is not None:
        return extractor(real_images)
    key = id(extractor)
    if key not in _REAL:
        _REAL[key] = extractor(load_mnist().images)
    return _REAL[key]


def evaluate(images: np.ndarray | torch.Tensor, labels: torch.Tensor | np.ndarray,
             ref_images: np.ndarray | torch.Tensor | None = None,
             extractor: FeatureExtractor | None = None, k: int = 3,
             real_images: torch.Tensor | None = None) -> dict:
    """FID, sFID, IS, precision, recall against the real data; class accuracy of the requested
    labels; and, given the FP model's samples from the same noise, FID-to-FP, PSNR and SSIM."""
    extractor = extractor or load_feature_net()
    imgs = from_uint8(images) if np.asarray(images).dtype == np.uint8 else torch.as_tensor(images).float()
    labels = torch.as_tensor(np.asarray(labels)).long()
    if len(imgs) != len(labels):
        raise ValueError(f"{len(imgs)} images but {len(labels)} labels")
    real = real_features(extractor, real_images)
    fake = extractor(imgs)
    is_mean, is_std = inception_score(fake["logits"])
    precision, recall = precision_recall(real["pool"], fake["pool"], k=k)
    out = {
        "n": len(imgs),
        "fid": fid_from_features(real["pool"], fake["pool"]),
        "sfid": fid_from_features(real["spatial"], fake["spatial"]),
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "class_accuracy": float((fake["logits"].argmax(1) == labels).double().mean()),
    }
    if ref_images is not None:
        ref = from_uint8(ref_images) if np.asarray(ref_images).dtype == np.uint8 else torch.as_tensor(ref_images)
        if ref.shape != imgs.shape:
            raise ValueError(f"reference samples {tuple(ref.shape)} do not match samples {tuple(imgs.shape)}")
        ref_f = extractor(ref)
        out["fid_to_fp"] = frechet_distance(*gaussian_stats(ref_f["pool"]), *gaussian_stats(fake["pool"]))
        out["psnr"] = psnr(ref, imgs)
        out["ssim"] = ssim(ref, imgs)
    return out
