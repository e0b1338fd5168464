"""Random mixed configurations, and their labels.

Configurations follow Qua²SeDiMo: per configuration draw p ~ U(0, 1); every unit then steps down
from the highest width Binomial(W - 1, p) times (with widths {3, 4} this is the paper's "take the
low width with probability p"; with {2, 3, 4}: 4 bits with probability (1-p)^2, 3 with 2p(1-p),
2 with p^2), and takes a method uniformly. The spread of p spreads the average bits.

A label is cheap to compute and meant to rank configurations as a large-sample FID-to-FP does:
the configuration samples `n` images from fixed noise (the same noise as the FP reference), and
is scored by its FID to the FP model's images in the metric network's features (`fid_to_fp`) and
by the mean squared pixel distance to them (`mse_to_fp`, paired, low variance). Every label is a
small JSON file named by the configuration's hash, written atomically: an interrupted run resumes,
and several processes (`workers`) can fill one folder.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from diffquant.io_utils import write_json
from diffquant.pipelines import balanced_labels, sample
from diffquant.sensitivity.space import Option, SearchSpace

LABEL_SEED = 4_000_000  # away from evaluation, calibration, PV and reconstruction seeds


@dataclass(frozen=True)
class LabelConfig:
    n: int = 128  # images per configuration
    seed: int = LABEL_SEED
    steps: int = 20


def random_configs(space: SearchSpace, count: int, seed: int = 0) -> list[dict[str, Option]]:
    gen = torch.Generator().manual_seed(seed)
    widths = sorted({o.bits for o in space.options}, reverse=True)
    methods = sorted({o.method for o in space.options})
    out = []
    for _ in range(count):
        p = float(torch.rand((), generator=gen))
        config = {}
        for unit in space.units:
            down = int((torch.rand(len(widths) - 1, generator=gen) < p).sum())  # Binomial(W - 1, p)
            m = methods[int(torch.randint(len(methods), (1,), generator=gen))]
            config[unit] = Option(m, widths[down])
        out.append(config)
    return out


def config_key(config: dict[str, Option]) -> str:
    text = json.dumps({u: o.key for u, o in sorted(config.items())})
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def config_to_json(config: dict[str, Option]) -> dict[str, str]:
    return {u: o.key for u, o in config.items()}


def config_from_json(d: dict[str, str]) -> dict[str, Option]:
    return {u: Option.parse(k) for u, k in d.items()}


class Labeler:
    """Samples a configuration's images and scores them against the FP model's from the same noise."""

    def __init__(self, space: SearchSpace, scheduler, cfg: LabelConfig = LabelConfig(), extractor=None):
        from diffquant.metrics.features import load_feature_net

        self.space, self.scheduler, self.cfg = space, scheduler, cfg
        self.labels = balanced_labels(cfg.n)
        self.extractor = extractor or load_feature_net()
        self.qmodel = space.quantized_model()
        self.ref = self._sample(space.model)
        self.ref_feats = self.extractor(self.ref)["pool"]

    def _sample(self, model: nn.Module) -> torch.Tensor:
        return sample(model, self.scheduler, self.labels, seed=self.cfg.seed, steps=self.cfg.steps, progress=False)

    def label(self, config: dict[str, Option]) -> dict:
        from diffquant.metrics.fid import fid_from_features

        t0 = time.time()
        imgs = self._sample(self.space.apply(self.qmodel, config))
        return {"key": config_key(config), "config": config_to_json(config),
                "bits": self.space.effective_bits(config),
                "fid_to_fp": fid_from_features(self.extractor(imgs)["pool"], self.ref_feats),
                "mse_to_fp": float((imgs - self.ref).pow(2).mean()),
                "label": asdict(self.cfg), "seconds": round(time.time() - t0, 2)}


def label_all(labeler: Labeler, configs: list[dict[str, Option]], out_dir: str | Path,
              progress: bool = True) -> list[dict]:
    """Labels every configuration not yet in `out_dir`; returns every label there for `configs`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [c for c in configs if not (out_dir / f"{config_key(c)}.json").exists()]
    for c in tqdm(todo, desc="label configurations", disable=not progress):
        path = out_dir / f"{config_key(c)}.json"
        if not path.exists():  # another worker may have taken it meanwhile
            write_json(path, labeler.label(c))
    return load_labels(out_dir, configs)


def load_labels(out_dir: str | Path, configs: list[dict[str, Option]] | None = None) -> list[dict]:
    out_dir = Path(out_dir)
    if configs is None:
        return [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    return [json.loads((out_dir / f"{config_key(c)}.json").read_text()) for c in configs
            if (out_dir / f"{config_key(c)}.json").exists()]


def _worker(args) -> None:
    model_name, cache_dir, configs, out_dir, cfg, rank = args
    import diffquant as dq

    torch.set_num_threads(1)
    model, scheduler = dq.load(model_name)[:2]
    options = sorted({o for c in configs for o in c.values()})  # the cache has them all (built beforehand)
    space = SearchSpace(model, options=options or None, cache_dir=cache_dir).build(progress=False)
    label_all(Labeler(space, scheduler, cfg), configs, out_dir, progress=rank == 0)


def label_parallel(model_name: str, cache_dir: str | Path, configs: list[dict[str, Option]], out_dir: str | Path,
                   cfg: LabelConfig = LabelConfig(), workers: int = 2) -> list[dict]:
    """`label_all` over `workers` processes (each takes every workers-th configuration); the search
    space must already be built in `cache_dir`."""
    if workers <= 1:
        _worker((model_name, cache_dir, configs, out_dir, cfg, 0))
    else:
        jobs = [(model_name, cache_dir, configs[r::workers], out_dir, cfg, r) for r in range(workers)]
        with mp.get_context("spawn").Pool(workers) as pool:
            pool.map(_worker, jobs)
    return load_labels(out_dir, configs)
