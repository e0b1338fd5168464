"""Layer-wise additive quantization (AQUATIC-Diff's weight step, after AQLM's algorithm).

For one layer with flattened weight W (out, d) and the Gram matrix H = X^T X / N of its inputs
(collected over all timesteps of the FP sampling trajectory; for a convolution X holds the unfolded
k x k patches), find codes, codebooks and per-row scales minimising

    || W X - W^ X ||^2  =  tr( (W - W^) H (W - W^)^T ).

Steps: per-row scales (row RMS) and residual k-means codebooks; then rounds of (a) Adam on the
codebooks and scales with the codes fixed and (b) a beam search over the codes of one codebook at a
time, all rows in parallel, until the relative error improves by less than `tol`.

The beam search keeps, for every row, `beam` hypotheses of that codebook's codes. It visits the
groups in order; at each group every hypothesis is extended by each of the 2^B codewords, the exact
change of the quadratic error is computed from cached H r products, and the best `beam`
extensions survive. The current codes are always a candidate, so the error never increases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.formats.additive import AdditiveSpec, AdditiveWeight, dequantize_additive
from diffquant.formats.packing import code_dtype


@dataclass(frozen=True)
class AQSearch:
    """How hard the layer-wise search works (not stored with the model)."""

    beam: int = 4
    kmeans_iters: int = 16
    adam_steps: int = 60
    lr: float = 2e-3
    max_rounds: int = 6
    tol: float = 1e-2  # stop when a round improves the relative error by less than this fraction
    damp: float = 1e-2  # H += damp * mean(diag H) * I: keeps directions the calibration never saw
    seed: int = 0

    def __post_init__(self):
        if self.beam < 1:
            raise ValueError(f"beam must be >= 1, got {self.beam}")


# --------------------------------------------------------------------------------------------------
# Gram matrices of the layer inputs


def layer_rows(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows that multiply the flattened weight: tokens for a Linear, unfolded
    k x k patches (in_channels * kh * kw, PyTorch's weight order) for a Conv2d."""
    if isinstance(module, torch.nn.Conv2d) or hasattr(module, "stride"):
        geo = module
        if geo.groups != 1:
            raise ValueError("additive quantization of grouped convolutions is not supported; exclude the layer")
        k = module.weight.shape[-2:]
        pad = geo.padding
        if isinstance(pad, str):
            if pad != "same" and pad != "valid":
                raise ValueError(f"unsupported padding {pad!r}")
            pad = tuple(((kk - 1) * d) // 2 for kk, d in zip(k, geo.dilation, strict=True)) if pad == "same" else 0
        cols = F.unfold(x.float(), k, dilation=geo.dilation, padding=pad, stride=geo.stride)  # (n, d, L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.float().reshape(-1, x.shape[-1])


def gram(module: torch.nn.Module, batches: list[torch.Tensor], damp: float = 1e-2) -> torch.Tensor:
    """H = X^T X / N over all recorded inputs, damped on the diagonal."""
    h, n = None, 0
    for x in batches:
        rows = layer_rows(module, x).double()
        h = rows.T @ rows if h is None else h + rows.T @ rows
        n += rows.shape[0]
    if h is None:
        raise ValueError("no calibration inputs for this layer")
    h = (h / n).float()
    h += damp * h.diagonal().mean().clamp_min(1e-8) * torch.eye(h.shape[0])
    return h


# --------------------------------------------------------------------------------------------------
# initialisation


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain k-means of the rows of x (N, g) into k centroids; (centroids (k, g), assignment (N,)).
    With fewer points than centroids the spare centroids are copies of points (never selected twice
    by argmin ties, harmless)."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=gen)[:k]
    if len(idx) < k:
        idx = torch.cat([idx, torch.randint(0, n, (k - len(idx),), generator=gen)])
    c = x[idx].clone()
    for _ in range(iters):
        a = _nearest(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k).float()
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():  # re-seed empty clusters on the points farthest from their centroid
            far = ((x - c[a]) ** 2).sum(1).topk(int(empty.sum())).indices
            c[empty] = x[far]
    return c, _nearest(x, c)


def _nearest(x: torch.Tensor, c: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
    cn = (c * c).sum(1)
    out = []
    for i in range(0, x.shape[0], chunk):
        xi = x[i:i + chunk]
        out.append((cn[None] - 2 * xi @ c.T).argmin(1))
    return torch.cat(out)


def init_additive(w: torch.Tensor, spec: AdditiveSpec, iters: int, gen: torch.Generator):
    """Per-row RMS scales and residual k-means codebooks: codebook m clusters what codebooks < m left."""
    out, d = w.shape
    scale = w.pow(2).mean(1).sqrt().clamp_min(1e-8)
    resid = (w / scale[:, None]).reshape(-1, spec.group)
    k = 1 << spec.bits
    books, codes = [], []
    for _ in range(spec.codebooks):
        c, a = kmeans(resid, k, iters, gen)
        books.append(c)
        codes.append(a)
        resid = resid - c[a]
    codes_t = torch.stack(codes, -1).reshape(out, d // spec.group, spec.codebooks)
    return codes_t, torch.stack(books), scale


# --------------------------------------------------------------------------------------------------
# the two alternating steps


def relative_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    e = w - w_hat
    return float(((e @ h) * e).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


def adam_step(w, h, codes, books, scale, steps: int, lr: float):
    """Adam on the codebooks and the scales, codes fixed; returns the improved (books, scale)."""
    books = books.clone().requires_grad_(True)
    log_s = scale.log().clone().requires_grad_(True)
    opt = torch.optim.Adam([books, log_s], lr=lr)
    denom = ((w @ h) * w).sum().clamp_min(1e-30)
    for _ in range(steps):
        e = w - dequantize_additive(codes, books, log_s.exp())
        loss = ((e @ h) * e).sum() / denom
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return books.detach(), log_s.detach().exp()


@torch.no_grad()
def beam_search(w, h, codes, books, scale, m: int, beam: int) -> torch.Tensor:
    """New codes for codebook m (others fixed) by beam search over the groups; returns all codes.

    Only H r (out, beam, d) is carried along, and only its columns of groups not yet visited are
    reordered when the beam's hypotheses change places; the residuals themselves are rebuilt from
    the codes at the end, where the best hypothesis of each row is picked by its exact error."""
    out, d = w.shape
    _, k_words, g = books.shape
    groups = d // g
    cm = books[m]  # (K, g)
    others = w - dequantize_additive(codes, books, scale) + scale[:, None] * cm[codes[:, :, m].long()].reshape(out, d)
    hr = ((w - dequantize_additive(codes, books, scale)) @ h)[:, None, :].repeat(1, beam, 1)  # (out, beam, d)
    err = torch.zeros(out, beam)
    err[:, 1:] = float("inf")  # one live hypothesis at the start: the current codes (relative error 0)
    hc = codes[:, :, m].long()[:, None, :].repeat(1, beam, 1)  # (out, beam, G)
    s = scale[:, None, None]
    chc_all = torch.stack([((cm @ h[j * g:(j + 1) * g, j * g:(j + 1) * g]) * cm).sum(-1) for j in range(groups)])
    identity = torch.arange(beam)[None, :]
    for j in range(groups):
        sl = slice(j * g, (j + 1) * g)
        hjj = h[sl, sl]
        a = cm[hc[:, :, j]]  # (out, beam, g) codeword in place now
        hr_j = hr[:, :, sl]
        # delta(c) = s (a - C_c) added to the residual on group j; d err = 2 delta.Hr_j + delta^T Hjj delta
        lin = (a * hr_j).sum(-1, keepdim=True) - hr_j @ cm.T  # (out, beam, K)
        ah = a @ hjj
        quad = (ah * a).sum(-1, keepdim=True) - 2 * ah @ cm.T + chc_all[j]
        cand = err[:, :, None] + 2 * s * lin + s * s * quad  # (out, beam, K)
        best, flat = cand.reshape(out, -1).topk(beam, dim=1, largest=False)
        src, word = flat // k_words, flat % k_words
        if not torch.equal(src, identity.expand_as(src)):
            idx = src[:, :, None]
            tail = hr[:, :, j * g:]
            hr[:, :, j * g:] = tail.gather(1, idx.expand(-1, -1, tail.shape[-1]))
            hc = hc.gather(1, idx.expand(-1, -1, groups))
        a_sel = cm[hc[:, :, j]]
        delta = s * (a_sel - cm[word])  # (out, beam, g)
        if j + 1 < groups:
            hr[:, :, (j + 1) * g:] += delta @ h[sl, (j + 1) * g:]
        hc[:, :, j] = word
        err = best
    resid = others[:, None, :] - s * cm[hc].reshape(out, beam, d)
    exact = (resid * (resid @ h)).sum(-1)  # pick by exact error (the running sums drift slightly)
    pick = exact.argmin(1)
    new = codes.clone()
    new[:, :, m] = hc[torch.arange(out), pick].to(codes.dtype)
    return new


# --------------------------------------------------------------------------------------------------


@dataclass
class LayerResult:
    weight: AdditiveWeight
    rel_error_init: float
    rel_error: float
    rounds: int
    seconds: float


def quantize_layer(weight: torch.Tensor, h: torch.Tensor, spec: AdditiveSpec, search: AQSearch = AQSearch(),
                   name: str = "") -> LayerResult:
    """Additive quantization of one weight (Linear (out, in) or Conv2d (out, in, kh, kw))."""
    import time

    t0 = time.time()
    w = weight.detach().reshape(weight.shape[0], -1).float()
    out, d = w.shape
    if d % spec.group:
        raise ValueError(f"layer {name or '?'}: codeword length {spec.group} does not divide its {d} inputs per "
                         f"output channel. Fix: a group that divides {d}, or exclude the layer.")
    if h.shape != (d, d):
        raise ValueError(f"layer {name or '?'}: Gram matrix {tuple(h.shape)} does not match {d} inputs")
    gen = torch.Generator().manual_seed(search.seed)
    codes, books, scale = init_additive(w, spec, search.kmeans_iters, gen)
    codes = codes.to(torch.int64)
    err0 = err = relative_error(w, dequantize_additive(codes, books, scale), h)
    rounds = 0
    while rounds < search.max_rounds:
        rounds += 1
        books, scale = adam_step(w, h, codes, books, scale, search.adam_steps, search.lr)
        for m in range(spec.codebooks):
            codes = beam_search(w, h, codes, books, scale, m, search.beam)
        new = relative_error(w, dequantize_additive(codes, books, scale), h)
        improved = (err - new) / max(err, 1e-30)
        err = new
        if improved < search.tol:
            break
    books, scale = adam_step(w, h, codes, books, scale, search.adam_steps, search.lr)
    qw = AdditiveWeight(codes.to(code_dtype(spec.bits)), books.half(), scale.half(), weight.shape, spec)
    final = relative_error(w, qw.dequantize().reshape(out, d), h)
    return LayerResult(qw, err0, final, rounds, time.time() - t0)


# --------------------------------------------------------------------------------------------------
# choosing (M, B, g) for a layer under an effective-bit budget


# On short codewords (2-4 weights) each codebook beyond the first is worth about a quarter of a code
# bit less than a single codebook spending the same bits. Measured on the zoo models' layers with real
# Gram matrices (benchmarks/aq_settings.py): 1x7 on pairs (3.5 code bits) beat 3x5 on quadruples
# (3.75), and 1x6 on pairs beat 2x6 on quadruples; the picks on linear and 1x1 layers at 3-4 bits have
# 0.48-0.67x the error of the plain code-bit count's (geometric means). On 9-long kernel slices the
# same allowance was mixed (0.97-1.14x), so longer codewords keep the plain count.
EXTRA_CODEBOOK_BITS = 0.25


def rate_bits(spec: AdditiveSpec) -> float:
    """Code bits per weight, less EXTRA_CODEBOOK_BITS per codebook beyond the first on codewords of at
    most 4 weights: the figure the setting's error follows (each rate bit quarters it), used to rank
    settings and in LAQ's error model."""
    penalty = EXTRA_CODEBOOK_BITS * (spec.codebooks - 1) if spec.group <= 4 else 0.0
    return spec.code_bits_per_weight - penalty


def spec_options(shape: tuple[int, ...], kernel_aware: bool = True, max_codebooks: int = 8,
                 bits: tuple[int, ...] = (4, 5, 6, 7, 8, 9, 10, 11, 12)) -> list[AdditiveSpec]:
    """The settings considered for a layer: codeword length k*k for a k x k convolution when kernel-aware
    (KAQ), else 2, 4, 8 or 16 consecutive inputs (those that divide the row). Pairs matter on small
    layers, where a codebook of long codewords costs a large share of the budget.

    A convolution with one input channel (a patch embedding) is treated as linear: its only kernel
    slice is the whole filter, so KAQ would quantize each filter as one codeword. On the zoo DiT's
    pos_embed.proj (128 x 1 x 4 x 4) at 4 bits that left 0.45 relative error, against 0.022 for pairs
    within the same budget (benchmarks/aq_settings.py; the recipes keep that layer at 8-bit uniform,
    but a plain AQConfig with io_bits=None or a Qua²SeDiMo `aq` option reaches it)."""
    d = math.prod(shape[1:])
    ksz = math.prod(shape[2:]) if len(shape) == 4 else 1
    flat = [g for g in (2, 4, 8, 16) if d % g == 0]
    kaq = kernel_aware and ksz > 1 and (ksz < d or not flat)
    groups = [ksz] if kaq else flat
    return [AdditiveSpec(m, b, g) for g in groups for m in range(1, max_codebooks + 1) for b in bits
            if (shape[0] * d // g) >= 1]


def choose_spec(shape: tuple[int, ...], target_bits: float, kernel_aware: bool = True,
                max_codebooks: int = 8) -> AdditiveSpec:
    """The setting with the most rate bits (code bits, less a measured allowance per extra codebook)
    whose effective bits (codes + fp16 codebooks + fp16 scales) stay within `target_bits`; ties go to
    fewer, larger codebooks (AQLM's finding: one big codebook beats several small ones at equal bits),
    then to the longer codeword."""
    out, d = shape[0], math.prod(shape[1:])
    fits = [s for s in spec_options(shape, kernel_aware, max_codebooks) if s.effective_bits(out, d) <= target_bits]
    if not fits:
        cheapest = min(spec_options(shape, kernel_aware, max_codebooks), key=lambda s: s.effective_bits(out, d))
        raise ValueError(f"no additive setting fits {target_bits} bits for a layer of shape {tuple(shape)} "
                         f"(the cheapest, {cheapest}, takes {cheapest.effective_bits(out, d):.2f}). "
                         "Fix: a higher target, or keep the layer in another format.")
    return max(fits, key=lambda s: (round(rate_bits(s), 6), -s.codebooks, s.group))
