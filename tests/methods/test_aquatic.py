import pytest
import torch
import torch.nn as nn

from diffquant.formats import UniformSpec, UniformWeight
from diffquant.formats.additive import AdditiveSpec, dequantize_additive
from diffquant.methods.aquatic import (
    AQSearch,
    beam_search,
    choose_spec,
    gram,
    init_additive,
    quantize_layer,
    rate_bits,
    relative_error,
    spec_options,
)


def _correlated_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3, d)


def test_conv_gram_is_the_gram_of_the_patches_the_weight_multiplies():
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 6, 6)
    h = gram(conv, [x], damp=0.0)
    y = conv(x).permute(0, 2, 3, 1).reshape(-1, 5)
    w = conv.weight.detach().reshape(5, -1)
    # ||W X||^2 / N computed through H equals the conv output's energy
    assert torch.allclose(((w @ h) * w).sum(), y.pow(2).sum() / y.shape[0], rtol=1e-4)


def test_beam_search_never_increases_the_error():
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    x = _correlated_inputs(256, 32)
    h = x.T @ x / 256
    spec = AdditiveSpec(2, 4, 8)
    codes, books, scale = init_additive(w, spec, 4, torch.Generator().manual_seed(0))
    before = relative_error(w, dequantize_additive(codes, books, scale), h)
    for beam in (1, 4):
        new = beam_search(w, h, codes, books, scale, 0, beam)
        after = relative_error(w, dequantize_additive(new, books, scale), h)
        assert after <= before + 1e-6


def test_layer_search_lowers_error_and_beats_rtn_at_fewer_bits():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    x = _correlated_inputs(512, 64)
    h = x.T @ x / 512
    spec = AdditiveSpec(2, 6, 8)  # 1.5 code bits + codebooks
    res = quantize_layer(w, h, spec, AQSearch(adam_steps=30, max_rounds=3))
    assert res.rel_error < 0.7 * res.rel_error_init
    rtn = UniformWeight.quantize(w, UniformSpec(2))
    assert res.rel_error < relative_error(w, rtn.dequantize(), h)
    assert res.weight.dequantize().shape == w.shape


def test_choose_spec_respects_the_budget_and_explains_when_it_cannot():
    for shape in [(128, 128, 3, 3), (64, 64), (768, 128)]:
        for target in (1.5, 2.0, 4.0):
            s = choose_spec(shape, target)
            d = int(torch.tensor(shape[1:]).prod())
            assert s.effective_bits(shape[0], d) <= target
    assert choose_spec((128, 128, 3, 3), 2.0).group == 9  # KAQ: one kernel slice
    assert choose_spec((128, 128, 3, 3), 2.0, kernel_aware=False).group in (4, 8, 16)
    with pytest.raises(ValueError, match="no additive setting fits"):
        choose_spec((4, 8), 1.0)


def test_choose_spec_prefers_one_codebook_on_short_codewords_but_not_on_kernel_slices():
    # a 4-bit budget on a 128 x 128 linear: 3x5 on quadruples has more code bits (3.75) than 1x7 on
    # pairs (3.5), but two extra codebooks cost half a rate bit, so the single codebook on pairs wins
    assert rate_bits(AdditiveSpec(3, 5, 4)) == 3.25 and rate_bits(AdditiveSpec(1, 7, 2)) == 3.5
    assert choose_spec((128, 128), 4.0) == AdditiveSpec(1, 7, 2)
    # kernel slices keep the plain code-bit count: several small codebooks stay allowed
    assert rate_bits(AdditiveSpec(6, 4, 9)) == AdditiveSpec(6, 4, 9).code_bits_per_weight
    assert choose_spec((64, 32, 3, 3), 4.0).codebooks > 1


def test_one_channel_convolution_is_grouped_like_a_linear_layer():
    # a 4x4 patch embedding of one channel: its only kernel slice is the whole filter, so KAQ would make
    # each filter one codeword; it gets flat groups instead, while a 1-channel 3x3 (9 inputs, which no
    # flat group divides) keeps its kernel slice
    assert {s.group for s in spec_options((128, 1, 4, 4))} == {2, 4, 8, 16}
    assert choose_spec((128, 1, 4, 4), 4.0).group < 16
    assert {s.group for s in spec_options((32, 1, 3, 3))} == {9}
    assert {s.group for s in spec_options((32, 4, 3, 3))} == {9}


def test_group_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_layer(torch.randn(4, 10), torch.eye(10), AdditiveSpec(1, 4, 8))


def test_laq_allocation_meets_the_budget_and_favours_sensitive_layers():
    from diffquant.methods.laq import allocate

    shapes = {"a": (128, 128, 3, 3), "b": (128, 128, 3, 3), "c": (128, 512)}
    sens = {"a": {"sens": 100.0, "layer_error": 0.1}, "b": {"sens": 1.0, "layer_error": 0.1},
            "c": {"sens": 1.0, "layer_error": 0.1}}
    alloc = allocate(shapes, sens, 2.0)
    size = {n: int(torch.tensor(s).prod()) for n, s in shapes.items()}
    avg = sum(alloc[n].eff_bits * size[n] for n in shapes) / sum(size.values())
    assert avg <= 2.0
    assert alloc["a"].eff_bits > alloc["b"].eff_bits  # same shape, 100x more sensitive: more bits
    with pytest.raises(ValueError, match="raise the target"):
        allocate(shapes, sens, 0.5)
