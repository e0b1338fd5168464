"""The shipped zoo checkpoints meet their bar (slow: samples with the real models)."""

import pytest

from diffquant.metrics.features import load_feature_net
from diffquant.models import load
from diffquant.pipelines import balanced_labels, sample
from diffquant.zoo.registry import CHECKPOINT_DIR, ZOO


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_draws_the_requested_digit(name):
    if not (CHECKPOINT_DIR / name / "diffquant.json").exists():
        pytest.skip(f"{name} not trained")
    model, scheduler = load(name)
    labels = balanced_labels(100)
    x = sample(model, scheduler, labels, progress=False)
    acc = (load_feature_net()(x)["logits"].argmax(1) == labels).double().mean()
    assert acc >= 0.95
    assert sum(p.numel() for p in model.parameters()) >= 2_000_000
