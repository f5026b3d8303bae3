"""Numerics of ReST-KV (plugins/restkv.py), kept free of hooks and caches so each step is testable.

Shapes: B batch, Hq query heads, Hkv KV heads (g = Hq // Hkv per group), w window queries,
T cached keys, P = T - w prefix keys (the ones that can be evicted), d head dim, C hidden size.
Every function computes in the dtype it is given; the policy hands it fp32 (tests use float64).
The spatial step (AWS) lives in _restkv_aws.py; its names are re-exported here.
"""

from __future__ import annotations

import torch

from evictkit.plugins._restkv_aws import (  # noqa: F401  (re-exported: the scorer's steps in one namespace)
    SPATIALS,
    aws_drift,
    aws_drift_bounds,
    aws_kernel,
    aws_params,
    shifted_avg_pool,
    smooth,
)

METRIC_MODES = ("after", "before")
INDICATORS = ("attn", "attn_vnorm", "reconstruction")
TEMPORALS = ("none", "mean", "ema", "inv_ema")

#: smallest 1 - a in the odds ratio a / (1 - a): caps it at 1/ODDS_EPS instead of inf when a -> 1
ODDS_EPS = 1e-6
#: elements per temporary of the chunked reconstruction indicator ([B, Hq, chunk, d], or
#: [B, Hq, w, chunk] in metric_mode="before"): about 1 MiB on CPU, where cache-sized chunks
#: ran 2-3x faster than one [B, Hq, P, d] pass (page faults, memory traffic); larger on GPUs,
#: where the number of kernel launches matters more
CHUNK_ELEMS = {"cpu": 1 << 18, "other": 1 << 24}


