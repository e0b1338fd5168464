import pytest
import torch

from diffquant.formats import AdditiveSpec, AdditiveWeight


def _random(spec: AdditiveSpec, shape=(12, 4, 3, 3), seed=0) -> AdditiveWeight:
    g = torch.Generator().manual_seed(seed)
    out, d = shape[0], int(torch.tensor(shape[1:]).prod())
    codes = torch.randint(0, 1 << spec.bits, (out, d // spec.group, spec.codebooks), generator=g)
    books = torch.randn(spec.codebooks, 1 << spec.bits, spec.group, generator=g)
    return AdditiveWeight(codes, books, torch.rand(out, generator=g) + 0.5, shape, spec)


def test_dequantize_matches_the_definition():
    spec = AdditiveSpec(codebooks=3, bits=5, group=9)
    w = _random(spec)
    books, scale = w.codebooks.float(), w.scale.float()
    ref = torch.zeros(12, 4, 9)
    for o in range(12):
        for j in range(4):
            ref[o, j] = scale[o] * sum(books[m, w.codes[o, j, m]] for m in range(3))
    assert torch.allclose(w.dequantize(), ref.reshape(12, 4, 3, 3), atol=1e-6)


@pytest.mark.parametrize("spec", [AdditiveSpec(1, 8, 4), AdditiveSpec(2, 5, 9), AdditiveSpec(4, 3, 9),
                                  AdditiveSpec(1, 12, 6)])
def test_packed_round_trip_is_bit_exact_and_counted(spec):
    w = _random(spec, shape=(12, 4, 3, 3) if 36 % spec.group == 0 else (12, 24))
    back = AdditiveWeight.from_packed(w.packed_state(), w.meta())
    assert torch.equal(back.codes.long(), w.codes.long())
    assert torch.equal(back.dequantize(), w.dequantize())
    # the accounting from the packed tensors equals the closed form of the spec
    assert w.effective_bits() == pytest.approx(spec.effective_bits(w.out_features, w.in_flat))


def test_mismatched_state_is_a_clear_error():
    w = _random(AdditiveSpec(2, 4, 9))
    meta = w.meta()
    meta["spec"] = {**meta["spec"], "bits": 5}
    with pytest.raises(ValueError, match="do not match|truncated"):
        AdditiveWeight.from_packed(w.packed_state(), meta)


def test_bad_spec_says_what_is_wrong():
    with pytest.raises(ValueError, match="codebooks"):
        AdditiveSpec(codebooks=0)
