import pytest
import torch

from diffquant.metrics.inception_score import inception_score
from diffquant.metrics.paired import psnr, ssim
from diffquant.metrics.prdc import precision_recall


def test_inception_score_bounds():
    confident = torch.eye(10).repeat(200, 1) * 50  # every class equally often, each image certain
    assert inception_score(confident)[0] == pytest.approx(10, rel=0.05)
    assert inception_score(confident, splits=1)[0] == pytest.approx(10, rel=1e-6)
    assert inception_score(torch.zeros(100, 10))[0] == pytest.approx(1.0)


def test_precision_recall_extremes():
    real = torch.randn(300, 8)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    p, r = precision_recall(real, real + 100)
    assert p == 0.0 and r == 0.0
    p, r = precision_recall(real, real[:150] * 0.1)  # collapsed onto the mode: precise, low recall
    assert p > 0.9 and r < 0.5


def test_paired_scores():
    a = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    assert psnr(a, a) == pytest.approx(100.0)
    assert ssim(a, a) == pytest.approx(1.0)
    b = (a.int() + torch.randint(-20, 21, a.shape)).clamp(0, 255).to(torch.uint8)
    assert 15 < psnr(a, b) < 40 and ssim(a, b) < 0.99
