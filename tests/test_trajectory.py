import copy

import diffquant as dq
from diffquant.trajectory import analyze, plot


def test_identical_models_do_not_drift(tiny_unet, scheduler):
    r = analyze(tiny_unet, copy.deepcopy(tiny_unet), scheduler, n=3, steps=4)
    assert max(r["per_step_rms"]) == 0 and max(r["accumulated_rms"]) == 0


def test_quantized_model_drift_starts_as_its_first_step_error(tiny_unet, scheduler, tmp_path):
    q = dq.quantize_(copy.deepcopy(tiny_unet), dq.get_recipe("w2a16"))
    r = analyze(q, tiny_unet, scheduler, n=3, steps=4, batch_size=2)  # two batches: sums over both
    assert len(r["per_step_rms"]) == 4 and min(r["per_step_rms"]) > 0
    # after one step both start from the same noise, so the two measures coincide
    assert abs(r["per_step_rms"][0] - r["accumulated_rms"][0]) < 1e-6
    png = plot({"w2a16": r}, tmp_path / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_reconstruction_options_are_checked():
    import click
    import pytest

    from diffquant.cli import _with_recon

    with pytest.raises(click.UsageError, match="has no reconstruction"):
        _with_recon(dq.get_recipe("w4a8"), None, 4, None, None)
    with pytest.raises(click.UsageError, match="accuquant only"):
        _with_recon(dq.get_recipe("w4a8"), "perstep", 4, None, None)
    cfg = _with_recon(dq.get_recipe("w4a8"), "accuquant", 8, "exact", 10)
    r = cfg.recon
    assert (r.objective, r.group_steps, r.grad, r.iters) == ("accuquant", 8, "exact", 10)
    assert cfg.split_skips
    assert _with_recon(dq.get_recipe("w4a8-accuquant"), "none", None, None, None).recon is None
