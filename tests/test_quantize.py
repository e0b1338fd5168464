import json

import pytest
import torch

import diffquant as dq
from diffquant.config import QuantConfig, WeightConfig
from diffquant.nn.layers import QuantConv2d, QuantLinear
from diffquant.nn.swap import quantizable_layers
from diffquant.serialization import CheckpointError


def _eps(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10, 500, 900]), class_labels=torch.tensor([1, 2, 10])).sample


@pytest.mark.parametrize("fixture", ["tiny_unet", "tiny_dit"])
def test_quantize_replaces_every_selected_layer(fixture, request, scheduler):
    model = request.getfixturevalue(fixture)
    n = len(quantizable_layers(model))
    dq.quantize_(model, dq.get_recipe("w4a16"))
    q = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    assert len(q) == n and not quantizable_layers(model)


def test_w8_is_close_and_w2_is_far(tiny_unet):
    import copy

    ref = _eps(tiny_unet)
    errs = {}
    for r in ("w8a16", "w2a16"):
        m = copy.deepcopy(tiny_unet)
        dq.quantize_(m, QuantConfig(r, WeightConfig("uniform", int(r[1]))))
        errs[r] = float((_eps(m) - ref).pow(2).mean() / ref.pow(2).mean())
    assert errs["w8a16"] < 1e-3 < errs["w2a16"]


def test_include_exclude_patterns(tiny_unet):
    dq.quantize_(tiny_unet, QuantConfig(include=("down_blocks.*",), exclude=("*attentions*",)))
    names = {n for n, m in tiny_unet.named_modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    assert names and all(n.startswith("down_blocks.") and "attentions" not in n for n in names)


def test_io_layers_stay_at_8_bits(tiny_unet):
    dq.quantize_(tiny_unet, dq.get_recipe("w4a16"))
    assert tiny_unet.conv_in.qweight.spec.bits == 8 and tiny_unet.conv_out.qweight.spec.bits == 8
    assert tiny_unet.down_blocks[0].resnets[0].conv1.qweight.spec.bits == 4


@pytest.mark.parametrize("recipe", ["w4a8", "w3a8", "w8a8-ts"])
def test_save_load_round_trip_is_bit_exact(recipe, tiny_unet, scheduler, tmp_path):
    calib = dq.collect(tiny_unet, scheduler, n=4, steps=3, batch_size=4, progress=False)
    dq.quantize_(tiny_unet, dq.get_recipe(recipe), calib=calib)
    path = dq.save(tiny_unet, tmp_path / "q", scheduler)
    loaded, _ = dq.load(path)
    assert torch.equal(_eps(loaded), _eps(tiny_unet))
    meta = json.loads((path / "diffquant.json").read_text())
    assert meta["checkpoint_bytes"] == (path / "quantized.safetensors").stat().st_size


def test_timestep_ranges_have_a_row_per_calibrated_step_and_act_per_item(tiny_dit, scheduler):
    calib = dq.collect(tiny_dit, scheduler, n=4, steps=3, batch_size=4, progress=False)
    assert len(calib.timesteps) == 3 and calib.timesteps[0] > calib.timesteps[-1]
    dq.quantize_(tiny_dit, dq.get_recipe("w8a8-ts"), calib=calib)
    act = tiny_dit.transformer_blocks[0].attn1.to_q.act
    assert act.spec.steps == 3 and act.ts.tolist() == [float(t) for t in calib.timesteps]
    assert not torch.equal(act.hi[0], act.hi[-1])  # the ranges differ along the trajectory
    mixed = _eps(tiny_dit)  # items at timesteps 10, 500, 900: each uses its own row
    for i, t in enumerate((10, 500, 900)):
        x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))[i:i + 1]
        with torch.no_grad():
            one = tiny_dit(x, torch.tensor([t]), class_labels=torch.tensor([[1, 2, 10][i]])).sample
        assert torch.allclose(one[0], mixed[i], atol=1e-5)


def test_timestep_ranges_with_reconstruction_are_refused(tiny_dit, scheduler):
    import dataclasses

    recipe = dataclasses.replace(dq.get_recipe("w4a8-perstep"), act=dq.ActSpec(8, "timestep"))
    with pytest.raises(ValueError, match="timestep-wise"):
        dq.quantize_(tiny_dit, recipe, calib=dq.collect(tiny_dit, scheduler, n=2, steps=2, batch_size=2,
                                                       progress=False), scheduler=scheduler)


def test_low_bit_checkpoint_is_small(tiny_dit, scheduler, tmp_path):
    fp_bytes = sum(p.numel() * 4 for p in tiny_dit.parameters())
    dq.quantize_(tiny_dit, dq.get_recipe("w2a16"))
    path = dq.save(tiny_dit, tmp_path / "q", scheduler)
    assert (path / "quantized.safetensors").stat().st_size < 0.35 * fp_bytes


def test_truncated_checkpoint_is_a_clear_error(tiny_dit, scheduler, tmp_path):
    dq.quantize_(tiny_dit, dq.get_recipe("w4a16"))
    path = dq.save(tiny_dit, tmp_path / "q", scheduler)
    f = path / "quantized.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        dq.load(path)


def test_static_activations_without_calibration_say_how_to_fix(tiny_dit):
    with pytest.raises(ValueError, match="calib"):
        dq.quantize_(tiny_dit, dq.get_recipe("w4a8"))


def test_impossible_group_size_names_the_layer(tiny_dit):
    with pytest.raises(ValueError, match="does not divide"):
        dq.quantize_(tiny_dit, QuantConfig(weight=WeightConfig("uniform", 4, group_size=7)))


