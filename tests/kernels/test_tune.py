"""Per-CPU dispatch thresholds: measured here, stored per microarchitecture, read in the right order."""

import json

import pytest
import torch
from click.testing import CliRunner
from test_kernels import needs_lut  # tests/kernels is on sys.path (no __init__.py)

from diffquant.cli import main
from diffquant.kernels import cpu, dispatch, tune
from diffquant.provenance import cpu_key


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A private user-thresholds file (absent unless a test writes it) and a fresh dispatch cache; the built
    kernel stays where it is (moving the cache would rebuild it)."""
    monkeypatch.setattr(tune, "user_thresholds_path", lambda: tmp_path / "kcache" / "thresholds.json")
    monkeypatch.setattr(dispatch, "_cache", {k: v for k, v in dispatch._cache.items() if k == "lut"})
    return tmp_path


def _entry(bound_16, size_16=0):
    return {"min_flop_bound": {"1": 1.0, "16": bound_16}, "min_weight_elems": {"1": 0, "16": size_16}}


def _rows(speedups):
    """Synthetic lookup rows at 16 tokens: (flop bound, in, out, speed-up over dense)."""
    return [{"tokens": 16, "impl": "diffquant_lut", "flop_bound": b, "in": i, "out": o, "speedup_vs_fp32": s}
            for b, i, o, s in speedups]


def test_break_even_keeps_the_lookup_where_every_covered_shape_won():
    th = tune.break_even(_rows([(5.0, 1000, 1000, 2.0), (3.0, 1000, 1000, 1.3), (2.0, 1000, 1000, 0.8),
                                (8.0, 10, 10, 0.5)]))  # a tiny layer loses whatever its bound
    bound, size = th["min_flop_bound"]["16"], th["min_weight_elems"]["16"]
    assert bound == 3.0 and 100 < size <= 1000 * 1000
    assert tune.break_even(_rows([(5.0, 1000, 1000, 0.9)]))["min_flop_bound"]["16"] >= 1e9  # never won: never


def test_user_measurement_wins_then_this_cpus_shipped_then_the_strictest(isolated, monkeypatch):
    shipped = isolated / "shipped.json"
    monkeypatch.setattr(dispatch, "_THRESHOLDS", shipped)
    tune.store_entry(shipped, _entry(2.0, 100), key="Other-1-1")
    tune.store_entry(shipped, _entry(4.0, 10), key="Other-2-2")
    assert dispatch.thresholds()[16] == (4.0, 100)  # this CPU unmeasured: the strictest of both
    assert "strictest" in dispatch.threshold_source()

    tune.store_entry(shipped, _entry(3.0), key=cpu_key())
    dispatch.reload_thresholds()
    assert dispatch.thresholds()[16] == (3.0, 0) and "this CPU" in dispatch.threshold_source()

    tune.store_entry(tune.user_thresholds_path(), _entry(1.5))
    dispatch.reload_thresholds()
    assert dispatch.thresholds()[16] == (1.5, 0) and "measured on this machine" in dispatch.threshold_source()
    assert set(json.loads(shipped.read_text())["cpu"]) == {"Other-1-1", "Other-2-2", cpu_key()}  # others kept


def test_a_remembered_choice_follows_new_thresholds_and_yields_to_force(isolated, monkeypatch):
    """Dispatch memoises its choice per shape; new thresholds (tune-kernels) and force() must still win."""
    monkeypatch.setattr(dispatch, "_lut_ok", lambda: True)
    monkeypatch.setattr(dispatch, "_THRESHOLDS", isolated / "shipped.json")
    cpu_dev, shape = torch.device("cpu"), (16, 4608, 1152, 1, 256, 8)  # DiT-XL/2 fc1 1x8, bound 4.9
    tune.store_entry(tune.user_thresholds_path(), _entry(9.0))
    assert dispatch.choose(cpu_dev, *shape) == "reference"
    assert dispatch.choose(cpu_dev, *shape) == "reference"  # now from the memo
    with dispatch.force("lut"):
        assert dispatch.choose(cpu_dev, *shape) == "lut"
    tune.store_entry(tune.user_thresholds_path(), _entry(2.0))
    assert dispatch.choose(cpu_dev, *shape) == "reference"  # the memo holds until told to reload
    dispatch.reload_thresholds()
    assert dispatch.choose(cpu_dev, *shape) == "lut"


def test_fewer_codewords_than_measured_stay_dense_unless_measured_in_place(isolated, monkeypatch):
    """The thresholds were measured at 256 codewords; a 2x4 convolution's FLOP bound (2.1) is no evidence."""
    monkeypatch.setattr(dispatch, "_lut_ok", lambda: True)
    monkeypatch.setattr(dispatch, "_THRESHOLDS", isolated / "shipped.json")
    tune.store_entry(tune.user_thresholds_path(), {"min_flop_bound": {"4096": 1.0}, "min_weight_elems": {"4096": 0}})
    cpu_dev = torch.device("cpu")
    assert dispatch.measured_min_k() == 256
    assert dispatch.flop_bound(128, 1152, 2, 16, 9) > 2
    assert dispatch.choose(cpu_dev, 2048, 128, 1152, 2, 16, 9) == "reference"
    assert dispatch.choose(cpu_dev, 2048, 4608, 1152, 1, 256, 8) == "lut"  # DiT fc1 1x8, bound 5.5
    dispatch.set_shape_choices({(2048, 128, 1152, 2, 16, 9): "lut"})
    assert dispatch.choose(cpu_dev, 2048, 128, 1152, 2, 16, 9) == "lut"


