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
