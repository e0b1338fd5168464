"""The graph watched from one forward: every weight layer once, the combining operations, edges
that follow the data."""

import pytest
import torch

import diffquant as dq
from diffquant.nn.swap import quantizable_layers
from diffquant.pipelines import latent_shape
from diffquant.sensitivity.graph import extract_graph


def _graph(model):
    return extract_graph(model, torch.randn(1, *latent_shape(model)), torch.tensor([10]), torch.tensor([1]))


def test_unet_graph_has_every_layer_and_its_joins(tiny_unet):
    g = _graph(tiny_unet)
    layers = list(quantizable_layers(tiny_unet))
    assert sorted(g.names[i] for i in g.layer_nodes) == sorted(layers)
    kinds = set(g.kinds)
    assert {"add", "cat", "conv", "linear"} <= kinds  # residual adds, skip concatenations
    edges = {(g.names[a], g.names[b]) for a, b in g.edges}
    assert ("down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2") not in edges  # the time add sits between
    into_conv2 = {g.names[a] for a, b in g.edges if g.names[b] == "down_blocks.0.resnets.0.conv2"}
    assert all(n.startswith("op:add") for n in into_conv2)
    assert all(a < b for a, b in g.edges)  # forward order is a topological order
    assert set(g.block) <= set(range(g.num_blocks + 2)) and max(g.block) == g.num_blocks + 1


def test_dit_graph_joins_attention_and_adaln(tiny_dit):
    g = _graph(tiny_dit)
    att = [i for i, k in enumerate(g.kinds) if k == "attention"]
    assert att
    srcs = {g.names[a].rsplit(".", 1)[-1] for a, b in g.edges if b == att[0]}
    assert srcs == {"to_q", "to_k", "to_v"}
    assert "mul" in g.kinds  # adaLN modulation: x * (1 + scale)


def test_quantized_model_gives_the_same_graph(tiny_unet):
    fp = _graph(tiny_unet)
    q = dq.quantize_(__import__("copy").deepcopy(tiny_unet), dq.get_recipe("w4a16"))
    qg = _graph(q)
    assert (qg.names, qg.kinds, qg.edges) == (fp.names, fp.kinds, fp.edges)


def test_adjacency_is_symmetric_with_self_loops(tiny_dit):
    a = _graph(tiny_dit).adjacency()
    assert torch.equal(a, a.T) and bool(a.diagonal().all())


def test_wrong_input_shape_is_named(tiny_unet):
    with pytest.raises(ValueError, match="this model takes"):
        extract_graph(tiny_unet, torch.randn(1, 1, 4, 4), torch.tensor([1]), torch.tensor([0]))
