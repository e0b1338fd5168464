import copy

import pytest
import torch

import diffquant as dq
from diffquant.config import QuantConfig, WeightConfig
from diffquant.kernels import dispatch
from diffquant.methods.accuquant import (
    ReconConfig,
    fp_trajectories,
    group_loss_and_grad,
    reconstruct,
    step_coefficients,
)
from diffquant.methods.recon import Trainable, skip_splits, unit_layers
from diffquant.models import meta_of
from diffquant.nn.act import ActSpec

TINY = dict(iters=12, batch_size=4, trajectories=8, sample_steps=4)


def _rtn(model, scheduler, wbits=3, abits=8, split=True):
    calib = dq.collect(model, scheduler, n=4, steps=4, batch_size=4, progress=False)
    cfg = QuantConfig(name=f"t-w{wbits}a{abits}", weight=WeightConfig("uniform", wbits, clip="lp"),
                      act=ActSpec(abits, "static"), split_skips=split)
    return dq.quantize_(copy.deepcopy(model), cfg, calib=calib)


def _out(model, x):
    t = torch.full((len(x),), 500)
    return model(x, t, class_labels=torch.arange(len(x)) % 10).sample


def test_units_cover_every_quantized_layer_once(tiny_unet, tiny_dit, scheduler):
    for model in (tiny_unet, tiny_dit):
        q = _rtn(model, scheduler, split=False)
        units = unit_layers(q)
        names = [n for u in units.values() for n in u]
        assert len(names) == len(set(names)) == len(dq.quantize.quantized_layers(q))
        assert list(units)[-1] == "rest"


def test_skip_splits_find_the_concatenations(tiny_unet):
    splits = skip_splits(tiny_unet)
    # first up block: mid width 16 + skip; the split is where the skip begins
    assert splits["up_blocks.0.resnets.0.conv1"] == 16
    assert all(tiny_unet.get_submodule(n).in_channels > c for n, c in splits.items())


@pytest.mark.parametrize("objective", ["perstep", pytest.param("accuquant", marks=pytest.mark.slow)])
def test_reconstruction_lowers_error_and_stores_integer_codes(tiny_unet, scheduler, objective):
    q = _rtn(tiny_unet, scheduler)
    before = {n: m.qweight.codes.clone() for n, m in dq.quantize.quantized_layers(q).items()}
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _out(tiny_unet, x)
        err0 = (_out(q, x) - ref).pow(2).mean()
    iters = 40 if objective == "perstep" else 16  # an AccuQuant iteration is 2M model calls, not one block's
    cfg = ReconConfig(objective=objective, group_steps=2, lr=5e-3, **{**TINY, "iters": iters})
    log = reconstruct(q, tiny_unet, scheduler, cfg, progress=False)
    with torch.no_grad():
        err1 = (_out(q, x) - ref).pow(2).mean()
    assert err1 < err0
    assert sum(u["loss_last"] < u["loss_first"] for u in log["units"].values()) >= len(log["units"]) // 2
    changed = 0
    for n, m in dq.quantize.quantized_layers(q).items():
        d = m.qweight.codes.float() - before[n].float()
        assert d.abs().max() <= 1  # AdaRound only chooses between floor and ceil
        changed += int((d != 0).sum())
        torch.testing.assert_close(m.weight, m.qweight.dequantize())  # hard codes are what runs
    assert changed > 0


def test_reconstructed_model_round_trips(tiny_unet, scheduler, tmp_path):
    q = _rtn(tiny_unet, scheduler)
    reconstruct(q, tiny_unet, scheduler, ReconConfig(**TINY), progress=False)
    dq.save(q, tmp_path / "q", scheduler)
    back, _ = dq.load(tmp_path / "q")
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(_out(back, x), _out(q, x))
    split = back.get_submodule("up_blocks.0.resnets.0.conv1").act
    assert split.spec.split == 16 and split.lo.shape == (2,) and not torch.equal(split.lo[0], split.lo[1])


