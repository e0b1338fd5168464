import copy

import pytest
import torch
import torch.nn as nn

from diffquant.nn.act import ActQuantizer, ActSpec, TimestepClock, attach_clock


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


def _timestep_quantizer(scales: dict[int, float], split: int = 0, channel_dim: int = -1) -> ActQuantizer:
    """A timestep quantizer calibrated on inputs whose scale depends on the step (step -> scale)."""
    g = torch.Generator().manual_seed(1)
    q = ActQuantizer(ActSpec(8, "timestep", split=split), channel_dim)
    q.start_observing()
    for step, scale in scales.items():
        q.observe(torch.randn(64, 32, generator=g) * scale, step)
    q.finish_observing(timesteps=[999 - 100 * s for s in range(10)])
    return q


def test_timestep_ranges_follow_each_steps_scale():
    q = _timestep_quantizer({0: 10.0, 1: 1.0, 2: 0.1})
    assert q.spec.steps == 3 and q.ts.tolist() == [999.0, 899.0, 799.0]
    static = ActQuantizer(ActSpec(8, "static"))
    static.start_observing()
    g = torch.Generator().manual_seed(1)
    for scale in (10.0, 1.0, 0.1):
        static.observe(torch.randn(64, 32, generator=g) * scale)
    static.finish_observing()
    q.clock = TimestepClock()
    x = torch.randn(64, 32) * 0.1
    q.clock.t = torch.tensor([805])  # nearest calibrated timestep: 799, the small-scale step
    err_ts = float((q(x) - x).pow(2).mean())
    err_static = float((static(x) - x).pow(2).mean())
    assert err_ts < err_static / 100  # the step's own range is ~100x narrower than the widest step's


def test_timestep_rows_are_chosen_per_item_when_timesteps_differ():
    q = _timestep_quantizer({0: 10.0, 2: 0.1}, split=16)
    q.clock = TimestepClock()
    x = torch.randn(2, 32) * 0.1
    q.clock.t = torch.tensor([999, 799])
    mixed = q(x)
    for i, t in enumerate((999, 799)):
        q.clock.t = torch.tensor([t])
        assert torch.equal(mixed[i], q(x[i:i + 1])[0])
    q.clock.t = torch.tensor([999, 799, 799])
    with pytest.raises(RuntimeError, match="one timestep per batch item"):
        q(x)


def test_timestep_quantizer_without_a_clock_says_how_to_fix():
    q = _timestep_quantizer({0: 1.0})
    with pytest.raises(RuntimeError, match="attach_clock"):
        q(torch.randn(3, 32))
    with pytest.raises(ValueError, match="timestep value"):
        qq = ActQuantizer(ActSpec(8, "timestep"))
        qq.start_observing()
        qq.observe(torch.randn(3, 3), 4)
        qq.finish_observing(timesteps=[999, 899])


def test_act_spec_rejects_steps_outside_timestep_mode():
    with pytest.raises(ValueError, match="needs mode 'timestep'"):
        ActSpec(8, "static", steps=3)
    with pytest.raises(ValueError, match="one of static, timestep, dynamic"):
        ActSpec(8, "per-step")


class _TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x, t, class_labels=None):
        return self.inner(x)


def test_clock_follows_the_models_timestep_and_survives_deepcopy():
    model = _TinyDenoiser()
    q = _timestep_quantizer({0: 10.0, 2: 0.1})
    model.inner.register_forward_pre_hook(lambda _m, args: (q(args[0]),))
    model.inner.act = q  # so attach_clock finds it
    clock = attach_clock(model)
    assert attach_clock(model) is clock  # idempotent: one hook
    model(torch.randn(2, 4), torch.tensor([805, 805]))
    assert clock.t.tolist() == [805, 805]
    twin = copy.deepcopy(model)
    twin(torch.randn(2, 4), torch.tensor([999, 999]))
    assert clock.t.tolist() == [805, 805] and twin.dq_clock.t.tolist() == [999, 999]
    assert twin.inner.act.clock is twin.dq_clock
