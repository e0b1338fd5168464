"""The quality predictor: a GATv2 graph network over the denoiser's graph, and the simple
predictors it has to beat.

All configurations of one model share one graph (`graph.ModelGraph`); only the node features
change, so a batch is a (configurations, nodes, features) tensor and the attention runs densely
over the shared adjacency (graphs here have ~100-200 nodes). torch_geometric is not needed for that,
and diffquant keeps its dependencies to torch: `GATv2Layer` is the 30-line version of Brody et al.'s
layer (e_ij = a . LeakyReLU(W_l h_i + W_r h_j), softmax over the neighbours j, sum of W_r h_j).

Node features (Qua²SeDiMo's): for a weight layer, its option's method (one-hot) and bits, the size
reduction (32 / the layer's effective bits), the log of its relative quantization error, its type
(linear / conv / 1x1 conv), its block, its position in forward order and its size; for a combining
operation, its kind. The target is a quality score where lower is better (by default the log of the label's FID-to-FP,
standardised); training minimises MSE plus a pairwise ranking loss, in k folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.stats import spearmanr
from tqdm import tqdm

from diffquant.sensitivity.graph import OP_KINDS, ModelGraph
from diffquant.sensitivity.space import Option, SearchSpace

LAYER_KINDS = ("linear", "conv", "conv1x1")


def node_features(space: SearchSpace, graph: ModelGraph, configs: list[dict[str, Option]]) -> torch.Tensor:
    """(configurations, nodes, features)."""
    unit_of = {n: u for u, ls in space.units.items() for n in ls}
    nb = graph.num_blocks + 1
    static = torch.zeros(len(graph.names), len(LAYER_KINDS) + len(OP_KINDS) + 3)
    for i, (name, kind) in enumerate(zip(graph.names, graph.kinds, strict=True)):
        kinds = LAYER_KINDS + OP_KINDS
        static[i, kinds.index(kind)] = 1
        static[i, -3] = i / len(graph.names)  # position in forward order: tells apart look-alike layers
        static[i, -2] = graph.block[i] / nb
        static[i, -1] = math.log10(space.numel[name]) / 6 if name in space.numel else 0
    methods = space.methods
    dyn = torch.zeros(len(configs), len(graph.names), len(methods) + 3)
    for c, config in enumerate(configs):
        for i, name in enumerate(graph.names):
            if name not in unit_of:
                continue
            o = config[unit_of[name]]
            dyn[c, i, methods.index(o.method)] = 1
            dyn[c, i, -3] = o.bits / 4
            dyn[c, i, -2] = 32 / space.layer_bits[name][o.key] / 16
            dyn[c, i, -1] = math.log10(max(space.rel_error[name][o.key], 1e-8)) / 4
    return torch.cat([static.expand(len(configs), -1, -1), dyn], dim=-1)


class GATv2Layer(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, heads: int = 4):
        super().__init__()
        assert dim_out % heads == 0
        self.heads, self.dh = heads, dim_out // heads
        self.wl = nn.Linear(dim_in, dim_out)
        self.wr = nn.Linear(dim_in, dim_out)
        self.att = nn.Parameter(torch.randn(heads, self.dh) / math.sqrt(self.dh))

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        """h (batch, nodes, dim_in); adj (nodes, nodes) boolean, adj[i, j]: j sends to i. Runs over the
        edge list (a few per node), not the dense nodes x nodes square."""
        b, n, _ = h.shape
        dst, src = adj.nonzero(as_tuple=True)
        hl = self.wl(h).view(b, n, self.heads, self.dh)
        hr = self.wr(h).view(b, n, self.heads, self.dh)
        e = (F.leaky_relu(hl[:, dst] + hr[:, src], 0.2) * self.att).sum(-1)  # (b, edges, heads)
        idx = dst.view(1, -1, 1).expand_as(e)
        peak = torch.full((b, n, self.heads), float("-inf")).scatter_reduce(1, idx, e, "amax", include_self=True)
        w = (e - peak.gather(1, idx)).exp()
        denom = torch.zeros(b, n, self.heads).index_add(1, dst, w)
        alpha = w / denom.gather(1, idx)
        out = torch.zeros(b, n, self.heads, self.dh).index_add(1, dst, alpha[..., None] * hr[:, src])
        return out.reshape(b, n, -1)


class GNNPredictor(nn.Module):
    """4 GATv2 layers of width 64 (residual, layer norm), mean pooling over nodes, an MLP head."""

    def __init__(self, dim_in: int, width: int = 64, layers: int = 4):
        super().__init__()
        self.inp = nn.Linear(dim_in, width)
        self.layers = nn.ModuleList(GATv2Layer(width, width) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))

    def embed(self, x: torch.Tensor, adj: torch.Tensor) -> list[torch.Tensor]:
        """Node embeddings after each hop (for the explanations)."""
        h = self.inp(x)
        hops = []
        for layer, norm in zip(self.layers, self.norms, strict=True):
            h = h + F.gelu(layer(norm(h), adj))
            hops.append(h)
        return hops

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x, adj)[-1].mean(1)).squeeze(-1)


def ranking_loss(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise logistic (RankNet): every pair with different targets should keep its order."""
    dp = pred[:, None] - pred[None, :]
    sign = torch.sign(y[:, None] - y[None, :])
    mask = sign != 0
    return F.softplus(-sign[mask] * dp[mask]).mean() if bool(mask.any()) else pred.sum() * 0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 300
    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 32
    rank_weight: float = 1.0
    seed: int = 0


