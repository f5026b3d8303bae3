"""Adaptive window smoothing (AWS) of ReST-KV (plugins/restkv.py): the drift of the window's
top-(budget - w) key positions, the per-head kernel and shift it sets, and the shifted,
replicate-padded average pool. Split from _restkv_math.py, which re-exports every name.

Shapes: B batch, Hq query heads, w window queries, T cached keys, P prefix keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evictkit.helpers import pool1d

SPATIALS = ("none", "avg", "max", "adaptive")
#: elements per temporary of `_count_and_position_sum` on CPU (about 1 MiB; as the indicator's
#: chunks in _restkv_math.CHUNK_ELEMS); larger on GPUs
_ROW_CHUNK_ELEMS = {"cpu": 1 << 18, "other": 1 << 24}


_SAME_ORDER_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


def _ordered_bits(attn: torch.Tensor) -> torch.Tensor:
    """Attention weights viewed as integers of the same order, where the dtype allows: weights
    are >= 0, and non-negative IEEE floats order like their bit patterns, so integer top-k and
    comparisons skip the NaN-aware float comparator (about 1.5x faster on CPU)."""
    return attn.view(_SAME_ORDER_INT[attn.dtype]) if attn.dtype in _SAME_ORDER_INT else attn


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
    attn = _ordered_bits(attn)
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

    In fp32 blocks of `_POS_BLOCK` keys and _ROW_CHUNK_ELEMS-sized row chunks: a float64 mask of
    every row at 16k keys spends more time faulting in fresh pages than computing.
    """
    lead, T = rows.shape[:-1], rows.shape[-1]
    flat, tau = rows.reshape(-1, T), tau.reshape(-1, 1)
    R = flat.shape[0]
    count = torch.zeros(R, dtype=torch.float64, device=rows.device)
    pos_sum = torch.zeros_like(count)
    local = torch.arange(min(T, _POS_BLOCK), dtype=torch.float32, device=rows.device)
    per = max(1, _ROW_CHUNK_ELEMS["cpu" if rows.device.type == "cpu" else "other"] // min(T, _POS_BLOCK))
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
    rows = _ordered_bits(torch.cat([attn[..., :half, :], attn[..., w - half :, :]], dim=-2) if w % 2 else attn)
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


def aws_kernel(
    t: torch.Tensor, beta: float, k_min: int, *, reference_edge: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
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


def shifted_avg_pool(
    scores: torch.Tensor, kernel: torch.Tensor, shift: torch.Tensor, first: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row replicate-padded average pool: out_i = mean(s[clamp(j)] for j in
    [i + shift - k//2, i + shift + k//2]). scores [..., n]; kernel, shift [...] ints -> [..., n].

    first: optional [...] ints, each row's first real slot (a padded batch's leading padding
    comes before it): the row is pooled as if it began there, replicating s[first] at its left
    edge, so its real slots get what the row alone would get (the slots before are junk).

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
    first_w, last = centre - half, centre + half  # [R, n] window bounds, inclusive
    run = F.pad(x.cumsum(-1), (1, 0))  # run[:, j] = sum of x[:, :j]
    inner = run.gather(1, (last + 1).clamp(0, n)) - run.gather(1, first_w.clamp(0, n))
    below = (last.clamp(max=-1) - first_w + 1).clamp_(min=0)  # window slots left of the row
    above = (last - first_w.clamp(min=n) + 1).clamp_(min=0)  # and right of it
    if first is None:
        total = inner + below * x[:, :1] + above * x[:, -1:]
    else:
        lo = first.reshape(-1, 1).to(dev).clamp(0, n - 1)  # the row's own left edge
        inner = (run.gather(1, torch.maximum((last + 1).clamp(max=n), lo))
                 - run.gather(1, torch.maximum(first_w.clamp(max=n), lo)))
        below = (torch.minimum(last, lo - 1) - first_w + 1).clamp_(min=0)
        total = inner + below * x.gather(1, lo) + above * x[:, -1:]
    return (total / kernel.reshape(-1, 1).to(dev)).to(scores.dtype).view(*lead, n)


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
    score: torch.Tensor, spatial: str, k_min: int, aws: tuple[torch.Tensor, torch.Tensor] | None = None,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spatial smoothing of [B, Hq, P] scores: none, fixed avg/max pool of k_min, or the
    adaptive pool with `aws` = (kernel, shift) per head (None: k_min, no shift).

    first: optional [B, Hq] first real slot of each head (padded batches). The adaptive pool
    replicates from there; the zero-padded avg/max pools need nothing, since the scores of
    padding slots are 0 and real scores are >= 0 (a zero counts as the pools' own padding)."""
    if spatial == "none" or score.shape[-1] == 0:
        return score
    if spatial in ("avg", "max"):
        return pool1d(score, k_min, spatial)
    if spatial != "adaptive":
        raise ValueError(f"spatial={spatial!r}: must be one of {', '.join(SPATIALS)}")
    if aws is None:
        zeros = torch.zeros(score.shape[:-1], dtype=torch.long, device=score.device)
        aws = (zeros + k_min, zeros)
    return shifted_avg_pool(score, *aws, first=first)
