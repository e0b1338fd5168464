"""The denoiser as a graph, extracted by running it once: weight layers and the operations that
combine their outputs are the nodes, data flow the edges.

Neither torch.fx nor torch.export traces every diffusers model as it stands (data-dependent
Python in the attention processors and embeddings), so diffquant watches one real forward
instead: forward hooks on the weight layers (a layer is one node; what happens inside it is not
recorded), and a `TorchFunctionMode` that sees every torch function in between. Each tensor
carries the set of nodes that produced it; an elementwise or shape operation passes the set on
(it is transparent), and a *combining* operation (add, mul, cat, matmul, attention) whose tensor
inputs come from two or more different producers becomes a node with an edge from each. The result
is what Qua²SeDiMo's GNN reads: weight layers plus the unquantized operations that join them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from diffquant.methods.recon import blocks
from diffquant.nn.swap import quantizable_layers

COMBINING = {"add": "add", "__add__": "add", "__radd__": "add", "__iadd__": "add", "add_": "add",
             "sub": "add", "__sub__": "add", "__rsub__": "add",
             "mul": "mul", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "mul_": "mul", "addcmul": "mul",
             "cat": "cat", "concat": "cat", "concatenate": "cat", "stack": "cat",
             "matmul": "matmul", "__matmul__": "matmul", "bmm": "matmul", "baddbmm": "matmul", "einsum": "matmul",
             "scaled_dot_product_attention": "attention"}
OP_KINDS = ("add", "mul", "cat", "matmul", "attention")


@dataclass
class ModelGraph:
    names: list[str]  # a weight layer's qualified name, or "op:<kind>:<index>"
    kinds: list[str]  # "linear", "conv", "conv1x1", or an op kind
    block: list[int]  # 0: before the first top-level block, 1..B: inside block b, B + 1: after the last
    edges: list[tuple[int, int]]  # (producer, consumer), node indices
    num_blocks: int = 0
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.index = {n: i for i, n in enumerate(self.names)}

    @property
    def layer_nodes(self) -> list[int]:
        return [i for i, k in enumerate(self.kinds) if k not in OP_KINDS]

    def adjacency(self, self_loops: bool = True) -> torch.Tensor:
        """(N, N) boolean, a[i, j] = j sends to i; both directions, so that messages flow both ways."""
        n = len(self.names)
        a = torch.zeros(n, n, dtype=torch.bool)
        if self.edges:
            e = torch.tensor(self.edges)
            a[e[:, 1], e[:, 0]] = True
            a[e[:, 0], e[:, 1]] = True
        if self_loops:
            a |= torch.eye(n, dtype=torch.bool)
        return a


def _tensors(o):
    if torch.is_tensor(o):
        yield o
    elif isinstance(o, (tuple, list)):
        for v in o:
            yield from _tensors(v)
    elif isinstance(o, dict):
        for v in o.values():
            yield from _tensors(v)


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: dict):
        super().__init__()
        self.g = graph
        self.producers: dict[int, frozenset[int]] = {}
        self.alive: list[torch.Tensor] = []  # keeps ids unique for the duration of the forward
        self.inside = 0
        self.block = 0

    def of(self, args) -> list[frozenset[int]]:
        return [self.producers.get(id(t), frozenset()) for t in _tensors(args)]

    def mark(self, out, prods: frozenset[int]) -> None:
        for t in _tensors(out):
            self.producers[id(t)] = prods
            self.alive.append(t)

    def node(self, name: str, kind: str, inputs: list[frozenset[int]]) -> int:
        i = len(self.g["names"])
        self.g["names"].append(name)
        self.g["kinds"].append(kind)
        self.g["block"].append(self.block)
        self.g["edges"].extend((p, i) for p in sorted(set().union(*inputs)) if inputs)
        return i

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.inside:
            return out
        ins = [p for p in self.of((args, kwargs)) if p]
        kind = COMBINING.get(getattr(func, "__name__", ""))
        if kind is not None and len(set(ins)) >= 2:
            i = self.node(f"op:{kind}:{len(self.g['names'])}", kind, ins)
            self.mark(out, frozenset({i}))
        elif ins:
            self.mark(out, frozenset().union(*ins))
        return out


def _layer_kind(mod: nn.Module) -> str:
    shape = tuple(mod.qweight.shape if hasattr(mod, "qweight") else mod.weight.shape)
    if len(shape) == 2:
        return "linear"
    return "conv1x1" if shape[2:] == (1, 1) else "conv"


@torch.no_grad()
def extract_graph(model: nn.Module, sample: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor) -> ModelGraph:
    """Runs `model(sample, timestep, class_labels=labels)` once and records its graph. Works on the
    FP model or a quantized one (quantized layers are found by their original names)."""
    from diffquant.pipelines import latent_shape

    want = tuple(latent_shape(model))
    if tuple(sample.shape[1:]) != want:
        dims = ", ".join(map(str, want))
        raise ValueError(f"sample has shape {tuple(sample.shape)}; this model takes (batch, {dims})")
    g: dict = {"names": [], "kinds": [], "block": [], "edges": []}
    rec = _Recorder(g)
    layers = {n: m for n, m in model.named_modules()
              if n in set(quantizable_layers(model)) or hasattr(m, "qweight")}
    top = list(blocks(model).values())
    hooks = []

    def pre_layer(_m, args, kwargs):
        rec.pending = rec.of((args, kwargs))
        rec.inside += 1

    def post_layer(name):
        def hook(m, _a, _k, out):
            rec.inside -= 1
            ins = [p for p in rec.pending if p]
            i = rec.node(name, _layer_kind(m), ins)
            rec.mark(out, frozenset({i}))
        return hook

    def enter_block(b):
        def hook(*_):
            rec.block = b
        return hook

    def leave_block(*_):
        rec.block = len(top) + 1

    for name, m in layers.items():
        hooks.append(m.register_forward_pre_hook(pre_layer, with_kwargs=True))
        hooks.append(m.register_forward_hook(post_layer(name), with_kwargs=True))
    for b, m in enumerate(top, start=1):
        hooks.append(m.register_forward_pre_hook(enter_block(b)))
        hooks.append(m.register_forward_hook(leave_block))
    try:
        with rec:
            model(sample, timestep, class_labels=labels)
    finally:
        for h in hooks:
            h.remove()
    missing = set(layers) - set(g["names"])
    if missing:
        raise RuntimeError(f"layers never called in the forward, so not in the graph: {sorted(missing)[:5]}")
    return ModelGraph(g["names"], g["kinds"], g["block"], sorted(set(g["edges"])), num_blocks=len(top))
