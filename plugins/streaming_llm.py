"""`streaming_llm`: attention sinks plus a sliding window of the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453; reference implementation mit-han-lab/streaming-llm
(`streaming_llm/kv_cache.py`, `streaming_llm/pos_shift/modify_llama.py`).

Keeps the `sinks` oldest entries and the `budget - sinks` most recent ones, identical for every
layer and head, after every forward once the cache exceeds its budget (prefill and decode), as
the reference's per-token mode (`eval_long_ppl.py`) does.

Defaults: sinks=4 (the paper's), positions="absolute".

Padded batches (evictkit.padded): the sinks count from each head's first real slot, so a row
keeps what it keeps alone; positions="shift" refuses padded batches (the core does).

positions:
- "absolute" (default): keys stay at their true (post-RoPE) positions and new tokens get their
  true positions, as in KVCache-Factory and kvpress. Not the paper's setting.
- "shift": the paper's pos-shift. Every cached key sits at its cache index 0..T-1 and the new
  token at index T (the cache length). The reference caches pre-RoPE keys and re-rotates the
  whole cache at every forward; evictkit keeps post-RoPE keys and rotates each kept key by
  (new slot - old slot) right after an eviction (exact for RoPE up to one rounding per move;
  see evictkit.positions).

Deviations: the multi-turn `evict_for_space` mode (evict before a prompt for the tokens to come)
is not implemented; with slack > 0 eviction runs every `slack + 1` steps instead of every step.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, Policy, hookimpl
from evictkit.helpers import POSITION_MODES, int_at_least


@attrs.define(frozen=True, kw_only=True)
class StreamingLLM(Policy):
    """Sinks + recent window. Parameters: `sinks` (4, >= 0), `positions` ("absolute" | "shift").

    Per prefill chunk: sinks + the newest entries after each chunk: the same kept set as one
    shot
    """

    name: ClassVar[str] = "streaming_llm"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    summary: ClassVar[str] = "attention sinks + recent window (positional)"

    sinks: int = attrs.field(default=4, validator=int_at_least(0))  # refuses True/False too
    positions: str = attrs.field(default="absolute", validator=attrs.validators.in_(POSITION_MODES))

    def needs(self) -> Needs:
        return Needs(positions=self.positions, padding=True)

    def protected(self) -> tuple[int, int]:
        return (self.sinks, 0)

    def select(self, obs: Observation, budget: int) -> torch.Tensor:
        """[B, H_kv, min(budget, T)]: each head's first `sinks` real slots and its newest ones."""
        B, H, T = obs.positions.shape
        device = obs.keys.device
        if budget >= T:
            return torch.arange(T, device=device).expand(B, H, T)
        recent = budget - self.sinks
        tail = torch.arange(T - recent, T, device=device)
        if obs.valid is None:
            idx = torch.cat([torch.arange(self.sinks, device=device), tail])
            return idx.expand(B, H, budget)
        # A head with more real entries than the budget (any that evicts) has its first real slot
        # at most T - budget, so its sinks end before the recent window. The clamp only keeps
        # the (unused) selection of a head with fewer real entries strictly increasing.
        first = (~obs.valid).sum(-1).clamp(max=T - budget)  # [B, H]
        sinks = first[..., None] + torch.arange(self.sinks, device=device)
        return torch.cat([sinks, tail.expand(B, H, recent)], dim=-1)


@hookimpl
def evictkit_register_policies(register):
    register(StreamingLLM)