def _grads(q, teacher, scheduler, m, start, grad, jac="x0"):
    cfg = ReconConfig(objective="accuquant", trajectories=4, sample_steps=8)
    traj = fp_trajectories(teacher, scheduler, cfg)
    meta = meta_of(teacher)
    units = unit_layers(q)
    tr = Trainable(units["up_blocks.0"], teacher)
    params = tr.weight_params + tr.act_params
    coeffs = step_coefficients(scheduler, traj.timesteps, jac)
    with dispatch.force("reference"):
        group_loss_and_grad(q, scheduler, tr, traj.x[start], traj.labels, traj.x[start + m],
                            traj.timesteps[start:start + m], meta.guidance_scale, meta.null_class, grad,
                            coeffs[start:start + m])
    g = torch.cat([p.grad.reshape(-1) for p in params])
    tr.finish()
    return g


def test_o1_gradient_is_exact_for_one_step_and_close_for_several(tiny_unet, scheduler):
    q = _rtn(tiny_unet, scheduler)
    for p in q.parameters():
        p.requires_grad_(False)
    g1e, g1o = _grads(q, tiny_unet, scheduler, 1, 3, "exact"), _grads(q, tiny_unet, scheduler, 1, 3, "o1")
    torch.testing.assert_close(g1o, g1e, rtol=1e-4, atol=1e-6)
    g4e, g4o = _grads(q, tiny_unet, scheduler, 4, 2, "exact"), _grads(q, tiny_unet, scheduler, 4, 2, "o1")
    cos = torch.nn.functional.cosine_similarity(g4e, g4o, dim=0)
    assert cos > 0.9, f"O(1) gradient too far from the exact one: cosine {cos:.3f}"


def test_resume_skips_finished_units(tiny_unet, scheduler, tmp_path):
    q = _rtn(tiny_unet, scheduler)
    cfg = ReconConfig(**TINY)
    log = reconstruct(copy.deepcopy(q), tiny_unet, scheduler, cfg, progress=False, resume_dir=tmp_path, name="r")
    again = copy.deepcopy(q)
    log2 = reconstruct(again, tiny_unet, scheduler, cfg, progress=False, resume_dir=tmp_path, name="r")
    assert log2["units"] == log["units"]  # every unit came from the state file, none was redone
    pairs = zip(dq.quantize.quantized_layers(q).values(), dq.quantize.quantized_layers(again).values(), strict=True)
    assert any(not torch.equal(a.qweight.codes, b.qweight.codes) for a, b in pairs)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="objective"):
        ReconConfig(objective="brecq")
    with pytest.raises(ValueError, match="group_steps"):
        ReconConfig(group_steps=30, sample_steps=20)


def test_recipe_without_scheduler_says_how_to_fix(tiny_unet, scheduler):
    calib = dq.collect(tiny_unet, scheduler, n=2, steps=2, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="scheduler=scheduler"):
        dq.quantize_(copy.deepcopy(tiny_unet), dq.get_recipe("w4a8-accuquant"), calib=calib)


def test_fp_blocks_swaps_in_the_teachers_blocks_and_restores(tiny_unet, scheduler):
    from diffquant.methods.accuquant import _fp_blocks

    q = _rtn(tiny_unet, scheduler)
    mine = q.up_blocks[1]
    with _fp_blocks(q, tiny_unet, ["up_blocks.1", "mid_block"]):
        assert q.up_blocks[1] is tiny_unet.up_blocks[1] and q.mid_block is tiny_unet.mid_block
        assert q.up_blocks[0] is not tiny_unet.up_blocks[0]
    assert q.up_blocks[1] is mine and q.mid_block is not tiny_unet.mid_block


