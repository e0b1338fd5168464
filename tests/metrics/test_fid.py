import numpy as np
import pytest
import torch

from diffquant.metrics.fid import fid_from_features, frechet_distance, gaussian_stats


def test_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-9)


def test_matches_closed_form_for_commuting_full_covariances():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.2, 3, 6), rng.uniform(0.2, 3, 6)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    closed = np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(np.zeros(6), s1, np.zeros(6), s2) == pytest.approx(closed, rel=1e-8)


def test_sample_estimate_converges_to_the_true_distance():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, size=(20000, 4))
    y = rng.normal(0.5, 2, size=(20000, 4))
    true = 4 * 0.25 + 4 * (1 + 4 - 2 * 2)
    assert fid_from_features(x, y) == pytest.approx(true, rel=0.03)


def test_identical_sets_have_zero_distance_and_singular_covariance_is_fine():
    f = torch.randn(10, 50)  # fewer samples than dimensions: singular covariance
    assert fid_from_features(f, f) == pytest.approx(0, abs=1e-6)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="features"):
        gaussian_stats(np.zeros(5))
