"""The `mnist32` quality protocol (BENCHMARK.md): for each (model, method), quantize, sample from
fixed noise, and measure every metric against the real data and against the FP model's samples
from the same noise. Used by `benchmarks/quality.py` and `diffquant demo`.

Resumable: each finished row is written to the JSON at once, and a re-run skips rows already there
(for the same model, method and size); samples in progress are kept in the cache folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffquant.calibration.collect import CalibrationData, collect
from diffquant.checkpoint import checkpoint_bytes, save
from diffquant.config import get_recipe
from diffquant.grids import save_grid
from diffquant.io_utils import write_json
from diffquant.metrics.evaluate import evaluate
from diffquant.models import load, resolve
from diffquant.pipelines import balanced_labels, sample_to_npz
from diffquant.provenance import provenance
from diffquant.quantize import needs_calibration, quantize_

SIZES = {"full": 5000, "quick": 1000}
GRID_N = 40  # 4 rows of the 10 classes


def model_fingerprint(model: str) -> str:
    """Hash of the FP weights and the sampling meta (guidance), so cached samples never outlive a
    retrained model or a changed guidance scale."""
    path = resolve(model)
    h = hashlib.sha256()
    for f in sorted(path.rglob("*.safetensors")):
        h.update(f.read_bytes())
    meta = path / "diffquant.json"
    if meta.exists():
        h.update(json.dumps(json.loads(meta.read_text()).get("meta"), sort_keys=True).encode())
    return h.hexdigest()[:12]


class Protocol:
    def __init__(self, n: int, seed: int = 0, steps: int = 20, cache: Path = Path("runs/cache"),
                 calib_n: int = 64, progress: bool = True):
        self.n, self.seed, self.steps, self.cache = n, seed, steps, Path(cache)
        self.calib_n, self.progress = calib_n, progress
        self.labels = balanced_labels(n)
        self._calib: dict[str, CalibrationData] = {}

    def _sample_file(self, model: str, method: str, n: int) -> Path:
        name = f"{model}-{model_fingerprint(model)}-{method}-s{self.seed}-t{self.steps}-n{n}.npz"
        return self.cache / "samples" / name

    def samples(self, model: str, tag: str = "fp", loaded=None, keep: bool = True) -> np.ndarray:
        """Samples of the first n seeds, cached under the weights' fingerprint (a cached larger set is
        sliced: sample i depends on i only) and resumable. `loaded` = (model, scheduler) to sample a
        model object (a quantized one) rather than loading `model`; keep=False drops the finished file."""
        tag = tag.replace("/", "_").replace(":", "_")
        cached = self.cached(model, tag)
        if cached is not None:
            return cached
        m, s = loaded if loaded is not None else load(model)
        f = self._sample_file(model, tag, self.n)
        images = sample_to_npz(m, s, self.labels, f, seed=self.seed, steps=self.steps, progress=self.progress,
                               desc=f"{model} {tag}")
        if not keep:
            f.unlink(missing_ok=True)
        return images

    def cached(self, model: str, tag: str = "fp") -> np.ndarray | None:
        """The first n samples from a finished cache file of n or more, or None."""
        pattern = self._sample_file(model, tag, 0).name.replace("-n0.npz", "-n*.npz")
        for f in sorted(self._sample_file(model, tag, 0).parent.glob(pattern)):
            if int(f.stem.rsplit("-n", 1)[1]) >= self.n:
                with np.load(f) as z:
                    return z["images"][: self.n]
        return None

    def fp_samples(self, model: str) -> np.ndarray:
        return self.samples(model, "fp")

    def calibration(self, model: str) -> CalibrationData:
        if model not in self._calib:
            m, s = load(model)
            self._calib[model] = collect(m, s, n=self.calib_n, steps=self.steps, progress=self.progress)
        return self._calib[model]

    def build(self, model: str, method: str) -> tuple[torch.nn.Module, object, dict]:
        """(model, scheduler, info) for a method: 'fp', a recipe name or file, or 'peer:<name>'."""
        m, s = load(model)
        info: dict = {"fp32_checkpoint_bytes": checkpoint_bytes(resolve(model))}
        t0 = time.time()
        if method == "fp":
            info.update(effective_bits=32.0, checkpoint_bytes=info["fp32_checkpoint_bytes"])
        elif method.startswith("peer:"):
            from diffquant.peers import apply_peer

            info.update(apply_peer(m, method[5:]))
        else:
            recipe = get_recipe(method)
            # finished AQ layers are shared by every recipe of this model and calibration: a layer's file is
            # reused only when its spec matches, and the search settings are the defaults
            resume = self.cache / "aq-layers" / f"{model}-{model_fingerprint(model)}-c{self.calib_n}-t{self.steps}"
            quantize_(m, recipe, calib=self.calibration(model) if needs_calibration(recipe) else None,
                      resume_dir=resume, progress=self.progress, scheduler=s)
            if getattr(m, "dq_finetune_log", None):
                info["finetune"] = m.dq_finetune_log
            if getattr(m, "dq_laq_log", None):
                info["laq"] = m.dq_laq_log
            if getattr(m, "dq_recon_log", None):
                info["recon"] = m.dq_recon_log
            if getattr(m, "dq_aq_log", None):
                log = m.dq_aq_log
                info["aq_layers"] = log
                searched = [n for n, e in log.items() if "rel_error" in e and not e.get("resumed")]
                errs = [e["rel_error"] for e in log.values() if "rel_error" in e]
                info["aq_mean_rel_error"] = sum(errs) / max(1, len(errs))
                if searched:  # layer-wise search speed (layers taken from a resumed run are not counted)
                    weights = sum(m.get_submodule(n).qweight.numel for n in searched)
                    info["aq_weights_per_s"] = round(weights / sum(log[n]["seconds"] for n in searched), 1)
            with tempfile.TemporaryDirectory() as tmp:
                save(m, Path(tmp) / "q", s, source=model)
                meta = json.loads((Path(tmp) / "q" / "diffquant.json").read_text())
            info.update(effective_bits=meta["effective_bits"], checkpoint_bytes=meta["checkpoint_bytes"],
                        unquantized_weight_layers=meta["unquantized_weight_layers"])
        info["quantize_s"] = round(time.time() - t0, 2)
        return m, s, info

    def run_one(self, model: str, method: str, grids: Path | None) -> dict:
        ref = self.fp_samples(model)
        m, s, info = self.build(model, method)
        t0 = time.time()
        # a method's finished samples are not kept: only its partial chunks matter (resume)
        images = ref if method == "fp" else self.samples(model, method, loaded=(m, s), keep=False)
        sample_s = time.time() - t0
        t0 = time.time()
        metrics = evaluate(images, self.labels, ref_images=ref)
        row = {"model": model, "method": method, **metrics, **info,
               "sample_s": round(sample_s, 1), "eval_s": round(time.time() - t0, 1)}
        if grids is not None:
            g = Path(grids) / f"{model}--{method.replace('/', '_').replace(':', '_')}.png"
            save_grid(images[:GRID_N], g)
            row["grid"] = g.name
        return row


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock beside `out`, so that several runs may fill one results file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rows_with_provenance(old: dict) -> list[dict]:
    """`old`'s rows, each stamped with the file's commit and CPU where it has none of its own (rows
    written before rows carried them), so that the next writer's file-level commit does not claim them."""
    cpu = (old.get("machine") or {}).get("cpu")
    return [r if "commit" in r else {**r, "commit": old.get("commit"), "cpu": cpu, "commit_from": "the file"}
            for r in old.get("rows", [])]


