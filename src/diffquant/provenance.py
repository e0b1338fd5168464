"""Who made a number: the git commit, the machine and the library versions, for every JSON written."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def git_commit() -> str:
    """HEAD (with -dirty for uncommitted changes to tracked files); DIFFQUANT_COMMIT overrides it where a
    copy of the tree travels without its .git (a borrowed GPU machine)."""
    if os.environ.get("DIFFQUANT_COMMIT"):
        return os.environ["DIFFQUANT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The commit of the code this process runs, taken when this module is first imported (`import diffquant`
# and every benchmark script import it before they start work). A JSON written at the end of an hour's
# run used to read the tree as it was then: an edit made meanwhile stamped the run -dirty or with a
# later commit than the one that produced its figures.
_COMMIT_AT_START = git_commit()


def _cpuinfo_fields() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    return _cpuinfo_fields().get("model name") or platform.processor() or "unknown"


def cpu_key() -> str:
    """The CPU's microarchitecture as `vendor-family-model` (e.g. AuthenticAMD-25-17, a Zen 4): what the
    kernel thresholds are measured per. A VM may hide the marketing name ("AMD EPYC") but not these."""
    f = _cpuinfo_fields()
    if "vendor_id" in f:
        return f"{f['vendor_id']}-{f.get('cpu family', '?')}-{f.get('model', '?')}"
    return f"{platform.machine()}-{platform.processor() or 'unknown'}"


def cpu_flags() -> str:
    """The instruction-set flags (sorted): a binary built with -march=native is only safe where they match."""
    return " ".join(sorted(_cpuinfo_fields().get("flags", "").split()))


def machine() -> dict:
    import torch

    return {
        "cpu": cpu_model(),
        "cpu_key": cpu_key(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def provenance() -> dict:
    """The commit this process started from and the machine it runs on."""
    return {"commit": _COMMIT_AT_START, "machine": machine()}
