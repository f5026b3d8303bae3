"""Sparse prefill attention over a key-set pattern: the layout, its checks, and the plain reference.

The layout (shared by `kernels/sparse_prefill*.py` and every pattern-based prefill attention):

- `query` [B, H_q, q, D] post-RoPE; `key`, `value` [B, H_kv, S, D] with H_q = H_kv * g (GQA: query
  head j reads KV head j // g). The q queries are the last q of the S cache slots: query row r sits
  at slot `offset + r` with `offset = S - q` (0 for a one-shot prefill, the entries already cached
  for a later chunk of a chunked prefill).
- `selected` [P, nq, S] bool, P = 1 (one pattern for every head) or P = H_q: key slot s is computed
  for every query of query block i (rows `i * block .. (i + 1) * block - 1`, the last block may be
  shorter), nq = ceil(q / block). A block computes the same key set for all its rows, as
  MInference's and FlexPrefill's kernels do: a method's token-level pattern is rounded up to it.
- A pair (row r, slot s) is *computed* when `selected[., r // block, s]` and s <= offset + r
  (causal). The diagonal slot s = offset + r must be selected for every row (no empty row).
- Density = computed pairs / causal pairs, causal pairs = H_q * sum_r (offset + r + 1) per batch row.

`sparse_prefill_ref` expands the pattern to a dense [q, S] mask per head and runs a textbook masked
softmax: it computes everything and is obviously right; it is what the skipping version is held to.
"""

from __future__ import annotations

import torch


def check_pattern(query: torch.Tensor, key: torch.Tensor, selected: torch.Tensor, block: int) -> None:
    """Raise ValueError unless `query`, `key` and `selected` fit the layout above."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be [B, H, T, D], got {tuple(query.shape)} and {tuple(key.shape)}")
    B, Hq, q, D = query.shape
    if key.shape[0] != B or key.shape[3] != D or Hq % key.shape[1]:
        raise ValueError(f"key {tuple(key.shape)} does not fit query {tuple(query.shape)} (GQA needs H_q % H_kv == 0)")
    S = key.shape[2]
    if S < q:
        raise ValueError(f"key has {S} slots, fewer than the q = {q} queries")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block={block!r}: must be an int >= 1 (query rows per block)")
    nq = -(-q // block)
    if selected.dtype != torch.bool or selected.dim() != 3 or selected.shape[0] not in (1, Hq) \
            or selected.shape[1:] != (nq, S):
        raise ValueError(f"selected must be bool [1 or {Hq}, {nq}, {S}], got {selected.dtype} {tuple(selected.shape)}")


def causal_pairs(q: int, S: int, heads: int) -> int:
    """Causal (query, key) pairs of `heads` heads: row r of q sees S - q + r + 1 slots."""
    offset = S - q
    return heads * (q * offset + q * (q + 1) // 2)


def token_mask(selected: torch.Tensor, q: int, block: int) -> torch.Tensor:
    """[P, q, S] bool: the pattern's computed pairs (selection expanded to rows, and causal)."""
    S = selected.shape[-1]
    rows = selected.repeat_interleave(block, dim=1)[:, :q]  # [P, q, S]
    slots = torch.arange(S, device=selected.device)
    causal = slots[None, :] <= slots[S - q:, None]
    return rows & causal


def sparse_prefill_ref(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selected: torch.Tensor,
                       block: int, scale: float) -> tuple[torch.Tensor, int]:
    """(out [B, H_q, q, D] in the query's dtype, computed pairs over the batch): masked dense attention."""
    check_pattern(query, key, selected, block)
    B, Hq, q, D = query.shape
    g = Hq // key.shape[1]
    mask = token_mask(selected, q, block).expand(Hq, -1, -1)  # [H_q, q, S]
    k = key.repeat_interleave(g, dim=1).float()
    v = value.repeat_interleave(g, dim=1).float()
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.to(query.dtype), int(mask.sum()) * B