def test_balanced_starts_weigh_every_start_by_its_own_rtn_loss(tiny_unet, scheduler, tmp_path):
    from diffquant.methods.accuquant import _start_losses, _state_file

    q = _rtn(tiny_unet, scheduler)
    cfg = ReconConfig(objective="accuquant", group_steps=2, balance_starts=True, **TINY)
    traj = fp_trajectories(tiny_unet, scheduler, cfg)
    meta = meta_of(tiny_unet)
    losses = _start_losses(q, scheduler, cfg, traj, meta.guidance_scale, meta.null_class)
    assert len(losses) == cfg.sample_steps - cfg.group_steps + 1 and min(losses) > 0
    plain = ReconConfig(objective="accuquant", group_steps=2, **TINY)
    assert _state_file(tmp_path, cfg, "m") != _state_file(tmp_path, plain, "m")  # never resumed from the other
    log = reconstruct(q, tiny_unet, scheduler, cfg, progress=False)
    assert all(u["loss_after"] > 0 for u in log["units"].values())


def test_rounding_can_start_from_the_stored_codes(tiny_unet, scheduler):
    """from_codes: the soft rounding starts at the layer's current codes (not nearest rounding), so
    finishing untrained gives those codes back, flips included."""
    q = _rtn(tiny_unet, scheduler)
    layers = unit_layers(q)["up_blocks.0"]
    name, mod = next((n, m) for n, m in layers.items() if m.qweight.codes.numel() > 64)
    qw = mod.qweight
    gen = torch.Generator().manual_seed(0)
    out, groups = qw.scale.shape
    w = tiny_unet.get_submodule(name).weight.detach().reshape(out, groups, -1) / qw.scale.float()[..., None]
    pick = (torch.rand(w.shape, generator=gen) < 0.5).float()  # floor or ceil at random, not the nearest
    levels = (1 << qw.spec.bits) - 1
    codes = (torch.floor(w) + pick + qw.zero.float()[..., None]).clamp(0, levels).reshape(qw.codes.shape)
    codes = codes.to(qw.codes.dtype)
    mod.set_qweight(type(qw)(codes, qw.scale, qw.zero, qw.shape, qw.spec))
    tr = Trainable({name: mod}, tiny_unet, from_codes=True)
    tr.finish()
    assert torch.equal(mod.qweight.codes, codes)
    tr = Trainable({name: mod}, tiny_unet)  # the default starts from nearest rounding again
    tr.finish()
    assert not torch.equal(mod.qweight.codes, codes)


@pytest.mark.slow
def test_refinement_runs_the_perstep_calibration_first(tiny_unet, scheduler, tmp_path):
    from diffquant.methods.accuquant import _state_file

    q = _rtn(tiny_unet, scheduler)
    cfg = ReconConfig(objective="accuquant", group_steps=2, from_perstep=True, **TINY)
    log = reconstruct(q, tiny_unet, scheduler, cfg, progress=False, resume_dir=tmp_path, name="r")
    assert log["perstep_first"]["config"]["objective"] == "perstep"
    assert set(log["perstep_first"]["units"]) == set(log["units"])
    plain = ReconConfig(objective="accuquant", group_steps=2, **TINY)
    assert _state_file(tmp_path, cfg, "r") != _state_file(tmp_path, plain, "r")


@pytest.mark.parametrize("objective", ["perstep", pytest.param("accuquant", marks=pytest.mark.slow)])
def test_reconstruction_on_aq_weights_learns_codebooks_and_keeps_codes(tiny_unet, scheduler, objective):
    from diffquant.methods.aquatic import AQSearch

    calib = dq.collect(tiny_unet, scheduler, n=4, steps=4, batch_size=4, progress=False)
    q = dq.quantize_(copy.deepcopy(tiny_unet), dq.AQConfig(target_bits=2.0, act_bits=8), calib=calib,
                     search=AQSearch(adam_steps=5, max_rounds=1, kmeans_iters=3))
    aq = {n: m for n, m in dq.quantize.quantized_layers(q).items() if m.qweight.format == "additive"}
    assert aq
    before = {n: (m.qweight.codes.clone(), m.qweight.codebooks.clone()) for n, m in aq.items()}
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = _out(tiny_unet, x)
        err0 = (_out(q, x) - ref).pow(2).mean()
    iters = 40 if objective == "perstep" else 16
    cfg = ReconConfig(objective=objective, group_steps=2, lr=5e-3, lr_codebooks=5e-3, **{**TINY, "iters": iters})
    reconstruct(q, tiny_unet, scheduler, cfg, progress=False)
    with torch.no_grad():
        err1 = (_out(q, x) - ref).pow(2).mean()
    assert err1 < err0
    for n, m in aq.items():
        assert torch.equal(m.qweight.codes, before[n][0])  # codes fixed: only the continuous parameters learn
        assert m.qweight.codebooks.dtype == torch.float16  # still the stored format
    assert any(not torch.equal(m.qweight.codebooks, before[n][1]) for n, m in aq.items())


