"""Random configurations spread the bits; labels are cached by configuration and rank damage."""

import json

import torch

from diffquant.sensitivity.sample import (
    LabelConfig,
    Labeler,
    config_from_json,
    config_key,
    label_all,
    random_configs,
)
from diffquant.sensitivity.space import Option, SearchSpace, all_options


class _PixelFeatures:
    """A stand-in for the metric network (whose checkpoint a tiny test need not load)."""

    def __call__(self, images):
        return {"pool": torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1).double()}


def test_random_configs_are_reproducible_and_spread_the_bits(tiny_dit):
    space = SearchSpace(tiny_dit, all_options()).build(progress=False)
    a, b = random_configs(space, 24, seed=1), random_configs(space, 24, seed=1)
    assert [config_key(c) for c in a] == [config_key(c) for c in b]
    bits = sorted(space.effective_bits(c) for c in a)
    assert bits[-1] - bits[0] > 1.0
    assert {o.method for c in a for o in c.values()} == {"uaq", "kmeans-c", "kmeans-a"}
    assert config_from_json({u: o.key for u, o in a[0].items()}) == a[0]


def test_labels_are_cached_and_two_bits_hurt_more_than_four(tiny_unet, scheduler, tmp_path):
    space = SearchSpace(tiny_unet, all_options(bits=(2, 4), methods=("uaq",))).build(progress=False)
    lab = Labeler(space, scheduler, LabelConfig(n=8, steps=4), extractor=_PixelFeatures())
    low = {u: Option("uaq", 2) for u in space.units}
    high = {u: Option("uaq", 4) for u in space.units}
    got = label_all(lab, [low, high], tmp_path, progress=False)
    assert got[0]["mse_to_fp"] > got[1]["mse_to_fp"] and got[0]["bits"] < got[1]["bits"]
    path = tmp_path / f"{config_key(low)}.json"
    stamp = json.loads(path.read_text())
    stamp["mse_to_fp"] = -1.0  # a cached label is read back, not recomputed
    path.write_text(json.dumps(stamp))
    assert label_all(lab, [low], tmp_path, progress=False)[0]["mse_to_fp"] == -1.0
