"""`key_norm`: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
EMNLP 2024, arXiv 2406.11430: keys with a low L2 norm tend to receive high attention, so the
cache keeps them. Reference implementation: NVIDIA/kvpress `kvpress/presses/knorm_press.py`
(KnormPress, score = -||k||_2).

Score: minus the L2 norm of each cached key, per KV head, computed in fp32 (in bf16 most norms
tie). Evicts once, at the end of prefill, like KnormPress.

Defaults: sinks=0, window=0 (the reference protects nothing).
Deviations from the reference:
- the budget is evictkit's entries per KV head (kvpress takes a compression ratio);
- kept indices are sorted and ties go to the more recent key (evictkit's shared selection;
  kvpress uses torch.topk, whose order among ties is unspecified);
- optional `sinks` / `window` protect the oldest / newest entries (off by default).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

import evictkit
from evictkit.helpers import int_at_least


@attrs.define(frozen=True, kw_only=True)
class KeyNorm(evictkit.ScorePolicy):
    """Keeps the smallest-norm keys. Parameters: `sinks` (0), `window` (0), both ints >= 0."""

    name: ClassVar[str] = "key_norm"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "keys with the smallest L2 norm (KnormPress)"

    sinks: int = attrs.field(default=0, validator=int_at_least(0))
    window: int = attrs.field(default=0, validator=int_at_least(0))

    def needs(self) -> evictkit.Needs:
        # a key's score is its own, and the shared selection skips padding: a left-padded batch
        # can be stepped as one (the kit's padding law checks it)
        return evictkit.Needs(padding=True)

    def protected(self) -> tuple[int, int]:
        return (self.sinks, self.window)

    def score(self, obs: evictkit.Observation) -> torch.Tensor:
        """[B, H_kv, T]: higher = keep, so the smallest norm scores highest."""
        return -obs.keys.float().norm(dim=-1)


@evictkit.hookimpl
def evictkit_register_policies(register):
    register(KeyNorm)
