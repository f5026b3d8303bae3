"""`a_shape` and `tri_shape`: attention sinks plus a local window, for prefill (MInference's static patterns).

Paper: Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic
Sparse Attention", NeurIPS 2024 (arXiv:2407.02490), which takes A-shape from StreamingLLM (Xiao et
al., ICLR 2024) and adds tri-shape; reference code: microsoft/MInference
(`minference/modules/minference_forward.py`, `a_shape` / `tri_shape`).

A-shape: query row r sees slot s iff s <= r and (s < n_init or r - s < n_local). Tri-shape: the
same, except the last n_last queries, which see every causal slot.

Defaults (MInference's): n_init 128, n_local 3968, n_last 100; query blocks of 64 rows.

Deviations: the pattern is computed per query block of `block` rows at slot granularity: a block
computes the union of its rows' windows (a row sees up to block - 1 slots more than its own
window), and tri-shape's dense rows are rounded out to whole blocks; MInference's kernel rounds
both to 64 x 64 tiles. In a chunked prefill, windows and sinks are laid out in cache slots.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import PatternAttention, hookimpl
from evictkit.helpers import int_at_least
from evictkit.plugins._prefill_patterns import last_rows, sinks_and_window


@attrs.frozen(kw_only=True)
class AShape(PatternAttention):
    """Sinks plus a local window for every query."""

    name: ClassVar[str] = "a_shape"
    summary: ClassVar[str] = "sinks + local window (MInference A-shape, static)"

    n_init: int = attrs.field(default=128, validator=int_at_least(0))
    n_local: int = attrs.field(default=3968, validator=int_at_least(1))
    block: int = attrs.field(default=64, validator=int_at_least(1))

    def pattern(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
        q, S = query.shape[2], key.shape[2]
        return sinks_and_window(q, S, self.block, self.n_init, self.n_local, query.device), self.block


@attrs.frozen(kw_only=True)
class TriShape(AShape):
    """A-shape, and the last n_last queries dense (they hold the observation window policies score with)."""

    name: ClassVar[str] = "tri_shape"
    summary: ClassVar[str] = "sinks + local window, last queries dense (MInference tri-shape, static)"

    n_last: int = attrs.field(default=100, validator=int_at_least(0))

    def pattern(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
        q, S = query.shape[2], key.shape[2]
        shape = sinks_and_window(q, S, self.block, self.n_init, self.n_local, query.device)
        return shape | last_rows(q, S, self.block, self.n_last, query.device), self.block


@hookimpl
def evictkit_register_prefill_attention(register):
    register(AShape)
    register(TriShape)
