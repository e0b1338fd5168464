import pytest
import torch

from diffquant.nn.act import ActQuantizer, ActSpec


def test_static_quantizer_fits_range_over_all_observed_batches():
    g = torch.Generator().manual_seed(0)
    q = ActQuantizer(ActSpec(8, "static"))
    q.start_observing()
    for scale in (0.1, 1.0, 3.0):  # e.g. three timesteps with different ranges
        q(torch.randn(64, 32, generator=g) * scale)
    q.finish_observing()
    x = torch.randn(64, 32, generator=g) * 3.0
    assert float((q(x) - x).pow(2).mean() / x.pow(2).mean()) < 1e-3
    assert float(q.hi) > 6.0  # the widest timestep decides the range (up to MSE-optimal clipping)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_error_falls_with_bits(mode):
    x = torch.randn(16, 64, 8, 8)
    errs = []
    for bits in (4, 6, 8):
        q = ActQuantizer(ActSpec(bits, mode), channel_dim=1)
        if mode == "static":
            q.start_observing()
            q(x)
            q.finish_observing()
        errs.append(float((q(x) - x).pow(2).mean()))
    assert errs[0] > errs[1] > errs[2]


def test_dynamic_is_per_token():
    x = torch.randn(4, 10, 16)
    x[0, 0] *= 100  # one loud token must not hurt the others
    y = ActQuantizer(ActSpec(8, "dynamic"))(x)
    assert float((y[1:] - x[1:]).abs().max()) < 0.05


def test_uncalibrated_static_quantizer_says_how_to_fix():
    with pytest.raises(RuntimeError, match="calib"):
        ActQuantizer(ActSpec(8, "static"))(torch.randn(3, 3))
