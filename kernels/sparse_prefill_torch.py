"""Sparse prefill attention in torch for the CPU: only the selected key slots are read and computed.

Layout and causal rule: `kernels/sparse_prefill_ref.py`. Per batch row and per chunk of query
blocks, each (head, query block) gathers its selected slots' keys and values from its KV head
(K/V are never expanded to H_q), pads the lists to the chunk's longest with masked slots, and runs
one batched softmax attention over them in fp32. Work is proportional to the selected slots, not
to S: a block's key list is built with a cumulative sum over its selection row (O(S) bytes, no
floating-point work), the scores and the weighted sum cost O(block * selected * D).

The chunk bounds the gathered tensor (`max_elements` floats of scores); the padding to the chunk's
longest list is the only work done beyond the pattern, and it is masked (not counted as computed).
"""

from __future__ import annotations

import torch

from evictkit.kernels.sparse_prefill_ref import check_pattern

#: scores per chunk ([heads, blocks, block, slots] floats): about 64 MiB in fp32
MAX_ELEMENTS = 1 << 24


def _lists(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sel [P, C, S] bool -> (idx [P, C, L] int64 selected slots ascending, padded with 0;
    valid [P, C, L] bool), L the longest list."""
    counts = sel.sum(-1)  # [P, C]
    L = max(int(counts.max()), 1)
    pos = torch.where(sel, sel.cumsum(-1, dtype=torch.int64) - 1, L)  # unselected slots -> a spill column
    idx = torch.zeros(*sel.shape[:2], L + 1, dtype=torch.int64, device=sel.device)
    idx.scatter_(-1, pos, torch.arange(sel.shape[-1], device=sel.device).expand_as(pos))
    valid = torch.arange(L, device=sel.device) < counts[..., None]
    return idx[..., :L].masked_fill(~valid, 0), valid


def sparse_prefill_torch(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selected: torch.Tensor,
                         block: int, scale: float, *, max_elements: int = MAX_ELEMENTS) -> tuple[torch.Tensor, int]:
    """(out [B, H_q, q, D] in the query's dtype, computed pairs over the batch)."""
    check_pattern(query, key, selected, block)
    B, Hq, q, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    g, offset, nq = Hq // Hkv, S - q, -(-q // block)
    out = query.new_empty(B, Hq, q, D)
    kv_head = (torch.arange(Hq, device=query.device) // g)[:, None, None]  # [H_q, 1, 1]
    sel = selected.expand(Hq, -1, -1)
    counts = sel.sum(-1)  # [H_q, nq]: plan the chunks from the list lengths
    computed = 0
    start = 0
    while start < nq:
        # as many query blocks as keep the scores under max_elements (at least one)
        end = start + 1
        longest = int(counts[:, start].max())
        while end < nq:
            longest_next = max(longest, int(counts[:, end].max()))
            if Hq * (end + 1 - start) * block * longest_next > max_elements:
                break
            longest, end = longest_next, end + 1
        idx, valid = _lists(sel[:, start:end])  # [H_q, C, L]
        C = end - start
        r0, r1 = start * block, min(end * block, q)
        rows = torch.arange(r0, r0 + C * block, device=query.device).view(C, block)  # chunk rows, padded
        # slot <= offset + row, the list's padding masked, rows past q masked
        keep = valid[:, :, None, :] & (idx[:, :, None, :] <= offset + rows[None, :, :, None]) \
            & (rows < q)[None, :, :, None]  # [H_q, C, block, L]
        computed += int(keep.sum()) * B
        for b in range(B):
            qb = query[b, :, r0:r1].float()
            if r1 - r0 < C * block:
                qb = torch.nn.functional.pad(qb, (0, 0, 0, C * block - (r1 - r0)))
            qb = qb.view(Hq, C, block, D)
            k_sel = key[b][kv_head, idx].float()  # [H_q, C, L, D]
            v_sel = value[b][kv_head, idx].float()
            scores = (qb @ k_sel.transpose(-1, -2)) * scale
            scores = scores.masked_fill(~keep, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # padded rows have no key
            res = (probs @ v_sel).view(Hq, C * block, D)[:, : r1 - r0]
            out[b, :, r0:r1] = res.to(query.dtype)
        start = end
    return out, computed
