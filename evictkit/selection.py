"""Shared selection helpers: scores -> sorted kept indices.

Rules every policy gets for free (documented evictkit choices, not from any single paper):
- protected slots (the `sinks` oldest, the `window` newest) are always kept;
- ties go to the more recent entry (higher slot), deterministically;
- indices come back sorted ascending, so kept entries keep their original order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GQA_REDUCTIONS = ("mean", "max")
POOLS = ("max", "avg", "none")


def reduce_gqa(scores: torch.Tensor, n_kv_heads: int, how: str = "mean") -> torch.Tensor:
    """[B, H_q, T] -> [B, H_kv, T] by reducing over each KV head's query-head group."""
    if how not in GQA_REDUCTIONS:
        raise ValueError(f"gqa={how!r}: must be one of {', '.join(GQA_REDUCTIONS)}")
    B, Hq, T = scores.shape
    if Hq % n_kv_heads:
        raise ValueError(f"{Hq} query heads are not a multiple of {n_kv_heads} KV heads")
    grouped = scores.view(B, n_kv_heads, Hq // n_kv_heads, T)
    return grouped.mean(2) if how == "mean" else grouped.amax(2)


def pool1d(scores: torch.Tensor, kernel: int, how: str = "max") -> torch.Tensor:
    """SnapKV pooling along the key axis: stride 1, zero padding k//2, odd kernel.

    [B, H, T] -> [B, H, T]. `avg` counts the zero padding (as SnapKV's avg_pool1d does).
    """
    if how == "none" or kernel == 1:
        return scores
    if how not in POOLS:
        raise ValueError(f"pool={how!r}: must be one of {', '.join(POOLS)}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel={kernel}: must be a positive odd integer")
    B, H, T = scores.shape
    flat = scores.reshape(B * H, 1, T)
    if how == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return out.view(B, H, T)


def select_topk(
    scores: torch.Tensor, k: int, *, sinks: int = 0, window: int = 0, policy: str = "policy",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the top-`k` of `scores` [B, H, T] plus the protected slots; returns sorted [B, H, min(k, T)].

    valid: [B, H, T] bool, False on leading padding slots (`Observation.valid`): they are never
    kept while a real entry is left out, and the `sinks` are the first real slots of each head.

    Ties are broken toward the more recent slot. NaN scores raise ValueError. Scores are compared
    in fp32 (`scores.float()`; an fp64 score is rounded to fp32), so the result does not depend on
    the dtype of the cache. The cast cannot undo a lower precision: bf16/fp16 scores have already
    rounded distinct values to ties, which flips the top-k, so `ScorePolicy.score` returns fp32
    (compute with `.float()`). Returns int64 indices, as `select()` must.
    """
    B, H, T = scores.shape
    if k >= T:
        return torch.arange(T, device=scores.device).expand(B, H, T)
    s = scores.float()
    if torch.isnan(s).any():
        raise ValueError(f"policy {policy!r} returned NaN scores; eviction needs a total order")
    if valid is not None:
        # padding below every real score; sinks counted from each head's first real slot
        s = s.masked_fill(~valid, float("-inf"))
        if sinks:
            first = (~valid).sum(-1, keepdim=True)  # padding is a leading prefix
            slots = torch.arange(T, device=s.device)
            s = s.masked_fill((slots >= first) & (slots < first + sinks), float("inf"))
            sinks = 0
    if sinks or window:
        s = s.clone()
        if sinks:
            s[..., : min(sinks, T)] = float("inf")
        if window:
            s[..., max(T - window, 0) :] = float("inf")
    # Stable descending sort of the reversed row: among equal scores the newer slot comes first.
    order = torch.argsort(s.flip(-1), dim=-1, descending=True, stable=True)[..., :k]
    return (T - 1 - order).sort(dim=-1).values


def _kind(x: object) -> str:
    return f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def check_indices(idx: torch.Tensor, B: int, H: int, T: int, k: int, policy: str) -> None:
    """Validate a policy's selection before it touches the cache: int64 only (an int32 selection is
    refused rather than cast, so that the docs, the core and the conformance kit state one rule)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise TypeError(f"policy {policy!r}: select() must return an int64 tensor [B, H_kv, K], got "
                        f"{_kind(idx)}; convert with `.long()`")
    if tuple(idx.shape) != (B, H, k):
        raise ValueError(f"policy {policy!r}: select() returned shape {tuple(idx.shape)}, expected {(B, H, k)}")
    if k == 0:
        return
    increasing = (idx[..., 1:] > idx[..., :-1]).all()
    # strictly increasing + first >= 0 + last < T covers the range too: one host sync, not three
    if bool(increasing & (idx[..., 0] >= 0).all() & (idx[..., -1] < T).all()):
        return
    if not bool(increasing):
        raise ValueError(f"policy {policy!r}: select() must return strictly increasing indices")
    raise ValueError(f"policy {policy!r}: select() returned indices outside [0, {T})")