@pytest.mark.parametrize("name", ["w4a6", "aq-w2a8", "aq-w1.5a8-noft"])
def test_recipe_json_round_trip(tmp_path, name):
    r = dq.get_recipe(name)
    r.to_json(tmp_path / "r.json")
    assert dq.get_recipe(str(tmp_path / "r.json")) == r
    (tmp_path / "bad.json").write_text('{"weight": {"bits": 4}, "colour": 1}')
    with pytest.raises(ValueError, match="colour"):
        dq.get_recipe(str(tmp_path / "bad.json"))


def test_aq_config_quantizes_saves_and_loads_bit_exactly(tiny_unet, scheduler, tmp_path):
    calib = dq.collect(tiny_unet, scheduler, n=4, steps=3, batch_size=4, progress=False)
    fast = dq.methods.aquatic.AQSearch(adam_steps=10, max_rounds=1, kmeans_iters=4)
    dq.quantize_(tiny_unet, dq.AQConfig(target_bits=3.0), calib=calib, search=fast)
    convs = [m for m in tiny_unet.modules() if isinstance(m, QuantConv2d) and m.qweight.shape[-1] == 3]
    aq = [m for m in convs if m.qweight.format == "additive"]
    assert aq and all(m.qweight.spec.group == 9 for m in aq)  # KAQ: one kernel slice per group
    # layers too small for any codebook to pay off fall back to uniform, and the log says so
    small = [n for n, e in tiny_unet.dq_aq_log.items() if "fallback" in e]
    assert all(tiny_unet.get_submodule(n).qweight.format == "uniform" for n in small)
    path = dq.save(tiny_unet, tmp_path / "q", scheduler)
    loaded, _ = dq.load(path)
    assert torch.equal(_eps(loaded), _eps(tiny_unet))


def test_aq_resumes_from_finished_layers(tiny_dit, scheduler, tmp_path):
    import copy

    calib = dq.collect(tiny_dit, scheduler, n=4, steps=3, batch_size=4, progress=False)
    fast = dq.methods.aquatic.AQSearch(adam_steps=10, max_rounds=1, kmeans_iters=4)
    first = dq.quantize_(copy.deepcopy(tiny_dit), dq.AQConfig(3.0, act_bits=None), calib=calib, search=fast,
                         resume_dir=tmp_path / "layers")
    again = dq.quantize_(copy.deepcopy(tiny_dit), dq.AQConfig(3.0, act_bits=None), calib=calib, search=fast,
                         resume_dir=tmp_path / "layers")
    searched = [e for e in again.dq_aq_log.values() if "fallback" not in e]
    assert searched and all(e.get("resumed") for e in searched)
    assert torch.equal(_eps(first), _eps(again))
    # another budget gives other settings; its layers are searched and kept beside the first budget's
    other = dq.quantize_(copy.deepcopy(tiny_dit), dq.AQConfig(2.0, act_bits=None), calib=calib, search=fast,
                         resume_dir=tmp_path / "layers")
    assert not any(e.get("resumed") for e in other.dq_aq_log.values() if "fallback" not in e)
    third = dq.quantize_(copy.deepcopy(tiny_dit), dq.AQConfig(3.0, act_bits=None), calib=calib, search=fast,
                         resume_dir=tmp_path / "layers")
    assert all(e.get("resumed") for e in third.dq_aq_log.values() if "fallback" not in e)


def test_aq_without_calibration_says_how_to_fix(tiny_dit):
    with pytest.raises(ValueError, match="calib"):
        dq.quantize_(tiny_dit, dq.get_recipe("aq-w2a16"))


def test_finetuning_recipe_without_scheduler_says_how_to_fix(tiny_dit, scheduler):
    calib = dq.collect(tiny_dit, scheduler, n=4, steps=3, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="scheduler"):
        dq.quantize_(tiny_dit, dq.get_recipe("aq-w2a8"), calib=calib)


def test_laq_writes_a_per_layer_allocation_within_the_target(tiny_unet, scheduler, tmp_path):
    import json

    calib = dq.collect(tiny_unet, scheduler, n=4, steps=3, batch_size=4, progress=False)
    fast = dq.methods.aquatic.AQSearch(adam_steps=5, max_rounds=1, kmeans_iters=3)
    dq.quantize_(tiny_unet, dq.AQConfig(target_bits=3.0, act_bits=None, laq=True), calib=calib, search=fast,
                 scheduler=scheduler)
    from diffquant.accounting import bit_report

    assert tiny_unet.dq_laq_log and bit_report(tiny_unet)["effective_bits"] <= 3.0 + 1e-6
    path = dq.save(tiny_unet, tmp_path / "q", scheduler)
    recipe = json.loads((path / "diffquant.json").read_text())["quantization"]["recipe"]
    assert set(tiny_unet.dq_laq_log) <= set(recipe["layers"])  # the allocation is saved with the model


def test_aq_budget_below_codebook_cost_is_a_clear_error(tiny_unet, scheduler):
    calib = dq.collect(tiny_unet, scheduler, n=4, steps=3, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="higher target_bits"):
        dq.quantize_(tiny_unet, QuantConfig(weight=WeightConfig("aq", target_bits=0.5)), calib=calib)


@pytest.mark.parametrize("laq", [False, True])
def test_impossible_budget_is_caught_before_calibration(tiny_unet, laq):
    from diffquant.quantize import check_budget

    with pytest.raises(ValueError, match="target"):
        check_budget(tiny_unet, QuantConfig(weight=WeightConfig("aq", target_bits=0.5), laq=laq))
    check_budget(tiny_unet, dq.AQConfig(target_bits=4.0, laq=laq))  # a feasible one passes
