"""Sparse prefill attention over a key-set pattern with PyTorch FlexAttention: the CUDA executor.

Layout and causal rule: `kernels/sparse_prefill_ref.py`. The pattern becomes a FlexAttention
`BlockMask` whose mask is token-exact ("slot s is selected for row r's query block, and
s <= offset + r"); `flex_attention` then skips every (query tile, key tile) with nothing selected
and masks the partial ones. On CUDA it runs compiled (torch.compile generates Triton kernels,
cached per shape), which is what makes it fast. Elsewhere it runs eagerly: FlexAttention's eager
path computes every pair and masks, so it is correct but saves nothing; the CPU executor is
`kernels/sparse_prefill_torch.py`, and the eager path is how the tests hold this one to the
reference on a machine without a GPU.

GQA goes through `enable_gqa` (K/V are never expanded). The pairs computed are counted from the
pattern itself (a prefix sum over each query block's selected slots), never from a [q, S] mask.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from evictkit.kernels.sparse_prefill_ref import check_pattern


@functools.cache
def _flex(compiled: bool) -> Any:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def computed_pairs(selected: torch.Tensor, q: int, S: int, block: int, heads: int) -> int:
    """Pairs (row, slot) the pattern computes over `heads` query heads: for row r of query block
    i, the selected slots <= S - q + r (a prefix sum over the slots, gathered at each row)."""
    counts = selected.long().cumsum(-1)  # [P, nq, S]
    rows = torch.arange(q, device=selected.device)
    per_row = counts[:, rows // block, S - q + rows]  # [P, q]
    total = int(per_row.sum())
    return total * (heads // selected.shape[0])


def _tile(block: int) -> int:
    """FlexAttention's tile: the pattern's block when it is a multiple of 16, else its default 128
    (the mask is token-exact either way; the tile only decides what can be skipped)."""
    return block if block % 16 == 0 else 128


def sparse_prefill_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, selected: torch.Tensor,
                        block: int, scale: float, *, compiled: bool | None = None) -> tuple[torch.Tensor, int]:
    """(out [B, H_q, q, D] in the query's dtype, computed pairs over the batch); one pattern for
    the batch (`PatternAttention.attend` calls it per row). compiled: None = on CUDA only."""
    from torch.nn.attention.flex_attention import create_block_mask

    check_pattern(query, key, selected, block)
    B, Hq, q, _ = query.shape
    S = key.shape[2]
    offset = S - q
    sel = selected.to(query.device)
    per_head = sel.shape[0] > 1

    def mask_mod(b: torch.Tensor, h: torch.Tensor, row: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        head = h if per_head else torch.zeros_like(h)
        return sel[head, row // block, slot] & (slot <= offset + row)

    tile = _tile(block)
    mask = create_block_mask(mask_mod, None, Hq if per_head else None, q, S, device=query.device,
                             BLOCK_SIZE=tile)
    use_compiled = query.is_cuda if compiled is None else compiled
    with warnings.catch_warnings():
        # eager FlexAttention warns that it computes densely: known and intended off CUDA (see above)
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        out = _flex(use_compiled)(query, key, value, block_mask=mask, scale=scale,
                                  enable_gqa=key.shape[1] != Hq)
    return out.to(query.dtype), computed_pairs(sel, q, S, block, Hq) * B


__all__ = ["computed_pairs", "sparse_prefill_flex"]
