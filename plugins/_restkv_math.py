"""Numerics of ReST-KV (plugins/restkv.py), kept free of hooks and caches so each step is testable.

Shapes: B batch, Hq query heads, Hkv KV heads (g = Hq // Hkv per group), w window queries,
T cached keys, P = T - w prefix keys (the ones that can be evicted), d head dim, C hidden size.
Every function computes in the dtype it is given; the policy hands it fp32 (tests use float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evictkit.selection import pool1d

METRIC_MODES = ("after", "before")
INDICATORS = ("attn", "attn_vnorm", "reconstruction")
TEMPORALS = ("none", "mean", "ema", "inv_ema")
SPATIALS = ("none", "avg", "max", "adaptive")

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


def aggregate(rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[..., w, N] rows, [w] weights -> [..., N] weighted sum over the window axis."""
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
    temporal `weights` [w], their aggregate [B, Hkv, g, P] (chunk by chunk, so the [.., w, P]
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
        vv = (torch.matmul(v.unsqueeze(2), gram) * v.unsqueeze(2)).sum(-1)  # [B, Hkv, g, c]
        cross = torch.matmul(go.reshape(B, Hkv, g * w, d), v.transpose(-1, -2)).view(B, Hkv, g, w, -1)
        sq = (oo - 2.0 * cross).add_(vv.unsqueeze(-2)).clamp_min_(0)
        chunk = odds_ratio(attn[..., start:stop], eps).mul_(sq.sqrt_())
        out[..., start:stop] = aggregate(chunk, weights) if weights is not None else chunk
    return out


# --- adaptive window smoothing (AWS) ----------------------------------------------------------
_SAME_ORDER_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def aws_drift(attn: torch.Tensor, k: int) -> torch.Tensor:
    """t = mean position of the top-k keys of the first w//2 window queries minus that of the
    last w//2 ones (the middle query of an odd window is skipped). attn: [..., w, T] -> [...].

    Positive t: later queries look further left. Units are cache slots (= token positions at
    prefill). Zero when the window has fewer than 2 queries. topk replaces the reference's full
    argsort; only the mean of the chosen positions matters, so their order does not.
    """
    w, T = attn.shape[-2], attn.shape[-1]
    half = w // 2
    k = min(k, T)
    if half == 0 or k <= 0:
        return attn.new_zeros(attn.shape[:-2], dtype=torch.float64)
    if attn.dtype in _SAME_ORDER_INT:
        # Attention weights are >= 0, and non-negative IEEE floats order like their bit patterns;
        # integer topk skips the NaN-aware float comparator (about 1.5x faster on CPU).
        attn = attn.view(_SAME_ORDER_INT[attn.dtype])
    front = attn[..., :half, :].topk(k, dim=-1, sorted=False).indices
    rear = attn[..., w - half :, :].topk(k, dim=-1, sorted=False).indices
    return front.double().mean((-1, -2)) - rear.double().mean((-1, -2))


#: subsample stride of `aws_drift_bounds`: every 16th key gives the threshold
DRIFT_STRIDE = 16


#: keys per block of `_count_and_position_sum`: fp32 sums of in-block positions stay exact
#: (at most 4095 * 4096 / 2 < 2**24)
_POS_BLOCK = 4096


def _count_and_position_sum(rows: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """#{j: rows_j >= tau} and the sum of those j, both float64: rows [..., T], tau [..., 1].

    In fp32 blocks of `_POS_BLOCK` keys and CHUNK_ELEMS-sized row chunks: a float64 mask of
    every row at 16k keys spends more time faulting in fresh pages than computing.
    """
    lead, T = rows.shape[:-1], rows.shape[-1]
    flat, tau = rows.reshape(-1, T), tau.reshape(-1, 1)
    R = flat.shape[0]
    count = torch.zeros(R, dtype=torch.float64, device=rows.device)
    pos_sum = torch.zeros_like(count)
    local = torch.arange(min(T, _POS_BLOCK), dtype=torch.float32, device=rows.device)
    per = max(1, CHUNK_ELEMS["cpu" if rows.device.type == "cpu" else "other"] // min(T, _POS_BLOCK))
    for r0 in range(0, R, per):
        r1 = min(r0 + per, R)
        for k0 in range(0, T, _POS_BLOCK):
            k1 = min(k0 + _POS_BLOCK, T)
            inside = (flat[r0:r1, k0:k1] >= tau[r0:r1]).float()
            n = inside.sum(-1).double()
            count[r0:r1] += n
            pos_sum[r0:r1] += torch.matmul(inside, local[: k1 - k0]).double() + k0 * n
    return count.view(lead), pos_sum.view(lead)


def aws_drift_bounds(attn: torch.Tensor, k: int, stride: int = DRIFT_STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds lo <= aws_drift(attn, k) <= hi without a top-k over every key. attn: [..., w, T]
    -> two float64 tensors shaped [...].

    Each query gets one threshold tau (the matching rank of a strided subsample) and one pass
    counts c = #{a >= tau} and sums their positions S. If c >= k, the top-k lie inside that
    set (the k-th value is >= tau) and miss e = c - k of it; if c < k they contain it plus
    e = k - c others. Either way the top-k position sum lies within e slots' worth of S:
    [S - e(T-1) + e(e-1)/2, S - e(e-1)/2] or [S + e(e-1)/2, S + e(T-1) - e(e-1)/2], whatever
    the ties. A subsample of 1/16 puts c within ~k/10 of k, so the drift is known to a few
    hundred slots, which is all AWS needs (its kernel moves in steps of beta).
    """
    w, T = attn.shape[-2], attn.shape[-1]
    half = w // 2
    k = min(k, T)
    if half == 0 or k <= 0:
        z = attn.new_zeros(attn.shape[:-2], dtype=torch.float64)
        return z, z
    rows = torch.cat([attn[..., :half, :], attn[..., w - half :, :]], dim=-2) if w % 2 else attn
    if rows.dtype in _SAME_ORDER_INT:
        rows = rows.view(_SAME_ORDER_INT[rows.dtype])
    sub = rows[..., ::stride]
    k_sub = min(sub.shape[-1], max(1, round(k * sub.shape[-1] / T)))
    tau = sub.topk(k_sub, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    count, pos_sum = _count_and_position_sum(rows, tau)
    e = (count - k).abs()
    tri = e * (e - 1) / 2
    spread = e * (T - 1) - tri
    over = count >= k
    lo = torch.where(over, pos_sum - spread, pos_sum + tri)
    hi = torch.where(over, pos_sum - tri, pos_sum + spread)
    n = half * k
    front_lo, rear_lo = lo[..., :half].sum(-1), lo[..., half:].sum(-1)
    front_hi, rear_hi = hi[..., :half].sum(-1), hi[..., half:].sum(-1)
    return (front_lo - rear_hi) / n, (front_hi - rear_lo) / n


def aws_kernel(t: torch.Tensor, beta: float, k_min: int, *, reference_edge: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head kernel and shift from the drift t: k = max(k_min, 2 floor(|t|/beta) + 1),
    shift = t/beta truncated toward zero. Both int64, shaped like t.

    reference_edge=True reproduces the released code's `floor(t/beta)` for t > 0 and
    `floor(t/beta) + 1` otherwise, which differs from truncation at t = 0 (shift +1) and at
    exact negative multiples of beta. evictkit uses plain truncation (see the policy docstring).
    """
    q = t.double() / beta
    k = (2 * torch.floor(t.double().abs() / beta) + 1).clamp_min(k_min).long()
    if reference_edge:
        shift = torch.where(t > 0, torch.floor(q), torch.floor(q) + 1)
    else:
        shift = torch.trunc(q)
    return k, shift.long()


def shifted_avg_pool(scores: torch.Tensor, kernel: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-row replicate-padded average pool: out_i = mean(s[clamp(j)] for j in
    [i + shift - k//2, i + shift + k//2]). scores [..., n]; kernel, shift [...] ints -> [..., n].

    Equals F.pad(s, (k//2 - shift, k//2 + shift), mode="replicate") then avg_pool1d(k, stride 1),
    the reference's per-head loop, for every row at once: the window sum is a difference of a
    float64 running sum over the in-range part, plus the edge value times the number of window
    slots beyond each edge (replicate padding). No grouping by (k, shift), so no host round
    trip on GPUs; also right for |shift| > k//2.
    """
    lead, n = scores.shape[:-1], scores.shape[-1]
    x = scores.reshape(-1, n).double()
    dev = x.device
    half = (kernel.reshape(-1, 1) // 2).to(dev)
    centre = torch.arange(n, device=dev).view(1, n) + shift.reshape(-1, 1).to(dev)
    first, last = centre - half, centre + half  # [R, n] window bounds, inclusive
    run = F.pad(x.cumsum(-1), (1, 0))  # run[:, j] = sum of x[:, :j]
    inner = run.gather(1, (last + 1).clamp(0, n)) - run.gather(1, first.clamp(0, n))
    below = (last.clamp(max=-1) - first + 1).clamp_(min=0)  # window slots left of the row
    above = (last - first.clamp(min=n) + 1).clamp_(min=0)  # and right of it
    total = inner + below * x[:, :1] + above * x[:, -1:]
    return (total / kernel.reshape(-1, 1).to(dev)).to(scores.dtype).view(*lead, n)


# --- the whole scorer -----------------------------------------------------------------------
def aggregate_scores(
    a: torch.Tensor, values: torch.Tensor, gram: torch.Tensor | None, indicator: str, eps: float = ODDS_EPS
) -> torch.Tensor:
    """Indicator scores from temporally aggregated attention ("after" order).

    a: [B, Hq, P] aggregated attention over the P scored keys; values: [B, Hkv, P, d] those
    keys' values; gram: [Hq, d, d] (only for "reconstruction"). returns [B, Hq, P].
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
        ag = a.view(B, Hkv, g, P)
        o = torch.matmul(ag, vals)  # [B, Hkv, g, d]
        return chunked_reconstruction_scores(ag, vals.unsqueeze(2), o, gram.view(Hkv, g, *gram.shape[1:]), eps).view(B, Hq, P)
    raise ValueError(f"indicator={indicator!r}: must be one of {', '.join(INDICATORS)}")


def aws_params(
    attn: torch.Tensor, budget: int | None, beta: float, k_min: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWS kernel and shift per head ([B, Hq] int64 each) from window attention [B, Hq, w, T];
    budget None = no drift estimate (t = 0).

    On CPU the drift is first bounded (`aws_drift_bounds`, ~4x cheaper than the top-k there);
    heads whose bounds fall inside one step of beta take that step, the others get the exact
    top-k. The result is the exact one either way. GPUs run the top-k directly (it is cheap
    there, and the check would cost a host sync).
    """
    B, Hq, w, T = attn.shape
    k_top = None if budget is None else min(budget - w, T)
    if k_top is None or T - k_top < beta:
        # Two means of k distinct slots in [0, T) differ by at most T - k, so |t| < beta and the
        # kernel is k_min with no shift whatever the attention: skip the top-k (exact).
        t = attn.new_zeros((B, Hq), dtype=torch.float64)
        return aws_kernel(t, beta, k_min)
    if attn.device.type != "cpu":
        return aws_kernel(aws_drift(attn, k_top), beta, k_min)
    lo, hi = aws_drift_bounds(attn, k_top)
    # a hair of slack so that float rounding of the exact mean cannot cross a step the bounds miss
    slack = 1e-6 * beta
    kernel, shift = aws_kernel(lo - slack, beta, k_min)
    unsure = shift != aws_kernel(hi + slack, beta, k_min)[1]  # same shift <=> same kernel
    if unsure.any():
        rows = attn[unsure]  # [n_unsure, w, T]
        kernel[unsure], shift[unsure] = aws_kernel(aws_drift(rows, k_top), beta, k_min)
    return kernel, shift


def smooth(
    score: torch.Tensor, spatial: str, k_min: int, aws: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Spatial smoothing of [B, Hq, P] scores: none, fixed avg/max pool of k_min, or the
    adaptive pool with `aws` = (kernel, shift) per head (None: k_min, no shift)."""
    if spatial == "none" or score.shape[-1] == 0:
        return score
    if spatial in ("avg", "max"):
        return pool1d(score, k_min, spatial)
    if spatial != "adaptive":
        raise ValueError(f"spatial={spatial!r}: must be one of {', '.join(SPATIALS)}")
    if aws is None:
        zeros = torch.zeros(score.shape[:-1], dtype=torch.long, device=score.device)
        aws = (zeros + k_min, zeros)
    return shifted_avg_pool(score, *aws)


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
) -> torch.Tensor:
    """ReST-KV scores of the prefix keys, per query head, after spatial smoothing.

    attn: [B, Hq, w, T] window attention (softmax over all keys, causal); the last w keys are
    the window's own. values: [B, Hkv, T, d]. gram: [Hq, d, d] (only for "reconstruction").
    budget: entries kept per head, window included (AWS ranks the top budget - w keys);
    None = AWS without a drift estimate (t = 0). aws_out: if given, receives the adaptive
    pool's ("kernel", "shift"), [B, Hq] each.
    returns [B, Hq, P], P = T - w; computed in attn's dtype.
    """
    B, Hq, w, T = attn.shape
    Hkv = values.shape[1]
    g = Hq // Hkv
    P = T - w
    dt = attn.dtype
    weights = temporal_weights(w, temporal, alpha, dtype=dt, device=attn.device)

    if indicator == "reconstruction" and metric_mode == "before":
        score = reconstruction_scores_per_query(
            attn.reshape(B, Hkv, g, w, T), values.to(dt), gram.view(Hkv, g, *gram.shape[1:]), P, weights, eps
        ).reshape(B, Hq, P)
    else:
        score = aggregate_scores(aggregate(attn[..., :P], weights), values[:, :, :P], gram, indicator, eps)

    aws = None
    if spatial == "adaptive" and P > 0:
        aws = aws_params(attn, budget, beta, k_min)
        if aws_out is not None:
            aws_out.update(kernel=aws[0], shift=aws[1])
    return smooth(score, spatial, k_min, aws)
