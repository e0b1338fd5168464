"""Every script under benchmarks/ imports against the current library.

The scripts are run by hand (hours each), so nothing else would notice when a refactor in `src/`
removes a name one of them imports (it happened once: `aq_weight` moved from `kernels.py` to
`kernels/tune.py` and two scripts broke silently). Importing runs no benchmark: each has a main guard.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def test_scripts_found() -> None:
    assert len(SCRIPTS) >= 20, f"expected the benchmark scripts under {BENCHMARKS}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_imports(script: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # scripts import siblings, as `python benchmarks/x.py` allows
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def test_kernel_passes_combine_to_the_median_of_each_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_kernels", BENCHMARKS / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)  # not `import kernels`: tests/kernels would shadow it
    spec.loader.exec_module(kernels)

    def row(impl, ms):
        return {"layer": "qkv", "config": "1x8", "tokens": 1, "impl": impl, "median_ms": ms, "max_rel_error": 1e-7}

    passes = [row("fp32_dense", 1.0), row("diffquant_lut", 0.25),  # pass 1
              row("fp32_dense", 1.2), row("diffquant_lut", 3.0),   # pass 2: a slow stretch on the lookup
              row("fp32_dense", 0.8), row("diffquant_lut", 0.2)]   # pass 3
    out = {r["impl"]: r for r in kernels.combine_passes(passes)}
    assert out["diffquant_lut"]["median_ms"] == 0.25 and out["fp32_dense"]["median_ms"] == 1.0
    assert out["diffquant_lut"]["speedup_vs_fp32"] == 4.0
    assert out["diffquant_lut"]["pass_median_ms"] == [0.25, 3.0, 0.2]
