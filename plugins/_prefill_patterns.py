"""Shared pieces of the built-in pattern prefill attentions (layout: kernels/sparse_prefill_ref.py).

Every function works on one batch row's shapes: q queries, the last q of S cache slots (offset
S - q), query blocks of `block` rows. Selections are bool [P, nq, S], P = 1 or H_q.
"""

from __future__ import annotations

import torch


def row_slots(q: int, S: int, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) slot of each query block's rows, int64 [nq]: rows i * block .. end, at slot S - q + row."""
    starts = torch.arange(0, q, block, device=device)
    return S - q + starts, S - q + torch.clamp(starts + block, max=q) - 1


def sinks_and_window(q: int, S: int, block: int, n_init: int, n_local: int, device: torch.device) -> torch.Tensor:
    """[1, nq, S]: the first n_init slots, and every slot within n_local of one of the block's rows
    (slot > row - n_local; the union over the block's rows, so the block's first rows see up to
    block - 1 slots more than their own window). The diagonal is always in it (n_local >= 1)."""
    first, last = row_slots(q, S, block, device)
    slots = torch.arange(S, device=device)
    return ((slots < n_init) | ((slots > first[:, None] - n_local) & (slots <= last[:, None])))[None]


def last_rows(q: int, S: int, block: int, n_last: int, device: torch.device) -> torch.Tensor:
    """[1, nq, S]: every slot for the query blocks holding one of the last n_last rows."""
    starts = torch.arange(0, q, block, device=device)
    dense = (torch.clamp(starts + block, max=q) > q - n_last)[:, None]  # a block ending after row q - n_last
    return dense.expand(-1, S)[None]


def key_blocks_to_slots(blocks: torch.Tensor, key_block: int, S: int) -> torch.Tensor:
    """[P, nq, nk] bool over key blocks of `key_block` slots -> [P, nq, S] over slots."""
    return blocks.repeat_interleave(key_block, dim=-1)[..., :S]


def diagonal_blocks(q: int, S: int, block: int, key_block: int, device: torch.device) -> torch.Tensor:
    """[1, nq, nk] bool: for each query block, the key blocks holding its rows' own slots."""
    first, last = row_slots(q, S, block, device)
    kb = torch.arange(-(-S // key_block), device=device)
    return ((kb[None] >= (first // key_block)[:, None]) & (kb[None] <= (last // key_block)[:, None]))[None]


def grouped_scores(queries: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """[H_q, n, S] fp32 scaled scores of queries [H_q, n, D] against key [H_kv, S, D] (GQA without
    expanding the keys: each KV head's query heads are stacked)."""
    Hq, n, D = queries.shape
    Hkv = key.shape[0]
    g = Hq // Hkv
    scores = queries.float().reshape(Hkv, g * n, D) @ key.float().transpose(-1, -2)
    return scores.view(Hq, n, -1) * scale
