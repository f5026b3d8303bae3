"""Sparse prefill attention in torch: only the selected key slots are read and computed.

Layout and causal rule: `kernels/sparse_prefill_ref.py`. The executor walks the query blocks; a
block's selected slots fall in two parts:

- the *past*: selected slots <= the block's first row's slot. Every row of the block sees all of
  them, so no mask is needed and torch's fused attention kernel runs over them as they are: a
  contiguous run (a window, a band, a whole prefix) is a view of the cache, anything else is one
  `index_select`. On the CPU the kernel is `aten::_scaled_dot_product_flash_attention_for_cpu`,
  the kernel behind `scaled_dot_product_attention`, called directly because it also returns the
  log-sum-exp (the public function does not); elsewhere a plain matmul + logsumexp stands in.
- the *diagonal*: selected slots among the block's own rows' slots (at most block - 1), which
  causality cuts row by row. A small masked matmul over them is merged into the past's output
  by log-sum-exp, so the mask never touches the past.

Heads: with one pattern for every head (P = 1) a block is one call for all heads, the query
heads of each KV head stacked ([1, H_kv, g * n, D] against [1, H_kv, L, D]: K/V are never
expanded); with per-head patterns (P = H_q) the g heads of a KV head share a call when their
rows are equal and run one by one otherwise. The pairs computed are counted from the same slot
lists (a slot at distance d above the block's last row is seen by min(n, d + 1) rows).
"""

from __future__ import annotations

from typing import Any

import torch

from evictkit.kernels.sparse_prefill_ref import check_pattern

_CPU_FLASH: Any = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked attention of q [1, H, n, D] over k, v [1, H, L, D]: (out [H, n, D] fp32, lse [H, n] fp32)."""
    if _CPU_FLASH is not None and q.device.type == "cpu":
        out, lse = _CPU_FLASH(q, k, v, scale=scale)
        return out[0].float(), lse[0].float()
    scores = (q[0].float() @ k[0].float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v[0].float(), lse


def _slots(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """key [1, H, S, D] at the ascending slots `idx`: a view when they are one contiguous run."""
    lo, hi = int(idx[0]), int(idx[-1])
    if hi - lo + 1 == idx.numel():
        return key[:, :, lo: hi + 1]
    return key.index_select(2, idx)


def _unit(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, sel: torch.Tensor,
          heads: slice, kv: slice, r0: int, n: int, first: int, scale: float) -> None:
    """One block of rows r0 .. r0 + n - 1 for query heads `heads` (reading KV heads `kv`), whose selection
    row over slots 0 .. first + n - 1 is `sel`; writes out[heads, r0: r0 + n]. Tensors are one batch row."""
    Hk, D = kv.stop - kv.start, query.shape[-1]
    qs = query[None, heads, r0: r0 + n].reshape(1, Hk, -1, D)  # [1, H_k, G * n, D]: a KV head's queries stacked
    past = sel[: first + 1].nonzero().squeeze(-1)  # non-empty: the first row's own slot is selected
    o, lse = _attend_with_lse(qs, _slots(key[None, kv], past), _slots(value[None, kv], past), scale)
    diag = sel[first + 1:].nonzero().squeeze(-1) + (first + 1)
    if diag.numel():
        kd = key[kv].index_select(1, diag).float()  # [H_k, nd, D]
        vd = value[kv].index_select(1, diag).float()
        scores = (qs[0].float() @ kd.transpose(-1, -2)) * scale  # [H_k, G * n, nd]
        rows = first + torch.arange(n, device=sel.device)
        seen = (diag[None, :] <= rows[:, None]).repeat(qs.shape[2] // n, 1)  # [G * n, nd], row-major like qs
        scores.masked_fill_(~seen, float("-inf"))
        top = torch.maximum(lse, scores.amax(-1))  # lse is finite: every row sees its past
        w_past = torch.exp(lse - top)
        p = torch.exp(scores - top[..., None])
        o = (o * w_past[..., None] + p @ vd) / (w_past + p.sum(-1))[..., None]
    out[heads, r0: r0 + n] = o.reshape(-1, n, D).to(out.dtype)


def sparse_prefill_torch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selected: torch.Tensor,
                         block: int, scale: float) -> tuple[torch.Tensor, int]:
    """(out [B, H_q, q, D] in the query's dtype, computed pairs over the batch)."""
    check_pattern(query, key, selected, block)
    B, Hq, q, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g, offset = Hq // Hkv, S - q
    out = query.new_empty(B, Hq, q, D)
    shared = selected.shape[0] == 1
    slots = torch.arange(S, device=query.device)
    computed = 0
    for i, r0 in enumerate(range(0, q, block)):
        n = min(block, q - r0)
        first = offset + r0  # the block's first row's slot: slots up to it are seen by every row
        sel = selected[:, i, : first + n]  # nothing after the block's last row is read
        seen_by = (first + n - slots[: first + n]).clamp(max=n)  # rows of the block that see each slot
        computed += int((sel * seen_by).sum()) * (Hq if shared else 1) * B
        units: list[tuple[slice, slice, torch.Tensor]] = []
        if shared:
            units.append((slice(0, Hq), slice(0, Hkv), sel[0]))
        else:
            for h in range(Hkv):
                rows = sel[h * g: (h + 1) * g]
                if bool((rows == rows[:1]).all()):
                    units.append((slice(h * g, (h + 1) * g), slice(h, h + 1), rows[0]))
                else:
                    units.extend((slice(j, j + 1), slice(h, h + 1), sel[j]) for j in range(h * g, (h + 1) * g))
        for b in range(B):
            for heads, kv, row in units:
                _unit(out[b], query[b], key[b], value[b], row, heads, kv, r0, n, first, scale)
    return out, computed
