"""The report renders every benchmark's JSON kind, and refuses a file with nothing to show."""

import json

import pytest

from diffquant.report import make_report

MACHINE = {"commit": "abc", "machine": {"cpu": "test", "cores": 2, "torch": "x"}, "wall_time_s": 1.0}


def test_report_has_a_section_per_benchmark_kind(tmp_path):
    traj = {"benchmark": "trajectory", "model": "m", "setting": "w3a6", **MACHINE,
            "results": {"w3a6": {"per_step_rms": [0.1, 0.2], "accumulated_rms": [0.1, 0.3], "steps": 2}}}
    mem = {"benchmark": "accuquant_memory", **MACHINE,
           "rows": [{"grad": "o1", "M": 8, "unit": "u", "batch": 16, "s_per_iter": 1.0, "graph_peak_mib": 91.0,
                     "peak_rss_mib": 900.0}], "gradient_agreement": [{"M": 2, "cosine_output": 0.99}]}
    sens = {"benchmark": "sensitivity", "model": "m", **MACHINE, "labels": [{}] * 3,
            "settings": {"n": 8, "folds": 2, "target": "fid_to_fp"},
            "predictors": {"gnn": {"mean": {"spearman": 0.8, "ndcg10": 0.9}},
                           "trees": {"mean": {"spearman": 0.5, "ndcg10": 0.7}}},
            "recipes": {"m-mp3.5": {"effective_bits": 3.49, "label": {"bits": 3.49, "fid_to_fp": 0.2}}},
            "uniform": {"uaq-4": {"bits": 4.1, "fid_to_fp": 0.1}}}
    paths = []
    for name, doc in (("t.json", traj), ("m.json", mem), ("s.json", sens)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(tmp_path / name)
    html = make_report(paths, tmp_path / "r.html").read_text()
    assert "error accumulation" in html and "AccuQuant calibration memory" in html and "Qua²SeDiMo on m" in html
    assert "m-mp3.5" in html and "0.8" in html


def test_empty_results_file_is_refused(tmp_path):
    (tmp_path / "q.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no result rows"):
        make_report([tmp_path / "q.json"], tmp_path / "r.html")
