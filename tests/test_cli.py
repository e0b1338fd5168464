"""The command line: every command documents itself, and bad input gives one clear line."""

import pytest
from click.testing import CliRunner

from diffquant.cli import main

COMMANDS = ["demo", "sample", "quantize", "eval", "report", "recipes", "zoo", "zoo train", "zoo list", "sensitivity",
            "analyze-trajectory", "tune-kernels"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_with_an_example(cmd):
    res = CliRunner().invoke(main, cmd.split() + ["--help"])
    assert res.exit_code == 0
    assert "Example" in res.output or cmd == "zoo"


def _err(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return res.output


def test_unknown_model_name(tmp_path):
    out = _err(["sample", "mnist-vae", "-n", "2", "--out", str(tmp_path / "x.npz")])
    assert "mnist-vae" in out and "zoo model" in out


def test_path_that_holds_no_model(tmp_path):
    out = _err(["quantize", str(tmp_path), "--recipe", "w4a8", "--out", str(tmp_path / "q")])
    assert "holds no model" in out


def test_unknown_recipe():
    out = _err(["quantize", "mnist-unet", "--recipe", "w5a5", "--out", "/tmp/never"])
    assert "unknown recipe" in out and "w4a8" in out


def test_impossible_config(tmp_path, tiny_dit, scheduler):
    from diffquant.models import save_fp

    save_fp(tiny_dit, scheduler, tmp_path / "m")
    recipe = tmp_path / "r.json"
    recipe.write_text('{"name": "g7", "weight": {"method": "uniform", "bits": 4, "group_size": 7}}')
    out = _err(["quantize", str(tmp_path / "m"), "--recipe", str(recipe), "--out", str(tmp_path / "q")])
    assert "does not divide" in out
    assert not (tmp_path / "q").exists()  # nothing half-written


def test_truncated_checkpoint(tmp_path, tiny_dit, scheduler):
    import diffquant as dq

    dq.quantize_(tiny_dit, dq.get_recipe("w4a16"))
    path = dq.save(tiny_dit, tmp_path / "q", scheduler)
    f = path / "quantized.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    out = _err(["sample", str(path), "-n", "2", "--out", str(tmp_path / "x.npz")])
    assert "truncated" in out


def test_sample_writes_npz_and_png(tmp_path, tiny_unet, scheduler):
    import numpy as np

    from diffquant.models import save_fp

    save_fp(tiny_unet, scheduler, tmp_path / "m")
    res = CliRunner().invoke(main, ["sample", str(tmp_path / "m"), "-n", "3", "--steps", "2",
                                    "--out", str(tmp_path / "s.npz")])
    assert res.exit_code == 0, res.output
    with np.load(tmp_path / "s.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape == (3, 1, 16, 16)
        assert z["labels"].tolist() == [0, 1, 2]
    res = CliRunner().invoke(main, ["sample", str(tmp_path / "m"), "-n", "3", "--steps", "2",
                                    "--out", str(tmp_path / "g.png")])
    assert res.exit_code == 0 and (tmp_path / "g.png").exists()


def _save_tiny32(path, scheduler):
    """A one-block 32x32 DiT saved as an FP model folder (the metric network's image size)."""
    import torch
    from diffusers import DiTTransformer2DModel

    from diffquant.models import ModelMeta, save_fp

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                num_layers=1, sample_size=32, patch_size=8, num_embeds_ada_norm=10).eval()
    dit.dq_meta = ModelMeta(name="tiny32")
    save_fp(dit, scheduler, path)


def test_act_mode_that_cannot_apply():
    out = _err(["quantize", "mnist-unet", "--recipe", "w4a16", "--act-mode", "timestep", "--out", "/tmp/never"])
    assert "full precision" in out and "--act-mode" in out
    out = _err(["quantize", "mnist-unet", "--recipe", "w4a8-perstep", "--act-mode", "timestep", "--out", "/tmp/never"])
    assert "--act-mode static" in out


@pytest.mark.parametrize("act_mode", [None, "timestep"])
def test_quantize_then_eval_end_to_end(act_mode, tmp_path, monkeypatch, scheduler):
    """The CLI contract: quantize writes a folder usable as MODEL; eval writes every metric."""
    import json

    monkeypatch.chdir(tmp_path)
    _save_tiny32(tmp_path / "fp", scheduler)
    run = CliRunner().invoke
    mode = ["--act-mode", act_mode] if act_mode else []
    res = run(main, ["quantize", "fp", "--recipe", "w4a8", "--out", "q", "--calib-n", "4", "--steps", "2", *mode])
    assert res.exit_code == 0, res.output
    if act_mode:  # the loaded model looks its ranges up by timestep: a table of one row per calibrated step
        layers = json.loads((tmp_path / "q/diffquant.json").read_text())["quantization"]["layers"]
        acts = [v["act"] for v in layers.values()]
        assert all(a["mode"] == "timestep" and a["steps"] == 2 for a in acts if a)
    res = run(main, ["eval", "q", "--ref", "fp", "-n", "20", "--steps", "2", "--json", "e.json"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "e.json").read_text())
    for key in ("fid", "sfid", "is", "precision", "recall", "fid_to_fp", "class_accuracy", "psnr", "ssim",
                "effective_bits", "checkpoint_bytes", "commit", "machine"):
        assert key in m, key
    assert 4 < m["effective_bits"] < 6  # W4 body, W8 first/last layer: a large share of this tiny model
    assert m["checkpoint_bytes"] == (tmp_path / "q/quantized.safetensors").stat().st_size


@pytest.mark.slow
def test_sensitivity_writes_recipes_that_quantize_applies(tmp_path, monkeypatch, scheduler):
    """diffquant sensitivity -> recipe file at the target bits -> diffquant quantize --recipe FILE."""
    import json

    monkeypatch.chdir(tmp_path)
    _save_tiny32(tmp_path / "fp", scheduler)
    run = CliRunner().invoke
    res = run(main, ["sensitivity", "fp", "--target-bits", "3.2", "--act-bits", "6", "--out", "mp", "--configs", "10",
                     "-n", "6", "--folds", "2", "--epochs", "3", "--cache", "cache", "--with-aq", "--with-w8"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "mp/sensitivity.json").read_text())
    assert {"aq-2", "aq-3", "aq-4"} <= set(doc["uniform"]) and "aq-4" not in doc["paper_options"]
    rec = doc["recipes"]["fp-mp3.2a6"]
    assert set(doc["recipes"]) == {"fp-mp3.2", "fp-mp3.2a6"}
    assert rec["effective_bits"] <= 3.2
    measured = {k: c["fid_to_fp"] for k, c in rec["candidates"].items()}
    assert "lagrangian" in measured and measured[rec["search"]] == min(measured.values())  # the label decides
    assert any("+aq" in k for k in measured)  # AQ options are searched (by summed error) beside the paper's
    assert "uaq-8" in doc["uniform"] and "descent-error-from-uaq-8" in measured  # layers may stay at 8 bits
    assert any(k.startswith("descent-gain-error") for k in measured)
    assert len(doc["layer_gain"]) >= len(doc["roles"]) and min(doc["layer_gain"].values()) >= 0  # every layer
    for png in ("sensitivity-by-role.png", "sensitivity-by-block.png", "pareto.png"):
        assert (tmp_path / "mp" / png).exists()
    res = run(main, ["quantize", "fp", "--recipe", f"mp/{rec['file']}", "--out", "q", "--calib-n", "4", "--steps", "2"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "q/diffquant.json").read_text())
    assert abs(meta["effective_bits"] - rec["effective_bits"]) < 1e-6
    res = run(main, ["sensitivity", "fp", "--target-bits", "three", "--out", "mp"])
    assert res.exit_code != 0 and "--target-bits" in res.output
