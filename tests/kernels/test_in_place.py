"""Per-layer timing inside a model, the choices made from it, and dispatch applying and storing them."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_kernels import needs_lut  # tests/kernels is on sys.path (no __init__.py)

from diffquant.cli import main
from diffquant.formats.additive import AdditiveSpec, AdditiveWeight
from diffquant.kernels import dispatch, in_place, tune
from diffquant.nn.layers import QuantConv2d, QuantLinear
from diffquant.nn.swap import quantizable_layers, set_module


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private user-thresholds file and a fresh dispatch cache (the built kernel stays)."""
    monkeypatch.setattr(tune, "user_thresholds_path", lambda: tmp_path / "kcache" / "thresholds.json")
    monkeypatch.setattr(dispatch, "_cache", {k: v for k, v in dispatch._cache.items() if k == "lut"})
    return tmp_path


def aq_model(model):
    """`model` with every Linear / Conv2d that a group divides holding random 1x4 AQ weights (g = 9 for 3x3)."""
    gen = torch.Generator().manual_seed(0)
    for name, mod in quantizable_layers(model).items():
        w = mod.weight
        g = 9 if w.dim() == 4 and w.shape[-1] == 3 else 4
        if w[0].numel() % g or (w.dim() == 4 and mod.groups != 1):
            continue
        spec = AdditiveSpec(1, 4, g)
        codes = torch.randint(0, 16, (w.shape[0], w[0].numel() // g, 1), generator=gen)
        qw = AdditiveWeight(codes, torch.randn(1, 16, g, generator=gen) * 0.1, torch.ones(w.shape[0]), tuple(w.shape),
                            spec)
        set_module(model, name, QuantLinear(qw, mod.bias) if w.dim() == 2 else QuantConv2d(qw, mod.bias, mod))
    return model


def _inputs(n=3):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, 8, 8, generator=gen), torch.full((n,), 500), torch.arange(n)


@needs_lut
def test_measure_times_every_aq_layer_on_both_paths_with_the_key_dispatch_sees(tiny_unet, isolated):
    model = aq_model(tiny_unet)
    x, t, y = _inputs()
    rows = in_place.measure(model, lambda: model(x, t, class_labels=y), rounds=2)
    assert {r["layer"] for r in rows} == set(in_place.aq_layers(model))
    assert all(r["reference_ms"] > 0 and r["lut_ms"] > 0 and r["auto_pick"] in ("reference", "lut") for r in rows)
    conv_in = next(r for r in rows if r["layer"] == "conv_in")
    assert conv_in["key"] == [3 * 8 * 8, 8, 4 * 9, 1, 16, 9]  # batch x output pixels, out, in_flat, M, K, g
    to_q = next(r for r in rows if r["layer"].endswith("attentions.0.to_q"))
    assert to_q["key"][0] == 3 * 4 * 4  # a linear's tokens: every position of every image (4x4 after one down)


@needs_lut
def test_measured_choices_route_auto_and_yield_to_force_and_to_dropped_dense_copies(tiny_unet, isolated):
    model = aq_model(tiny_unet)
    x, t, y = _inputs()
    rows = in_place.measure(model, lambda: model(x, t, class_labels=y), rounds=1)
    with torch.no_grad():
        outs = {}
        for impl in ("reference", "lut"):
            with dispatch.force(impl):
                outs[impl] = model(x, t, class_labels=y).sample
        for impl in ("reference", "lut"):
            dispatch.set_shape_choices({tuple(r["key"]): impl for r in rows})
            assert torch.equal(model(x, t, class_labels=y).sample, outs[impl])  # auto took `impl` in every layer
        with dispatch.force("reference"):
            assert torch.equal(model(x, t, class_labels=y).sample, outs["reference"])
    key = tuple(rows[0]["key"])
    assert dispatch.choose(torch.device("cpu"), *key, dense_cached=True) == "lut"
    dispatch.set_shape_choices({key: "reference"})
    assert dispatch.choose(torch.device("cpu"), *key, dense_cached=True) == "reference"
    # a layer holding codes only has no cached dense product: the measured choice does not describe it
    assert dispatch.choose(torch.device("cpu"), *key, dense_cached=False) == dispatch._choose_auto(
        torch.device("cpu"), *key, dense_cached=False)
    with pytest.raises(ValueError, match="'reference' or 'lut'"):
        dispatch.set_shape_choices({key: "fast"})
    dispatch.set_shape_choices(None)


def test_choices_sum_the_layers_of_a_shape_and_keep_dense_on_a_tie():
    rows = [{"key": [16, 8, 8, 1, 16, 4], "reference_ms": 1.0, "lut_ms": 0.5},
            {"key": [16, 8, 8, 1, 16, 4], "reference_ms": 1.0, "lut_ms": 2.0},  # together 2.0 vs 2.5: dense
            {"key": [64, 8, 8, 1, 16, 4], "reference_ms": 1.0, "lut_ms": 0.9},
            {"key": [256, 8, 8, 1, 16, 4], "reference_ms": 1.0, "lut_ms": 0.99}]  # within the margin: dense
    assert in_place.choose_per_shape(rows) == {(16, 8, 8, 1, 16, 4): "reference", (64, 8, 8, 1, 16, 4): "lut",
                                               (256, 8, 8, 1, 16, 4): "reference"}
    assert in_place.summed_ms(rows, lambda r: "lut") == pytest.approx(4.39)


def test_stored_choices_merge_per_cpu_and_dispatch_reads_them(isolated, monkeypatch):
    monkeypatch.setattr(dispatch, "_lut_ok", lambda: True)
    path = tune.user_thresholds_path()
    a, b = (16, 4608, 1152, 1, 256, 8), (64, 8, 8, 1, 16, 4)
    rows = [{"key": list(a), "reference_ms": 1.0, "lut_ms": 2.0}, {"key": list(b), "reference_ms": 1.0, "lut_ms": 0.5}]
    assert tune.store_shape_choices(path, rows, {a: "reference", b: "lut"}, {"model": "m1"}) == 2
    assert tune.store_shape_choices(path, rows[1:], {b: "reference"}, {"model": "m2"}) == 2  # b replaced, a kept
    dispatch.reload_thresholds()
    assert dispatch.shape_choices() == {a: "reference", b: "reference"}
    assert dispatch.choose(torch.device("cpu"), *a) == "reference"  # the thresholds alone pick the lookup here
    assert "2 shapes measured in place" in dispatch.threshold_source()
    assert "cpu" not in json.loads(path.read_text())  # the thresholds section is untouched


@needs_lut
def test_cli_tunes_a_model_in_place_and_refuses_one_without_aq_layers(tiny_unet, scheduler, isolated, monkeypatch):
    import diffquant.models

    model = aq_model(tiny_unet)
    monkeypatch.setattr(diffquant.models, "load", lambda name: (model, scheduler))
    res = CliRunner().invoke(main, ["tune-kernels", "--model", "tiny", "--batch", "2", "--rounds", "1"])
    assert res.exit_code == 0, res.output
    stored = json.loads(tune.user_thresholds_path().read_text())["shapes"]
    (entry,) = stored.values()
    assert entry["model"] == "tiny" and entry["batch"] == 2 and entry["choices"]
    assert "shapes measured in place" in res.output

    for name in in_place.aq_layers(model):  # the same model with no AQ layer left
        set_module(model, name, torch.nn.Identity())
    res = CliRunner().invoke(main, ["tune-kernels", "--model", "tiny"])
    assert res.exit_code != 0 and "no additive-codebook" in res.output and "Traceback" not in res.output
