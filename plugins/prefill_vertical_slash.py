"""`vertical_slash`: MInference's dynamic vertical-slash pattern, estimated from the last queries.

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention", NeurIPS 2024 (arXiv:2407.02490); reference code: microsoft/MInference
(`minference/modules/minference_forward.py`, `vertical_and_slash_kernel`, and the index
conversion in `csrc/vertical_slash_index.cu`).

Per query head: A = softmax of the last `last_q` queries over every causal slot (fp32). Vertical
score of slot j = sum of A's column j; the first 30 slots are forced, and the top `vertical_size`
slots are kept (at least 30). Slash score of offset o = sum over rows r of A[r, r - o]; offsets
0..99 are forced (nearest first when slash_size < 100), and the top `slash_size` offsets are kept
(at least 50). A query block of rows [r0, r1] then computes the kept columns and, for each kept
offset o, the slot range [r0 - o, r1 - o] (MInference's kernel does the same per 64-row block).

Defaults (MInference's defaults for a head missing from its per-model config): vertical_size 1000,
slash_size 6096, last_q 64, query blocks of 64 rows. The sizes are absolute and tuned for 128K
prompts: below about 6K tokens the slash band covers the whole triangle (density 1).

Deviations: one pattern per head for every model (MInference reads tuned per-head sizes and
patterns from a per-model JSON; pass smaller sizes for short prompts); forced ties are broken by
nearness (torch.topk's tie order is unspecified); the last block is counted at slot granularity
(MInference's kernel rounds columns to its tiles). In a chunked prefill the estimate reads the
chunk's last queries over the retained cache, offsets counted in slots.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import PatternAttention, hookimpl
from evictkit.helpers import int_at_least
from evictkit.plugins._prefill_patterns import grouped_scores, row_slots

FORCED_COLUMNS = 30
FORCED_OFFSETS = 100
MIN_VERTICAL = 30
MIN_SLASH = 50


def _top(scores: torch.Tensor, forced: int, k: int) -> torch.Tensor:
    """[H, S] bool: the k best entries of `scores` [H, S] with the first `forced` ones always in
    (ranked by index among themselves: nearest first)."""
    S = scores.shape[-1]
    ranked = scores.clone()
    n = min(forced, S)
    above = ranked.max() + 1  # above every score, by small integers that stay exact in fp32
    ranked[:, :n] = above + torch.arange(n, 0, -1, dtype=ranked.dtype, device=ranked.device)
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, ranked.topk(min(k, S), dim=-1).indices, True)


@attrs.frozen(kw_only=True)
class VerticalSlash(PatternAttention):
    """Kept columns plus kept diagonals, per head, from the last queries' attention."""

    name: ClassVar[str] = "vertical_slash"
    summary: ClassVar[str] = "MInference vertical + slash lines estimated from the last queries (dynamic)"

    vertical_size: int = attrs.field(default=1000, validator=int_at_least(1))
    slash_size: int = attrs.field(default=6096, validator=int_at_least(1))
    last_q: int = attrs.field(default=64, validator=int_at_least(1))
    block: int = attrs.field(default=64, validator=int_at_least(1))

    def estimate(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns [H_q, S], offsets [H_q, S]) bool: the kept slots and the kept slot offsets r - j."""
        q, S = query.shape[2], key.shape[2]
        L = min(self.last_q, q)
        scores = grouped_scores(query[0, :, q - L:], key[0], scale)  # [H_q, L, S]
        row_slot = torch.arange(S - L, S, device=query.device)[:, None]  # [L, 1]
        offset = row_slot - torch.arange(S, device=query.device)[None, :]  # [L, S]: r - j
        attn = torch.softmax(scores.masked_fill(offset < 0, float("-inf")), dim=-1)
        vertical = attn.sum(1)  # [H_q, S]
        slash = torch.zeros_like(vertical).scatter_add_(
            -1, offset.clamp(min=0).flatten().expand(attn.shape[0], -1), attn.flatten(1))  # non-causal add 0
        columns = _top(vertical, FORCED_COLUMNS, max(self.vertical_size, MIN_VERTICAL))
        offsets = _top(slash, FORCED_OFFSETS, max(self.slash_size, MIN_SLASH))
        return columns, offsets

    def pattern(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
        q, S = query.shape[2], key.shape[2]
        columns, offsets = self.estimate(query, key, scale)
        first, last = row_slots(q, S, self.block, query.device)  # [nq]
        slots = torch.arange(S, device=query.device)
        # slot j is in some kept band [r0 - o, r1 - o] iff a kept offset lies in [r0 - j, r1 - j]:
        # count kept offsets in that range with a running count (no loop over offsets)
        hi = last[:, None] - slots[None, :]  # [nq, S]
        lo = first[:, None] - slots[None, :] - 1
        causal = hi >= 0
        hi, lo = hi.clamp(0, S - 1), lo.clamp(-1, S - 1)
        selected = torch.empty(offsets.shape[0], len(first), S, dtype=torch.bool, device=query.device)
        for h in range(offsets.shape[0]):  # one head at a time: [nq, S] index tensors, not [H_q, nq, S]
            running = torch.cat([offsets.new_zeros(1, dtype=torch.int32), offsets[h].cumsum(0, dtype=torch.int32)])
            in_band = running[hi + 1] > running[lo + 1]
            selected[h] = (in_band & causal) | columns[h][None, :]
        return selected, self.block


@hookimpl
def evictkit_register_prefill_attention(register):
    register(VerticalSlash)
