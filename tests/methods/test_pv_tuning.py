import copy

import pytest
import torch

import diffquant as dq
from diffquant.methods.aquatic import AQSearch
from diffquant.methods.pv_tuning import PVConfig, pv_tune, teacher_items

FAST = AQSearch(adam_steps=5, max_rounds=1, kmeans_iters=3)


def _student(teacher, scheduler):
    calib = dq.collect(teacher, scheduler, n=4, steps=3, batch_size=4, progress=False)
    return dq.quantize_(copy.deepcopy(teacher), dq.AQConfig(target_bits=2.0, act_bits=None), calib=calib, search=FAST)


def _codes(model):
    return {n: m.qweight.codes.clone() for n, m in model.named_modules() if getattr(m, "qweight", None) is not None
            and m.qweight.format == "additive"}


def test_teacher_items_cover_every_step_with_both_cfg_halves(tiny_unet, scheduler):
    items = teacher_items(tiny_unet, scheduler, PVConfig(trajectories=4, sample_steps=3))
    assert len(items) == 3
    assert all(len(d["x"]) == 8 and (d["y"] == 10).sum() == 4 for d in items)  # cond + null halves
    assert items[0]["t"][0] > items[-1]["t"][0]


@pytest.mark.parametrize("semi,mode", [(True, "model"), (False, "block")])
def test_pv_tuning_lowers_the_distillation_loss_and_caps_code_changes(tiny_unet, scheduler, semi, mode):
    student = _student(tiny_unet, scheduler)
    before = _codes(student)
    cfg = PVConfig(steps=30, trajectories=8, batch_size=8, sample_steps=3, v_every=5, v_fraction=0.05, v_alpha=0.3,
                   lr=2e-3, semi=semi, mode=mode, check_every=0)  # the last state, to see the mechanics
    log = pv_tune(student, tiny_unet, scheduler, cfg, progress=False)
    assert log["loss_last"] < log["loss_first"]
    assert log["code_moves"] == sum(log["v_changes"]) > 0
    after = _codes(student)
    for name, c in before.items():  # each V step moves at most v_fraction of a layer's groups per codebook
        changed = (after[name] != c).any(-1).float().mean()
        assert changed <= 30 // 5 * 0.05 * c.shape[-1] + 1e-6
    assert (log["resets_jump"] > 0) == semi  # trajectory wrap-arounds invalidate first moments only with SeMI
    # the tuned model still saves and loads bit-exactly
    assert all(not p.requires_grad for p in student.parameters())


def test_pv_tuning_refuses_a_model_without_additive_layers(tiny_unet, scheduler):
    with pytest.raises(ValueError, match="additive"):
        pv_tune(copy.deepcopy(tiny_unet), tiny_unet, scheduler, PVConfig(steps=1), progress=False)


def test_interrupted_tuning_resumes_to_the_same_result(tiny_unet, scheduler, tmp_path):
    cfg = PVConfig(steps=12, trajectories=4, batch_size=4, sample_steps=3, v_every=4, v_fraction=0.05, lr=2e-3)
    base = _student(tiny_unet, scheduler)
    whole = copy.deepcopy(base)
    pv_tune(whole, tiny_unet, scheduler, cfg, progress=False)

    class Stop(Exception):
        pass

    part = copy.deepcopy(base)
    state = tmp_path / "ft.pt"
    calls = {"n": 0}
    orig = part.forward

    def forward_then_stop(*a, **k):  # the interruption: the 8th training forward raises
        calls["n"] += 1
        if calls["n"] == 8:
            raise Stop
        return orig(*a, **k)

    part.forward = forward_then_stop
    with pytest.raises(Stop):
        pv_tune(part, tiny_unet, scheduler, cfg, progress=False, state_file=state, save_every=3)
    assert state.exists()
    resumed = copy.deepcopy(base)
    pv_tune(resumed, tiny_unet, scheduler, cfg, progress=False, state_file=state, save_every=3)
    assert not state.exists()
    for (n, a), (_, b) in zip(_codes(whole).items(), _codes(resumed).items(), strict=True):
        assert torch.equal(a, b), n


def test_tuning_returns_its_best_held_out_state_never_a_worse_one(tiny_unet, scheduler):
    """A destructive learning rate: the held-out score rises, and the model given back is the best
    one scored (here the starting one), not the last."""
    student = _student(tiny_unet, scheduler)
    start = copy.deepcopy(student)
    cfg = PVConfig(steps=10, trajectories=4, batch_size=4, sample_steps=3, v_every=0, lr=0.5, check_every=5,
                   check_trajectories=2)
    log = pv_tune(student, tiny_unet, scheduler, cfg, progress=False)
    scores = dict(log["check"])
    assert set(scores) == {0, 5, 10} and log["best_step"] == min(scores, key=scores.get)
    assert scores[log["best_step"]] <= scores[0]
    if log["best_step"] == 0:
        x = torch.randn(2, 4, 8, 8)
        t = torch.full((2,), 500)
        with torch.no_grad():
            torch.testing.assert_close(student(x, t, class_labels=torch.arange(2)).sample,
                                       start(x, t, class_labels=torch.arange(2)).sample)
    assert log["codes_changed"] == 0  # no V step ran


def _returns(tabu: bool, student) -> int:
    """Two V steps on one additive layer, the second along the opposite gradient: how many groups go
    straight back to the codeword the first step took them from."""
    from diffquant.methods.pv_tuning import _Additive

    name, mod = next((n, m) for n, m in student.named_modules()
                     if getattr(m, "qweight", None) is not None and m.qweight.format == "additive")
    layer = _Additive(name, mod)
    g = torch.randn_like(layer.grad_sum, generator=torch.Generator().manual_seed(1))
    before = layer.codes.clone()
    layer.grad_sum = g.clone()
    first = layer.v_step(1.0, 3.0, tabu)
    assert first and (layer.codes != before).any()
    moved = layer.codes != before
    layer.grad_sum = -g
    layer.v_step(1.0, 3.0, tabu)
    return int(((layer.codes == before) & moved).sum())


def test_tabu_v_step_never_moves_a_group_straight_back(tiny_unet, scheduler):
    student = _student(tiny_unet, scheduler)
    assert _returns(False, student) > 0  # the opposite gradient undoes moves when nothing forbids it
    assert _returns(True, student) == 0