def test_several_tokens_are_judged_by_an_entry_of_the_tiled_path(isolated, monkeypatch):
    """One token runs the one-token lookup, two or more the tiled path: a 2-token product follows the 4-token
    entry, not the (nearer by ratio) 1-token one; with only a 1-token entry, that one is used."""
    monkeypatch.setattr(dispatch, "_lut_ok", lambda: True)
    monkeypatch.setattr(dispatch, "_THRESHOLDS", isolated / "shipped.json")
    tune.store_entry(tune.user_thresholds_path(), {"min_flop_bound": {"1": 1e9, "4": 1.0, "64": 1e9},
                                                   "min_weight_elems": {"1": 0, "4": 0, "64": 0}})
    cpu_dev, shape = torch.device("cpu"), (4608, 1152, 1, 256, 8)  # DiT-XL/2 fc1 1x8, bound 5.5
    assert [dispatch.choose(cpu_dev, n, *shape) for n in (1, 2, 3, 4, 8)] == ["reference"] + ["lut"] * 4
    tune.store_entry(tune.user_thresholds_path(), {"min_flop_bound": {"1": 1.0}, "min_weight_elems": {"1": 0}})
    dispatch.reload_thresholds()
    assert dispatch.choose(cpu_dev, 2, *shape) == "lut"


def test_a_broken_user_file_names_itself_and_the_fix(isolated):
    path = tune.user_thresholds_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tune-kernels"):
        dispatch.thresholds()


def test_the_shipped_file_has_per_cpu_entries():
    data = json.loads(dispatch._THRESHOLDS.read_text())
    assert data["cpu"] and all("min_flop_bound" in e and "machine" in e for e in data["cpu"].values())


def test_the_build_depends_on_the_cpus_instruction_sets(monkeypatch):
    key = cpu.build_key()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: "sse2 avx2")
    assert cpu.build_key() != key


@needs_lut
def test_measure_and_the_cli_write_thresholds_dispatch_then_reads(isolated, monkeypatch):
    rows = tune.measure(reps=1, log=lambda m: None, linears={"small": (64, 48)}, convs={}, tokens=(1, 16), warm_s=0)
    assert len(rows) == 4 and all(r["median_ms"] > 0 and r["fp32_ms"] > 0 for r in rows)
    # the CLI on measurements where a 64x64 layer (1x8, g 16: bound 0.25) won at 16 tokens: dispatch must then
    # pick the lookup for it, which the shipped thresholds never do for so small a layer
    assert dispatch.choose(torch.device("cpu"), 16, 64, 64, 1, 256, 16) == "reference"
    monkeypatch.setattr(tune, "measure", lambda **kw: _rows([(0.2, 64, 64, 2.0)]))
    res = CliRunner().invoke(main, ["tune-kernels", "--quick"])
    assert res.exit_code == 0, res.output
    assert "measured on this machine" in res.output
    assert cpu_key() in json.loads(tune.user_thresholds_path().read_text())["cpu"]
    assert dispatch.choose(torch.device("cpu"), 16, 64, 64, 1, 256, 16) == "lut"


def test_convolutions_are_timed_at_batches_that_reach_the_linears_token_counts():
    assert tune.conv_batches(8) == (1, 4, 16, 64)  # LDM-4's 8x8 level: 64, 256, 1024, 4096 tokens
    assert tune.conv_batches(64) == (1,)  # 4096 pixels already
    assert tune.conv_batches(10, (1, 16, 256)) == (1,)  # no batch of 100 pixels makes 256 tokens


@needs_lut
def test_measure_times_a_convolution_at_each_batch():
    rows = tune.measure(reps=1, log=lambda m: None, linears={}, convs={"tiny": (8, 4)}, tokens=(1, 16, 64), warm_s=0)
    assert [(r["config"], r["batch"], r["tokens"]) for r in rows] == [
        ("1x8", 1, 16), ("1x8", 4, 64), ("2x8", 1, 16), ("2x8", 4, 64)]


def test_timeit_rounds_runs_before_ahead_of_every_timed_call_only():
    log = []
    ms = tune.timeit_rounds({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, 4,
                            before=lambda: log.append("before"))
    assert set(ms) == {"a", "b"}
    timed = log[6:]  # three untimed warm-up calls of each function come first, without `before`
    assert log[:6].count("before") == 0
    assert timed.count("before") == 8 and all(timed[i] == "before" for i in range(0, 16, 2))
