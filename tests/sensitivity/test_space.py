"""The search space: options cached and reused, exact bits, configurations as recipes."""

import pytest
import torch

import diffquant as dq
from diffquant.accounting import bit_report
from diffquant.sensitivity.space import Option, SearchSpace, all_options, tied_units


def _uniform(space, key):
    return {u: Option.parse(key) for u in space.units}


def test_attention_projections_are_tied():
    units = tied_units(["a.to_q", "a.to_k", "a.to_v", "a.to_out.0", "b.conv1"])
    assert units == {"a.qkv": ["a.to_q", "a.to_k", "a.to_v"], "a.to_out.0": ["a.to_out.0"], "b.conv1": ["b.conv1"]}


def test_effective_bits_match_the_models_bit_report(tiny_dit):
    space = SearchSpace(tiny_dit, all_options(bits=(2, 4))).build(progress=False)
    gen = torch.Generator().manual_seed(0)
    opts = space.options
    config = {u: opts[int(torch.randint(len(opts), (1,), generator=gen))] for u in space.units}
    q = space.apply(space.quantized_model(), config)
    assert space.effective_bits(config) == pytest.approx(bit_report(q)["effective_bits"], rel=1e-9)
    assert space.effective_bits(_uniform(space, "uaq-2")) < space.effective_bits(_uniform(space, "uaq-4"))


def test_lower_bits_give_larger_errors(tiny_unet):
    space = SearchSpace(tiny_unet, all_options(bits=(2, 4), methods=("uaq", "kmeans-c"))).build(progress=False)
    for name in space.layers:
        for m in ("uaq", "kmeans-c"):
            assert space.rel_error[name][f"{m}-2"] > space.rel_error[name][f"{m}-4"]


def test_cache_is_reused_and_recipe_reproduces_the_configuration(tiny_unet, tmp_path):
    opts = all_options(bits=(3,))
    space = SearchSpace(tiny_unet, opts, cache_dir=tmp_path).build(progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == len(space.layers)
    again = SearchSpace(tiny_unet, opts, cache_dir=tmp_path)
    again.build(progress=False)
    name = space.layers[3]
    assert torch.equal(again.table[name]["kmeans-a-3"].dequantize(), space.table[name]["kmeans-a-3"].dequantize())
    config = {u: opts[i % len(opts)] for i, u in enumerate(space.units)}
    applied = space.apply(space.quantized_model(), config)
    recipe = space.to_recipe(config, "mixed")
    recipe.to_json(tmp_path / "r.json")
    via_recipe = dq.quantize_(__import__("copy").deepcopy(tiny_unet), dq.get_recipe(str(tmp_path / "r.json")))
    for n in space.layers:
        torch.testing.assert_close(via_recipe.get_submodule(n).weight, applied.get_submodule(n).weight)


def test_incomplete_configuration_is_rejected(tiny_unet):
    space = SearchSpace(tiny_unet, all_options(bits=(4,), methods=("uaq",))).build(progress=False)
    config = _uniform(space, "uaq-4")
    config.pop(next(iter(config)))
    with pytest.raises(ValueError, match="missing"):
        space.effective_bits(config)
    with pytest.raises(ValueError, match="option keys"):
        Option.parse("uaq")