def _merge_rows_written_meanwhile(doc: dict, out: Path) -> None:
    """Keeps rows another process wrote to `out` (same protocol) since this one read it, and the
    file's `superseded_rows` (rows of an older recipe kept for the record, not in the tables)."""
    if not out.exists():
        return
    old = json.loads(out.read_text())
    if (old.get("n"), old.get("seed"), old.get("steps")) != (doc["n"], doc["seed"], doc["steps"]):
        return
    mine = {(r["model"], r["method"]) for r in doc["rows"]}
    doc["rows"][:0] = [r for r in _rows_with_provenance(old) if (r["model"], r["method"]) not in mine]
    if old.get("superseded_rows"):
        doc["superseded_rows"] = old["superseded_rows"]


def run_quality(models: list[str], methods: list[str], n: int, out: Path, seed: int = 0, steps: int = 20,
                cache: Path = Path("runs/cache"), resume: bool = True, progress: bool = True, size: str = "") -> dict:
    """Runs every (model, method) and writes `out` (JSON) after each row; grids go beside it."""
    out = Path(out)
    grids = out.parent / (out.stem + "-grids")
    doc = {"benchmark": "mnist32", "size": size or str(n), "n": n, "seed": seed, "steps": steps,
           "sampler": "ddim", "eta": 0.0, "rows": []}
    if resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("n") == n and old.get("seed") == seed and old.get("steps") == steps:
            doc["rows"] = _rows_with_provenance(old)
            doc["wall_time_s"] = old.get("wall_time_s", 0)  # accumulated over resumed segments
    done = {(r["model"], r["method"]) for r in doc["rows"]}
    proto = Protocol(n, seed, steps, cache, progress=progress)
    prov = provenance()  # the code this run started with (a later commit during a long run is not it)
    t_start = time.time()
    for model in models:
        for method in methods:
            if (model, method) in done:
                continue
            row = proto.run_one(model, method, grids)
            # each row keeps its own commit and CPU: a results file gathers rows over many runs
            row.update(commit=prov["commit"], cpu=prov["machine"].get("cpu"))
            doc["rows"].append(row)
            doc.update(prov)
            doc["wall_time_s"] = round(doc.get("wall_time_s", 0) + time.time() - t_start, 1)
            t_start = time.time()
            doc["grids_dir"] = grids.name
            with _locked(out):
                _merge_rows_written_meanwhile(doc, out)
                write_json(out, doc)
            if progress:
                print(f"  {model:12s} {method:16s} bits {row['effective_bits']:6.2f}  FID {row['fid']:7.2f}  "
                      f"FID-to-FP {row.get('fid_to_fp', 0):7.3f}  acc {row['class_accuracy']:.3f}", flush=True)
    return doc
