"""bench.run_quality's results file: rows written by another run meanwhile, and superseded rows, are kept."""

import json

from diffquant.bench import _merge_rows_written_meanwhile


def _doc(methods, n=100):
    return {"n": n, "seed": 0, "steps": 20, "rows": [{"model": "m", "method": x, "v": x} for x in methods]}


def test_rows_from_a_parallel_run_are_merged(tmp_path):
    out = tmp_path / "q.json"
    out.write_text(json.dumps(_doc(["fp", "w4a8", "w3a8"])))
    mine = _doc(["fp", "w2a8"])
    _merge_rows_written_meanwhile(mine, out)
    assert sorted(r["method"] for r in mine["rows"]) == ["fp", "w2a8", "w3a8", "w4a8"]


def test_rows_of_another_protocol_are_not_merged(tmp_path):
    out = tmp_path / "q.json"
    out.write_text(json.dumps(_doc(["w4a8"], n=5000)))
    mine = _doc(["fp"])
    _merge_rows_written_meanwhile(mine, out)
    assert [r["method"] for r in mine["rows"]] == ["fp"]


def test_superseded_rows_survive_a_rewrite(tmp_path):
    out = tmp_path / "q.json"
    old = _doc(["fp"])
    old["superseded_rows"] = [{"model": "m", "method": "aq-w2a8", "superseded": "older recipe"}]
    out.write_text(json.dumps(old))
    mine = _doc(["aq-w2a8"])
    _merge_rows_written_meanwhile(mine, out)
    assert mine["superseded_rows"] == old["superseded_rows"]
    assert sorted(r["method"] for r in mine["rows"]) == ["aq-w2a8", "fp"]


def test_every_row_records_the_commit_and_cpu_it_was_measured_with(tmp_path, monkeypatch):
    from diffquant import bench

    def fake_run_one(self, model, method, grids):
        return {"model": model, "method": method, "effective_bits": 4.0, "fid": 1.0, "class_accuracy": 0.9}

    monkeypatch.setattr(bench.Protocol, "run_one", fake_run_one)
    monkeypatch.setattr(bench, "provenance", lambda: {"commit": "abc123", "machine": {"cpu": "TestCPU", "cores": 2}})
    out = tmp_path / "q.json"
    bench.run_quality(["m"], ["fp", "w4a8"], 10, out, cache=tmp_path / "cache", progress=False)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["commit"], r["cpu"]) for r in rows] == [("abc123", "TestCPU")] * 2


def test_cached_samples_are_sliced_from_a_larger_set_and_missing_ones_are_none(tmp_path, monkeypatch):
    import numpy as np

    from diffquant import bench

    monkeypatch.setattr(bench, "model_fingerprint", lambda model: "f00")
    big = bench.Protocol(8, seed=10, cache=tmp_path)
    f = big._sample_file("m", "fp", 8)
    f.parent.mkdir(parents=True)
    np.savez(f, images=np.arange(8 * 4, dtype=np.uint8).reshape(8, 4))
    small = bench.Protocol(5, seed=10, cache=tmp_path)
    assert (small.cached("m") == np.arange(8 * 4, dtype=np.uint8).reshape(8, 4)[:5]).all()
    assert bench.Protocol(9, seed=10, cache=tmp_path).cached("m") is None  # too few
    assert bench.Protocol(5, seed=20, cache=tmp_path).cached("m") is None  # another seed


def test_an_older_row_keeps_the_commit_of_the_file_it_came_from(tmp_path, monkeypatch):
    from diffquant import bench

    monkeypatch.setattr(bench.Protocol, "run_one", lambda self, model, method, grids: {
        "model": model, "method": method, "effective_bits": 4.0, "fid": 1.0, "class_accuracy": 0.9})
    monkeypatch.setattr(bench, "provenance", lambda: {"commit": "new", "machine": {"cpu": "NewCPU"}})
    out = tmp_path / "q.json"
    out.write_text(json.dumps({**_doc(["fp"], n=10), "commit": "old", "machine": {"cpu": "OldCPU"}}))
    bench.run_quality(["m"], ["fp", "w4a8"], 10, out, cache=tmp_path / "cache", progress=False)
    doc = json.loads(out.read_text())
    assert {r["method"]: (r["commit"], r["cpu"]) for r in doc["rows"]} == {"fp": ("old", "OldCPU"),
                                                                           "w4a8": ("new", "NewCPU")}
    assert doc["commit"] == "new" and doc["rows"][0]["commit_from"] == "the file"


def test_provenance_keeps_the_commit_the_process_started_from(monkeypatch):
    from diffquant import provenance as prov

    at_start = prov.provenance()["commit"]
    monkeypatch.setattr(prov, "git_commit", lambda: "edited-meanwhile-dirty")  # the tree changes during a run
    assert prov.provenance()["commit"] == at_start != "edited-meanwhile-dirty"