def key_chunk(per_key: int, device: torch.device) -> int:
    """Keys per chunk when one key costs `per_key` elements in each temporary."""
    budget = CHUNK_ELEMS["cpu" if device.type == "cpu" else "other"]
    return max(64, budget // max(per_key, 1))


# --- temporal smoothing ---------------------------------------------------------------------
def temporal_weights(w: int, mode: str, alpha: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Weights c [w] with sum_t c_t x_t equal to the chosen aggregation of rows x_0..x_{w-1}
    (oldest first).

    ema: s_1 = x_1, s_t = alpha x_t + (1 - alpha) s_{t-1}; unrolled, the newest row weighs
    alpha, row t weighs alpha (1-alpha)^(w-1-t) and the oldest keeps (1-alpha)^(w-1).
    inv_ema: the same recursion over the reversed rows (emphasises the oldest queries).
    mean: 1/w each. none: the newest row only.
    The recursion is linear, so one weighted sum replaces the w-step loop of the reference.
    """
    if mode not in TEMPORALS:
        raise ValueError(f"temporal={mode!r}: must be one of {', '.join(TEMPORALS)}")
    if w < 1:
        raise ValueError(f"w={w}: need at least one window query")
    if mode == "none":
        c = torch.zeros(w, dtype=torch.float64)
        c[-1] = 1.0
    elif mode == "mean":
        c = torch.full((w,), 1.0 / w, dtype=torch.float64)
    else:
        powers = torch.arange(w - 1, -1, -1, dtype=torch.float64)  # w-1-t
        c = alpha * (1.0 - alpha) ** powers
        c[0] = (1.0 - alpha) ** (w - 1)
        if mode == "inv_ema":
            c = c.flip(0)
    return c.to(dtype=dtype, device=device)


def row_temporal_weights(real: torch.Tensor, mode: str, alpha: float, *, dtype=torch.float32) -> torch.Tensor:
    """Per-row weights [B, w] for a padded batch's window, real [B, w] bool (padding queries,
    position -1, come first): row b weighs its n_b real queries as `temporal_weights(n_b)`
    does a window of n_b alone, and its padding queries 0."""
    B, w = real.shape
    n = real.sum(-1)
    out = torch.zeros(B, w, dtype=dtype, device=real.device)
    for count in sorted(set(n.tolist()) - {0}):  # at most w distinct counts
        out[n == count, w - count :] = temporal_weights(count, mode, alpha, dtype=dtype, device=real.device)
    return out


def aggregate(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[B, ..., w, N] rows, [w] weights (or [B, w], one set per batch row) -> [B, ..., N]
    weighted sum over the window axis."""
    if weights.dim() == 2:
        shape = (weights.shape[0], *([1] * (rows.dim() - 3)), 1, weights.shape[1])
        return torch.matmul(weights.to(rows.dtype).view(shape), rows).squeeze(-2)
    return torch.matmul(weights.to(rows.dtype).view(1, -1), rows).squeeze(-2)


# --- the output-reconstruction indicator ----------------------------------------------------
def head_grams(o_proj_weight: torch.Tensor, n_heads: int, *, dtype=torch.float32) -> torch.Tensor:
    """G_h = W_O^h^T W_O^h for each query head: [C, Hq*d] -> [Hq, d, d].

    W_O^h is the [C, d] column block of o_proj.weight that multiplies head h's output, so
    ||W_O^h x||^2 = x^T G_h x and the [*, C] projection never has to be formed.
    """
    C, Hd = o_proj_weight.shape
    if Hd % n_heads:
        raise ValueError(f"o_proj weight {tuple(o_proj_weight.shape)} does not split into {n_heads} heads")
    d = Hd // n_heads
    wh = o_proj_weight.to(dtype).reshape(C, n_heads, d).transpose(0, 1)  # [Hq, C, d]
    return torch.matmul(wh.transpose(1, 2), wh)


def gram_norm(x: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||W x|| = sqrt(x^T G x) along the last axis: x [..., n, d], G [..., d, d] -> [..., n].

    The quadratic form is clamped at 0 against rounding (G is PSD).
    """
    return torch.matmul(x, gram).mul_(x).sum(-1).clamp_min_(0).sqrt_()


def odds_ratio(a: torch.Tensor, eps: float = ODDS_EPS) -> torch.Tensor:
    """a / (1 - a) with 1 - a kept >= eps, so a weight of 1 gives 1/eps instead of inf."""
    return a / (1.0 - a).clamp_min(eps)


def reconstruction_scores(
    a: torch.Tensor, v: torch.Tensor, o: torch.Tensor, gram: torch.Tensor, eps: float = ODDS_EPS
) -> torch.Tensor:
    """a_j / (1 - a_j) * ||W_O^h (o - v_j)|| (shapes broadcast).

    a: [..., n] attention weights; v: [..., n, d] values; o: [..., d] the head's output;
    gram: [..., d, d] = W_O^h^T W_O^h. returns [..., n].

    With `a` the softmax of one query over all keys and o = sum_j a_j v_j, this is exactly the
    change of the head's projected output when key j alone is removed and the softmax
    renormalises: o - o' = a_j (v_j - o) / (1 - a_j).
    """
    x = o.unsqueeze(-2) - v
    return odds_ratio(a, eps) * gram_norm(x, gram)


def chunked_reconstruction_scores(
    a: torch.Tensor, v: torch.Tensor, o: torch.Tensor, gram: torch.Tensor, eps: float = ODDS_EPS
) -> torch.Tensor:
    """`reconstruction_scores` over the key axis in chunks (see CHUNK_ELEMS): a [..., n] (the
    full output shape), v [..., n, d] broadcastable to a's batch shape, o [..., d], gram [..., d, d]."""
    n = a.shape[-1]
    out = torch.empty_like(a)
    step = key_chunk(a[..., 0].numel() * v.shape[-1], a.device)
    for start in range(0, n, step):
        stop = min(start + step, n)
        out[..., start:stop] = reconstruction_scores(a[..., start:stop], v[..., start:stop, :], o, gram, eps)
    return out


def value_gram_norms(values: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||W_O^h v_j||^2 = v_j^T G_h v_j for every key and query head of its group:
    values [B, Hkv, n, d], gram [Hkv, g, d, d] -> [B, Hkv, g, n] (keys in chunks, CHUNK_ELEMS).

    It depends on the key and the layer only, so a decode-time scorer can keep it per token."""
    B, Hkv, n, d = values.shape
    g = gram.shape[1]
    out = values.new_empty(B, Hkv, g, n)
    step = key_chunk(B * Hkv * g * d, values.device)
    for start in range(0, n, step):
        v = values[:, :, None, start : start + step]  # [B, Hkv, 1, c, d]
        out[..., start : start + step] = torch.matmul(v, gram).mul_(v).sum(-1)
    return out


def reconstruction_scores_cached(
    a: torch.Tensor, values: torch.Tensor, gram: torch.Tensor, vgv: torch.Tensor, eps: float = ODDS_EPS
) -> torch.Tensor:
    """`reconstruction_scores` from cached `value_gram_norms`, in O(H P d) instead of O(H P d^2):
    ||W(o - v_j)||^2 = o^T G o - 2 (G o).v_j + v_j^T G v_j.

    a: [B, Hkv, g, P] aggregated attention; values [B, Hkv, P, d]; gram [Hkv, g, d, d];
    vgv: [B, Hkv, g, P]. returns [B, Hkv, g, P]. Equal to the direct form up to fp32
    cancellation where o is close to v_j (relative ~1e-7 of ||W v_j||^2, clamped at 0).
    """
    o = torch.matmul(a, values)  # [B, Hkv, g, d]
    go = torch.matmul(o.unsqueeze(-2), gram).squeeze(-2)  # [B, Hkv, g, d]
    oo = (go * o).sum(-1, keepdim=True)  # [B, Hkv, g, 1]
    cross = torch.matmul(go, values.transpose(-1, -2))  # [B, Hkv, g, P]
    sq = (oo - 2.0 * cross).add_(vgv).clamp_min_(0)
    return odds_ratio(a, eps).mul_(sq.sqrt_())


def reconstruction_scores_per_query(
    attn: torch.Tensor,
    values: torch.Tensor,
    gram: torch.Tensor,
    n_prefix: int,
    weights: torch.Tensor | None = None,
    eps: float = ODDS_EPS,
) -> torch.Tensor:
    """Per-query scores for metric_mode="before": [B, Hkv, g, w, T] attention, values
    [B, Hkv, T, d], gram [Hkv, g, d, d] -> [B, Hkv, g, w, P] with P = n_prefix, or, given
    temporal `weights` [w] (or [B, w]), their aggregate [B, Hkv, g, P] (chunk by chunk, so the [.., w, P]
    scores never exist at once).

    o_t = A_t V over all T keys (window values included, as the reference does). The distance
    uses the expanded Gram form o^T G o - 2 (G o) . v + v^T G v, which costs O(H*P*d^2 + H*w*P*d)
    instead of the O(H*w*P*d^2) of forming every difference; keys go in chunks (CHUNK_ELEMS).
    """
    B, Hkv, g, w, T = attn.shape
    d = values.shape[-1]
    o = torch.matmul(attn.reshape(B, Hkv, g * w, T), values).view(B, Hkv, g, w, d)
    go = torch.matmul(o, gram)  # [B, Hkv, g, w, d]
    oo = (go * o).sum(-1, keepdim=True)  # [B, Hkv, g, w, 1]
    shape = (B, Hkv, g, n_prefix) if weights is not None else (B, Hkv, g, w, n_prefix)
    out = attn.new_empty(shape)
    step = key_chunk(B * Hkv * g * max(w, d), attn.device)
    for start in range(0, n_prefix, step):
        stop = min(start + step, n_prefix)
        v = values[:, :, start:stop]  # [B, Hkv, c, d]
        vv = value_gram_norms(v, gram)  # [B, Hkv, g, c]
        cross = torch.matmul(go.reshape(B, Hkv, g * w, d), v.transpose(-1, -2)).view(B, Hkv, g, w, -1)
        sq = (oo - 2.0 * cross).add_(vv.unsqueeze(-2)).clamp_min_(0)
        chunk = odds_ratio(attn[..., start:stop], eps).mul_(sq.sqrt_())
        out[..., start:stop] = aggregate(chunk, weights) if weights is not None else chunk
    return out


# --- the whole scorer -----------------------------------------------------------------------
def aggregate_scores(
    a: torch.Tensor,
    values: torch.Tensor,
    gram: torch.Tensor | None,
    indicator: str,
    eps: float = ODDS_EPS,
    value_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indicator scores from temporally aggregated attention ("after" order).

    a: [B, Hq, P] aggregated attention over the P scored keys; values: [B, Hkv, P, d] those
    keys' values; gram: [Hq, d, d] (only for "reconstruction"); value_norms: optionally those
    keys' `value_gram_norms` [B, Hkv, g, P], kept from earlier calls: the reconstruction then
    takes the O(H P d) expanded form. returns [B, Hq, P].
    o sums the scored keys' values only (window values excluded), as the reference does.
    """
    B, Hq, P = a.shape
    Hkv = values.shape[1]
    g = Hq // Hkv
    vals = values.to(a.dtype)
    if indicator == "attn":
        return a
    if indicator == "attn_vnorm":
        return (a.view(B, Hkv, g, P) * vals.norm(dim=-1).unsqueeze(2)).view(B, Hq, P)
    if indicator == "reconstruction":
        # gram is given with indicator="reconstruction"
        ag, grams = a.view(B, Hkv, g, P), gram.view(Hkv, g, *gram.shape[1:])  # type: ignore[union-attr]
        if value_norms is not None:
            return reconstruction_scores_cached(ag, vals, grams, value_norms.to(a.dtype), eps).view(B, Hq, P)
        o = torch.matmul(ag, vals)  # [B, Hkv, g, d]
        return chunked_reconstruction_scores(ag, vals.unsqueeze(2), o, grams, eps).view(B, Hq, P)
    raise ValueError(f"indicator={indicator!r}: must be one of {', '.join(INDICATORS)}")


def restkv_scores(
    attn: torch.Tensor,
    values: torch.Tensor,
    gram: torch.Tensor | None,
    *,
    budget: int | None,
    alpha: float = 0.3,
    beta: float = 2000.0,
    k_min: int = 5,
    metric_mode: str = "after",
    indicator: str = "reconstruction",
    temporal: str = "ema",
    spatial: str = "adaptive",
    eps: float = ODDS_EPS,
    aws_out: dict | None = None,
    query_valid: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReST-KV scores of the prefix keys, per query head, after spatial smoothing.

    attn: [B, Hq, w, T] window attention (softmax over all keys, causal); the last w keys are
    the window's own. values: [B, Hkv, T, d]. gram: [Hq, d, d] (only for "reconstruction").
    budget: entries kept per head, window included (AWS ranks the top budget - w keys);
    None = AWS without a drift estimate (t = 0). aws_out: if given, receives the adaptive
    pool's ("kernel", "shift"), [B, Hq] each.
    Padded batches: query_valid [B, w] bool is False on padding queries (their attention rows
    are 0), which the temporal aggregate skips, each row weighing its own real queries as it
    would alone; first [B, Hq] is each head's first real slot, the adaptive pool's left edge.
    Padding keys have attention 0, so they add nothing to o and score 0.
    returns [B, Hq, P], P = T - w; computed in attn's dtype.
    """
    B, Hq, w, T = attn.shape
    Hkv = values.shape[1]
    g = Hq // Hkv
    P = T - w
    dt = attn.dtype
    if query_valid is not None and not bool(query_valid.all()):
        weights = row_temporal_weights(query_valid, temporal, alpha, dtype=dt)
    else:
        weights = temporal_weights(w, temporal, alpha, dtype=dt, device=attn.device)

    if indicator == "reconstruction" and metric_mode == "before":
        score = reconstruction_scores_per_query(
            # gram is given with indicator="reconstruction"
            attn.reshape(B, Hkv, g, w, T), values.to(dt),
            gram.view(Hkv, g, *gram.shape[1:]), P, weights, eps,  # type: ignore[union-attr]
        ).reshape(B, Hq, P)
    else:
        score = aggregate_scores(aggregate(attn[..., :P], weights), values[:, :, :P], gram, indicator, eps)

    aws = None
    if spatial == "adaptive" and P > 0:
        aws = aws_params(attn, budget, beta, k_min)
        if aws_out is not None:
            aws_out.update(kernel=aws[0], shift=aws[1])
    return smooth(score, spatial, k_min, aws, first)