def train_gnn(x: torch.Tensor, y: torch.Tensor, adj: torch.Tensor, cfg: TrainConfig = TrainConfig()) -> GNNPredictor:
    torch.manual_seed(cfg.seed)
    model = GNNPredictor(x.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            pred = model(x[idx], adj)
            loss = F.mse_loss(pred, y[idx]) + cfg.rank_weight * ranking_loss(pred, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def ndcg_at(pred: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """NDCG@k of picking the best configurations (lowest y) by the prediction; gains are the
    targets' ranks (the best configuration gains most)."""
    gain = np.empty(len(y))
    gain[np.argsort(-y)] = np.arange(len(y))  # worst 0 ... best n-1
    disc = 1 / np.log2(np.arange(2, min(k, len(y)) + 2))
    dcg = (gain[np.argsort(pred)[:k]] * disc).sum()
    ideal = (np.sort(gain)[::-1][:k] * disc).sum()
    return float(dcg / ideal) if ideal > 0 else 0.0


def folds(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def evaluate_predictions(pred: np.ndarray, y: np.ndarray) -> dict:
    """Spearman (0 where a constant prediction ranks nothing) and NDCG@10."""
    if np.ptp(pred) == 0 or np.ptp(y) == 0:
        return {"spearman": 0.0, "ndcg10": ndcg_at(pred, y, 10)}
    return {"spearman": float(spearmanr(pred, y).statistic), "ndcg10": ndcg_at(pred, y, 10)}


def flat_features(space: SearchSpace, configs: list[dict[str, Option]]) -> np.ndarray:
    """One row per configuration: each unit's bits and method (one-hot), for the tree baseline."""
    rows = []
    for c in configs:
        row = []
        for u in space.units:
            o = c[u]
            row += [o.bits] + [float(o.method == m) for m in space.methods]
        rows.append(row)
    return np.asarray(rows, dtype=np.float64)


def summed_error(space: SearchSpace, configs: list[dict[str, Option]],
                 errors: dict[str, dict[str, float]] | None = None,
                 unit_weight: dict[str, float] | None = None) -> np.ndarray:
    """The zero-training predictor: the configuration's per-layer relative errors (`errors`, by
    default the weight-space `space.rel_error`), summed, each unit's optionally scaled by `unit_weight`."""
    errors = space.rel_error if errors is None else errors
    return np.asarray([sum((1.0 if unit_weight is None else unit_weight[u]) * sum(errors[n][c[u].key] for n in ls)
                           for u, ls in space.units.items()) for c in configs])


def target_of(labels: list[dict], key: str = "fid_to_fp") -> np.ndarray:
    """The training target: the log of a label (lower is better), standardised."""
    v = np.log(np.maximum(np.asarray([lab[key] for lab in labels], dtype=np.float64), 1e-12))
    return (v - v.mean()) / max(v.std(), 1e-12)


def cross_validate(space: SearchSpace, graph: ModelGraph, configs: list[dict[str, Option]], y: np.ndarray,
                   k: int = 5, cfg: TrainConfig = TrainConfig(), seed: int = 0, progress: bool = False) -> dict:
    """Held-out Spearman and NDCG@10 per fold for the GNN, gradient-boosted trees on flat features
    and the summed per-layer error; the GNN of every fold is returned for the explanations."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    x = node_features(space, graph, configs)
    adj = graph.adjacency()
    flat = flat_features(space, configs)
    summed = summed_error(space, configs)
    yt = torch.tensor(y, dtype=torch.float32)
    out: dict = {"gnn": [], "trees": [], "summed_error": [], "models": [], "heldout": np.zeros(len(y))}
    for f, test in enumerate(tqdm(folds(len(y), k, seed), desc="predictor folds", disable=not progress)):
        train = np.setdiff1d(np.arange(len(y)), test)
        gnn = train_gnn(x[train], yt[train], adj, TrainConfig(**{**cfg.__dict__, "seed": cfg.seed + f}))
        with torch.no_grad():
            pred = gnn(x[test], adj).numpy()
        out["heldout"][test] = pred
        out["gnn"].append(evaluate_predictions(pred, y[test]))
        out["models"].append(gnn)
        trees = HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, random_state=seed)
        trees.fit(flat[train], y[train])
        out["trees"].append(evaluate_predictions(trees.predict(flat[test]), y[test]))
        out["summed_error"].append(evaluate_predictions(summed[test], y[test]))
    for name in ("gnn", "trees", "summed_error"):
        out[f"{name}_mean"] = {m: float(np.mean([r[m] for r in out[name]])) for m in ("spearman", "ndcg10")}
    return out
