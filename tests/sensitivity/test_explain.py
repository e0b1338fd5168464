"""Explanations name the layer that matters, and recipes meet their bit target."""

import numpy as np
import pytest
import torch

from diffquant.pipelines import latent_shape
from diffquant.sensitivity.explain import descend, recipe_for_bits, sensitivity, unit_scores
from diffquant.sensitivity.graph import extract_graph
from diffquant.sensitivity.predictor import TrainConfig, node_features, train_gnn
from diffquant.sensitivity.space import SearchSpace, all_options

SENSITIVE = "proj_out_2"


@pytest.mark.slow
def test_the_sensitive_layer_scores_highest_and_keeps_its_bits(tiny_dit):
    """Synthetic labels that depend on one layer's bits: the explanation must single it out, and the
    3-bit recipe must keep it at 4 bits. Each unit draws its option on its own here: in the paper's
    sampling (`sample.random_configs`) one p sets every unit's odds, so the units' widths move together and a
    few dozen labels cannot tell which unit the label follows (the explanation then picks a look-alike)."""
    space = SearchSpace(tiny_dit, all_options(bits=(2, 4), methods=("uaq", "kmeans-c"))).build(progress=False)
    g = extract_graph(tiny_dit, torch.randn(1, *latent_shape(tiny_dit)), torch.tensor([5]), torch.tensor([1]))
    gen = torch.Generator().manual_seed(0)
    configs = [{u: space.options[int(torch.randint(len(space.options), (1,), generator=gen))] for u in space.units}
               for _ in range(64)]
    y = torch.tensor([(4.0 - c[SENSITIVE].bits) + 0.05 * (i % 3) for i, c in enumerate(configs)])
    gnn = train_gnn(node_features(space, g, configs), y, g.adjacency(), TrainConfig(epochs=120, batch_size=16))
    scores = unit_scores(space, g, [gnn], [1.0], configs[:8])
    sens = sensitivity(space, scores)
    assert max(sens, key=sens.get) == SENSITIVE
    config, info = recipe_for_bits(space, scores, 3.0, g, [gnn], [1.0])
    assert info["effective_bits"] <= 3.0 + 1e-9
    assert config[SENSITIVE].bits == 4
    assert np.isfinite(info["predicted"])


def test_target_below_the_space_is_rejected(tiny_dit):
    space = SearchSpace(tiny_dit, all_options(bits=(2, 4), methods=("uaq",))).build(progress=False)
    scores = {u: {o.key: 0.0 for o in space.options} for u in space.units}
    with pytest.raises(ValueError, match="below the smallest"):
        recipe_for_bits(space, scores, 1.0)
    config, info = recipe_for_bits(space, scores, 3.0)
    assert info["effective_bits"] <= 3.0


def test_descent_spares_the_costly_unit_and_stops_at_the_target(tiny_dit):
    """A cost that only the sensitive unit's width moves: the descent lowers every other unit first,
    stays within the target, and keeps the base method everywhere."""
    space = SearchSpace(tiny_dit, all_options(bits=(2, 3, 4), methods=("uaq", "kmeans-a"))).build(progress=False)
    base = next(o for o in space.options if o.key == "kmeans-a-4")

    def cost(configs):
        return np.asarray([100.0 * (4 - c[SENSITIVE].bits) + sum(4 - o.bits for o in c.values()) for c in configs])

    config = descend(space, base, 3.0, cost)
    assert space.effective_bits(config) <= 3.0
    assert config[SENSITIVE].bits == 4
    assert {o.method for o in config.values()} == {"kmeans-a"}
    assert descend(space, base, 4.5, cost) == {u: base for u in space.units}  # already within the target
    with pytest.raises(ValueError, match="below every configuration"):
        descend(space, base, 1.0, cost)
    mixed = descend(space, base, 3.0, cost, any_method=True)  # may switch methods, still spares the unit
    assert space.effective_bits(mixed) <= 3.0 and mixed[SENSITIVE].bits == 4
    # a fixed unit keeps its option even where lowering it would cost nothing
    cheap = next(u for u in space.units if u != SENSITIVE)
    pinned = next(o for o in space.options if o.key == "uaq-4")
    for any_method in (False, True):
        held = descend(space, base, 3.0, lambda cs: np.zeros(len(cs)), any_method, fixed={cheap: pinned})
        assert held[cheap] == pinned and space.effective_bits(held) <= 3.0
