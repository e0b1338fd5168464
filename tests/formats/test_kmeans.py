import pytest
import torch

from diffquant.formats import KMeansSpec, KMeansWeight, UniformSpec, UniformWeight


@pytest.mark.parametrize("spec", [KMeansSpec(4), KMeansSpec(3, "tensor"), KMeansSpec(2)])
def test_packed_round_trip_is_bit_exact(spec):
    w = torch.randn(16, 8, 3, 3)
    q = KMeansWeight.quantize(w, spec)
    assert torch.equal(KMeansWeight.from_packed(q.packed_state(), q.meta()).dequantize(), q.dequantize())


def test_per_channel_kmeans_beats_uniform_minmax():
    w = torch.randn(64, 256)
    for bits in (2, 3, 4):
        km = float((KMeansWeight.quantize(w, KMeansSpec(bits)).dequantize() - w).pow(2).mean())
        un = float((UniformWeight.quantize(w, UniformSpec(bits)).dequantize() - w).pow(2).mean())
        assert km < un


def test_codes_point_at_nearest_stored_centroid():
    w = torch.randn(4, 100)
    q = KMeansWeight.quantize(w, KMeansSpec(3))
    c = q.centroids.float()
    nearest = (w.reshape(4, 100, 1) - c[:, None, :]).abs().argmin(-1)
    assert torch.equal(q.codes.long(), nearest)


def test_bits_include_centroids():
    w = torch.randn(10, 1000)
    q = KMeansWeight.quantize(w, KMeansSpec(4))
    assert q.effective_bits() == pytest.approx(4 + 16 * 16 / 1000, abs=1e-3)
