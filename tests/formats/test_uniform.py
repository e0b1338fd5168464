import pytest
import torch

from diffquant.formats import UniformSpec, UniformWeight


def _err(w, spec):
    return float((UniformWeight.quantize(w, spec).dequantize() - w).pow(2).mean())


@pytest.mark.parametrize("spec", [UniformSpec(4), UniformSpec(3, 8, clip="lp"), UniformSpec(2, 8),
                                  UniformSpec(8, symmetric=True), UniformSpec(4, 0, symmetric=True, clip="lp")])
def test_packed_round_trip_is_bit_exact(spec):
    w = torch.randn(24, 8, 3, 3)
    q = UniformWeight.quantize(w, spec)
    q2 = UniformWeight.from_packed(q.packed_state(), q.meta())
    assert torch.equal(q2.dequantize(), q.dequantize())
    assert q.dequantize().shape == w.shape


def test_error_falls_with_bits_and_groups():
    w = torch.randn(64, 128)
    errs = [_err(w, UniformSpec(b)) for b in (2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)
    assert _err(w, UniformSpec(3, group_size=16)) < _err(w, UniformSpec(3))


def test_lp_clipping_beats_minmax_at_low_bits():
    w = torch.randn(64, 256)
    w[:, 0] *= 8  # one outlier column: min-max wastes the grid on it
    assert _err(w, UniformSpec(3, clip="lp")) < _err(w, UniformSpec(3))


def test_effective_bits_count_scales_and_zeros():
    w = torch.randn(32, 64)
    q = UniformWeight.quantize(w, UniformSpec(4, group_size=16))
    # 4 bits a weight + per group of 16: a 16-bit scale and a 4-bit zero point
    assert q.effective_bits() == pytest.approx(4 + (16 + 4) / 16, abs=1e-3)


def test_group_that_does_not_divide_the_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide .*conv1.*288"):
        UniformWeight.quantize(torch.randn(8, 32, 3, 3), UniformSpec(4, group_size=64), name="conv1")


def test_bad_spec_is_refused():
    with pytest.raises(ValueError, match="bits"):
        UniformSpec(0)
    with pytest.raises(ValueError, match="clip"):
        UniformSpec(4, clip="percentile")
