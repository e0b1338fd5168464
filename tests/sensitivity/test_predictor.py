"""The GNN learns which layers matter from labels, and the ranking metrics behave."""

import numpy as np
import pytest
import torch

from diffquant.pipelines import latent_shape
from diffquant.sensitivity.graph import extract_graph
from diffquant.sensitivity.predictor import (
    GATv2Layer,
    TrainConfig,
    cross_validate,
    ndcg_at,
    node_features,
)
from diffquant.sensitivity.sample import random_configs
from diffquant.sensitivity.space import SearchSpace, all_options


def test_ndcg_is_one_for_the_right_order_and_lower_for_the_reverse():
    y = np.arange(20.0)
    assert ndcg_at(y, y) == pytest.approx(1.0)
    assert ndcg_at(-y, y) < 0.6


def test_attention_only_mixes_neighbours():
    layer = GATv2Layer(8, 8)
    adj = torch.eye(4, dtype=torch.bool)
    adj[0, 1] = True
    h = torch.randn(1, 4, 8)
    out = layer(h, adj)
    h2 = h.clone()
    h2[0, 3] += 1  # node 3 feeds nobody but itself
    out2 = layer(h2, adj)
    torch.testing.assert_close(out[0, :3], out2[0, :3])


@pytest.mark.slow
def test_gnn_finds_the_sensitive_layer(tiny_dit):
    """Synthetic labels: quality depends on one layer's bits (plus noise); the GNN must rank held-out
    configurations by it far better than chance, and beat the summed per-layer error."""
    space = SearchSpace(tiny_dit, all_options(bits=(2, 4), methods=("uaq",))).build(progress=False)
    g = extract_graph(tiny_dit, torch.randn(1, *latent_shape(tiny_dit)), torch.tensor([5]), torch.tensor([1]))
    configs = random_configs(space, 60, seed=0)
    sensitive = "proj_out_2"
    rng = np.random.default_rng(0)
    y = np.array([(4 - c[sensitive].bits) + 0.1 * rng.standard_normal() for c in configs])
    assert node_features(space, g, configs[:2]).shape[:2] == (2, len(g.names))
    cv = cross_validate(space, g, configs, y, k=3, cfg=TrainConfig(epochs=60, batch_size=16))
    assert cv["gnn_mean"]["spearman"] > 0.6
    assert cv["gnn_mean"]["spearman"] > cv["summed_error_mean"]["spearman"]


def test_edge_list_attention_equals_the_dense_formula():
    torch.manual_seed(1)
    layer = GATv2Layer(6, 8, heads=2)
    adj = torch.rand(7, 7) < 0.3
    adj |= torch.eye(7, dtype=torch.bool)
    h = torch.randn(3, 7, 6)
    hl = layer.wl(h).view(3, 7, 2, 4)
    hr = layer.wr(h).view(3, 7, 2, 4)
    e = (torch.nn.functional.leaky_relu(hl[:, :, None] + hr[:, None, :], 0.2) * layer.att).sum(-1)
    alpha = e.masked_fill(~adj[None, :, :, None], float("-inf")).softmax(dim=2)
    dense = torch.einsum("bijh,bjhd->bihd", alpha, hr).reshape(3, 7, 8)
    torch.testing.assert_close(layer(h, adj), dense)
