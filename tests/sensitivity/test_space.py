"""The search space: options cached and reused, exact bits, configurations as recipes."""

import pytest
import torch

import diffquant as dq
from diffquant.accounting import bit_report
from diffquant.formats.additive import AdditiveWeight
from diffquant.methods.aquatic import AQSearch, layer_rows
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


def test_aq_options_need_calibration_then_join_the_cache_and_reproduce_as_a_recipe(tiny_unet, scheduler, tmp_path):
    import copy

    paper = all_options(bits=(3,), methods=("uaq",))
    space = SearchSpace(tiny_unet, paper, cache_dir=tmp_path).build(progress=False)
    name = space.layers[3]
    before = space.table[name]["uaq-3"].dequantize()
    with_aq = paper + [Option("aq", 3)]
    with pytest.raises(ValueError, match="calibration data"):
        SearchSpace(tiny_unet, with_aq, cache_dir=tmp_path).build(progress=False)
    calib = dq.collect(tiny_unet, scheduler, n=4, steps=3, batch_size=4, progress=False)
    fast = AQSearch(beam=2, kmeans_iters=4, adam_steps=5, max_rounds=1)
    full = SearchSpace(tiny_unet, with_aq, cache_dir=tmp_path, calib=calib, search=fast).build(progress=False)
    assert torch.equal(full.table[name]["uaq-3"].dequantize(), before)  # the cached option is kept, not rebuilt
    assert full.methods == ("uaq", "aq")
    errs = full.measure_output_error(calib)  # against the layer's own calibration outputs
    mod = tiny_unet.get_submodule(name)
    rows = torch.cat([layer_rows(mod, x) for x in calib.inputs[name]]).double()
    w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
    for k in ("uaq-3", "aq-3"):
        e = full.table[name][k].dequantize().double().reshape(w.shape) - w
        direct = float((rows @ e.T).pow(2).sum() / (rows @ w.T).pow(2).sum())
        assert errs[name][k] == pytest.approx(direct, rel=0.05)  # the Gram's 1% damping aside
    again = SearchSpace(tiny_unet, with_aq, cache_dir=tmp_path).build(progress=False)  # all cached: no calib needed
    config = {u: with_aq[i % 2] for i, u in enumerate(full.units)}
    applied = full.apply(full.quantized_model(), config)
    assert full.effective_bits(config) == pytest.approx(bit_report(applied)["effective_bits"], rel=1e-9)
    assert again.effective_bits(config) == full.effective_bits(config)
    recipe, pinned = full.to_recipe(config, "mixed-aq"), 0
    for u, ls in full.units.items():  # aq layers name the searched (M, B, g), not a budget a later rule re-reads
        for n in ls:
            wc, q = recipe.weight_for(n, set()), full.table[n][config[u].key]
            if isinstance(q, AdditiveWeight):
                assert wc.target_bits == 0 and wc.aq_spec(tuple(q.shape)) == q.spec
                pinned += 1
    assert pinned > 0
    recipe.to_json(tmp_path / "r.json")
    via_recipe = dq.quantize_(copy.deepcopy(tiny_unet), dq.get_recipe(str(tmp_path / "r.json")), calib=calib,
                              search=fast)
    for n in full.layers:
        torch.testing.assert_close(via_recipe.get_submodule(n).dense_weight(), applied.get_submodule(n).dense_weight())


def test_cached_aq_option_from_another_setting_rule_is_rebuilt(tiny_unet, scheduler, tmp_path):
    from diffquant.formats.additive import AdditiveSpec, AdditiveWeight

    options = [Option("aq", 3)]
    calib = dq.collect(tiny_unet, scheduler, n=4, steps=3, batch_size=4, progress=False)
    fast = AQSearch(beam=2, kmeans_iters=4, adam_steps=5, max_rounds=1)
    space = SearchSpace(tiny_unet, options, cache_dir=tmp_path, calib=calib, search=fast).build(progress=False)
    name = next(n for n in space.layers if isinstance(space.table[n]["aq-3"], AdditiveWeight))
    current = space.table[name]["aq-3"].spec
    # the cache as an earlier (M, B, g) rule would have left it: another setting under the same key
    path = tmp_path / f"{name}.pt"
    doc = torch.load(path, weights_only=False)
    doc["weights"]["aq-3"].spec = AdditiveSpec(current.codebooks, current.bits + 1, current.group)
    torch.save(doc, path)
    with pytest.raises(ValueError, match="another"):
        SearchSpace(tiny_unet, options, cache_dir=tmp_path).build(progress=False)
    again = SearchSpace(tiny_unet, options, cache_dir=tmp_path, calib=calib, search=fast).build(progress=False)
    assert again.table[name]["aq-3"].spec == current
