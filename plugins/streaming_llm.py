"""`streaming_llm`: attention sinks plus a sliding window of the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453; reference implementation mit-han-lab/streaming-llm (`kv_cache.py`).

Keeps the `sinks` oldest entries and the `budget - sinks` most recent ones, identical for every
layer and head, after every forward once the cache exceeds its budget (prefill and decode).

Defaults: sinks=4 (the paper's). Deviation: keys stay at their absolute (post-RoPE) positions,
as in KVCache-Factory and kvpress; the paper's re-rotation to cache positions is not built yet.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit.observation import Observation
from evictkit.policy import Policy
from evictkit.specs.hookspecs import hookimpl


@attrs.define(frozen=True, kw_only=True)
class StreamingLLM(Policy):
    name: ClassVar[str] = "streaming_llm"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    summary: ClassVar[str] = "attention sinks + recent window (positional)"

    sinks: int = attrs.field(default=4, validator=[attrs.validators.instance_of(int), attrs.validators.ge(0)])

    def protected(self) -> tuple[int, int]:
        return (self.sinks, 0)

    def select(self, obs: Observation, budget: int) -> torch.Tensor:
        B, H, T = obs.positions.shape
        device = obs.keys.device
        if budget >= T:
            return torch.arange(T, device=device).expand(B, H, T)
        recent = budget - self.sinks
        idx = torch.cat([torch.arange(self.sinks, device=device), torch.arange(T - recent, T, device=device)])
        return idx.expand(B, H, budget)


@hookimpl
def evictkit_register_policies(register):
    register(StreamingLLM)
