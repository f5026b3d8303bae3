"""Per-head (ragged) cache layers: a policy may keep a different number of entries in each KV head.

AdaKV allocates a layer's budget unevenly across heads. transformers caches need rectangular
[B, H_kv, T, D] tensors, so a ragged layer is stored left-padded to its longest head:

- head h's real entries are its last `T - pad[b, h]` slots, in their original order; the first
  `pad[b, h]` slots are padding (finite copies of some entry, true position -1);
- new tokens are appended after the real entries of every head, so the newest slots stay the
  protected window and the padding stays a per-head prefix until the next eviction;
- padding is hidden from the model by a per-head attention mask that the core passes to the
  layer's attention (a forward pre-hook, removed on exit), and from scorers by
  `Observation.valid` (which `Observation.window_attention` applies).

The same pre-hook also rebuilds the mask of a non-ragged layer whose length differs from the
one the model built its mask for (per-layer budgets, e.g. PyramidKV: transformers sizes one mask
from layer 0, and eager attention adds it without slicing).

A policy asks for this layout by returning `(idx, counts)` from `select()`: `idx` [B, H_kv, K]
int64 with head h's kept slots, strictly increasing, in its last `counts[b, h]` columns
(right-aligned), `counts` [B, H_kv] int64 (int32 is refused: convert with `.long()`), and
K = counts.max(); the columns before are padding and their values are ignored. Each batch row
must keep `H_kv * min(T, budget)` entries in total.
The memory saved is that of the longest head, not of the average one.
"""

from __future__ import annotations

import torch

#: attention implementations that accept the per-head mask (a [B, H_q, q, S] bool or additive mask)
MASKED_IMPLS = ("sdpa", "eager")


def valid_mask(pad: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """[B, H_kv, T] bool, True on real entries; None when the layer has no padding."""
    if pad is None:
        return None
    return torch.arange(T, device=pad.device) >= pad[..., None]


def check_ragged(
    idx: torch.Tensor,
    counts: torch.Tensor,
    old_pad: torch.Tensor | None,
    B: int,
    H: int,
    T: int,
    keep: int,
    policy: str,
    attn_impl: str | None,
    exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a ragged selection; return (gather indices [B, H, K], new padding [B, H] or None).

    keep: entries per head on average, min(T, budget); every batch row must keep H * keep, or at
    most that when not `exact` (a policy with `Needs(exact_budget=False)`, e.g. rows of a padded
    batch that free different numbers of whole blocks).
    """
    for what, t in (("idx", idx), ("counts", counts)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"policy {policy!r}: a ragged select() must return int64 {what}, got {got}; "
                            "convert with `.long()`")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (B, H) or tuple(counts.shape) != (B, H):
        raise ValueError(
            f"policy {policy!r}: a ragged select() must return idx [B, H_kv, K] and counts [B, H_kv] = {(B, H)}, "
            f"got {tuple(idx.shape)} and {tuple(counts.shape)}"
        )
    K = idx.shape[-1]
    counts = counts.to(device=idx.device, dtype=torch.long)
    if int(counts.min()) < 0 or int(counts.max()) != K or K > T:
        raise ValueError(
            f"policy {policy!r}: counts must lie in [0, K] with max(counts) == K = {K} <= T = {T}, "
            f"got {counts.tolist()}"
        )
    kept = counts.sum(-1)
    if not bool((kept == H * keep).all() if exact else (kept <= H * keep).all()):
        raise ValueError(
            f"policy {policy!r}: a ragged selection must keep {'' if exact else 'at most '}{H} x {keep} = {H * keep} "
            f"entries per layer, got {kept.tolist()}"
        )
    real = torch.arange(K, device=idx.device) >= (K - counts)[..., None]  # [B, H, K]
    idx = idx.long()
    if bool(((idx < 0) | (idx >= T))[real].any()):
        raise ValueError(f"policy {policy!r}: select() returned indices outside [0, {T})")
    if old_pad is not None and bool((idx < old_pad.to(idx.device)[..., None])[real].any()):
        raise ValueError(f"policy {policy!r}: select() kept a padding slot of the ragged layer")
    if K > 1 and not bool(((idx[..., 1:] > idx[..., :-1]) | ~real[..., :-1]).all()):
        raise ValueError(f"policy {policy!r}: select() must return strictly increasing indices in each head")
    pad = K - counts
    if not bool(pad.any()):
        return idx, None
    if attn_impl not in MASKED_IMPLS and not (isinstance(attn_impl, str) and attn_impl.startswith("evictkit_varlen_")):
        raise ValueError(
            f"policy {policy!r} keeps a different number of entries per KV head, which needs per-head attention "
            f"masks: load the model with attn_implementation in {MASKED_IMPLS} (it uses {attn_impl!r})"
        )
    return torch.where(real, idx, 0), pad


def attention_mask(
    pad: torch.Tensor | None,
    past: int,
    q: int,
    *,
    batch: int,
    n_heads: int,
    like: torch.Tensor | None,
    attn_impl: str | None,
    dtype: torch.dtype,
    device: torch.device,
    new_pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mask for `q` new tokens over a compacted layer of `past` cached slots.

    new_pad: [B] padding tokens among the q new ones (a left-padded batch's first forwards): no
    query sees them, except each padding query itself, which keeps its (unused) output finite.

    Every cached entry is older than the new tokens, so they see all of them (except each head's
    padding when `pad` [B, H_kv] is given) and, causally, each other. Shape [B, H_q, q, past + q]
    on a ragged layer, [B, 1, q, past + q] otherwise. Boolean (True = attend) for SDPA, additive
    (0 / dtype min) for eager attention or when the model's own mask `like` is additive.
    """
    cols = torch.arange(past + q, device=device)
    rows = torch.arange(q, device=device)
    causal = (cols[None, :] < past) | (cols[None, :] - past <= rows[:, None])  # [q, S]
    if new_pad is not None:
        new = cols - past  # >= 0 on the new tokens' columns
        hidden = (new >= 0) & (new < new_pad.to(device)[:, None])  # [B, S]
        own = new[None, :] == rows[:, None]  # [q, S], the diagonal of the new block
        causal = causal & ~(hidden[:, None, :] & ~own[None])  # [B, q, S]
    if pad is None:
        visible = causal.expand(batch, 1, q, past + q) if causal.dim() == 2 else causal[:, None]
    else:
        per_row = causal if causal.dim() == 2 else causal[:, None]  # [q, S] or [B, 1, q, S]
        visible = (cols >= pad.to(device)[..., None])[:, :, None, :] & per_row  # [B, H_kv, q, S]
        visible = visible.repeat_interleave(n_heads // pad.shape[1], dim=1)
    additive = like.dtype != torch.bool if isinstance(like, torch.Tensor) else attn_impl == "eager"
    if not additive:
        return visible
    mdtype = like.dtype if isinstance(like, torch.Tensor) else dtype
    zero = torch.zeros((), dtype=mdtype, device=device)
    return torch.where(visible, zero, torch.finfo(mdtype).min)