@pytest.mark.parametrize("keep", [False, True])
def test_keep_start_gives_a_unit_that_got_worse_its_start_back(tiny_unet, scheduler, monkeypatch, keep):
    """A unit whose learning ends above its starting probe loss (forced here: every uniform code is
    zeroed after the hard rounding) gets its start back with keep_start, and keeps the damage without."""
    import diffquant.methods.accuquant as aq
    from diffquant.formats.uniform import UniformWeight

    class Spoiled(Trainable):
        def finish(self) -> None:
            super().finish()
            for w in self.weights:
                qw = w.mod.qweight
                if isinstance(qw, UniformWeight):
                    w.mod.set_qweight(UniformWeight(torch.zeros_like(qw.codes), qw.scale, qw.zero, qw.shape, qw.spec))

    monkeypatch.setattr(aq, "Trainable", Spoiled)
    q = _rtn(tiny_unet, scheduler)
    layers = dq.quantize.quantized_layers(q)
    codes0 = {n: m.qweight.codes.clone() for n, m in layers.items()}
    ranges0 = {n: (m.act.lo.clone(), m.act.hi.clone()) for n, m in layers.items() if m.act is not None}
    cfg = ReconConfig(objective="accuquant", group_steps=2, keep_start=keep, **{**TINY, "iters": 4})
    log = reconstruct(q, tiny_unet, scheduler, cfg, progress=False)
    units = list(log["units"].values())
    assert units[0]["loss_after"] > units[0]["loss_rtn"]  # (without keep, later units start spoiled already)
    assert all(u["kept_start"] is (keep and u["loss_after"] > u["loss_rtn"]) for u in units)
    same = [torch.equal(m.qweight.codes, codes0[n]) for n, m in layers.items()]
    assert all(same) if keep else not any(same)
    if keep:
        assert all(u["kept_start"] for u in units)  # every unit started clean, so every unit got worse
        for n, (lo, hi) in ranges0.items():
            torch.testing.assert_close(layers[n].act.lo, lo)
            torch.testing.assert_close(layers[n].act.hi, hi)
            torch.testing.assert_close(layers[n].weight, layers[n].qweight.dequantize())


def test_a_unit_of_aq_layers_only_calibrates_past_warmup(tiny_unet, scheduler, monkeypatch):
    """A unit with no roundings to learn (every layer AQ, as in the zoo U-Net's aq-w2a8) has no rounding
    regulariser; the multi-step objective once tried to back-propagate its constant zero after warm-up."""
    import diffquant.methods.accuquant as aq
    from diffquant.methods.aquatic import AQSearch

    calib = dq.collect(tiny_unet, scheduler, n=4, steps=4, batch_size=4, progress=False)
    q = dq.quantize_(copy.deepcopy(tiny_unet), dq.AQConfig(target_bits=2.0, act_bits=8), calib=calib,
                     search=AQSearch(adam_steps=5, max_rounds=1, kmeans_iters=3))
    only_aq = {u: {n: m for n, m in ls.items() if m.qweight.format == "additive"} for u, ls in unit_layers(q).items()}
    only_aq = {u: ls for u, ls in only_aq.items() if ls}
    assert only_aq
    monkeypatch.setattr(aq, "unit_layers", lambda model: only_aq)
    cfg = ReconConfig(objective="accuquant", group_steps=2, warmup=0.0, **{**TINY, "iters": 3})
    log = reconstruct(q, tiny_unet, scheduler, cfg, progress=False)
    assert set(log["units"]) == set(only_aq)
