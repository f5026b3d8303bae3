"""`knorm`: keep the keys with the smallest L2 norm.

Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024, arXiv 2406.11430; reference implementation NVIDIA/kvpress 0.5.5
(`kvpress/presses/knorm_press.py`, `KnormPress`).

Score of a cached entry = minus the L2 norm of its (post-RoPE) key, per KV head, computed in
fp32 whatever the cache dtype (kvpress 0.5.5 does the same; its git main took the norm in the
key dtype, which ties about three quarters of the scores in bf16). Keys and values only: no
queries, no attention, no GQA reduction. The shared selection keeps the `budget` highest scores,
i.e. the smallest norms.

Defaults: sinks=0, window=0 (kvpress protects nothing). Prefill only, as the reference; with
`evictkit.compress(..., phase="both")` it also scores at decode (give it `window >= 1` there, so
the newest token survives).

The name is `knorm` (kvpress's) because `key_norm` is the example third-party policy of
docs/writing-a-policy.md, which is the same method: the example shows how a package ships one.

Deviations from the reference: kept entries stay in position order (kvpress keeps top-k order);
exact ties go to the more recent key (kvpress leaves them to `torch.topk`). Kept sets equal
kvpress 0.5.5's on SmolLM2 (docs/benchmarks.md, suite 4).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import int_at_least


def key_norm_scores(keys: torch.Tensor) -> torch.Tensor:
    """Minus the L2 norm of every key, in fp32: [B, H_kv, T, D] -> [B, H_kv, T]."""
    return -torch.linalg.vector_norm(keys, dim=-1, dtype=torch.promote_types(keys.dtype, torch.float32)).float()


@attrs.define(frozen=True, kw_only=True)
class KNorm(ScorePolicy):
    """Smallest key norms are kept. Parameters: `sinks` (0) and `window` (0), always kept.

    Per prefill chunk: scores every cached key again after each chunk (a key's score never changes)
    """

    name: ClassVar[str] = "knorm"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "keys with the smallest L2 norm (KnormPress; keys only)"

    sinks: int = attrs.field(default=0, validator=int_at_least(0))
    window: int = attrs.field(default=0, validator=int_at_least(0))

    def needs(self) -> Needs:
        return Needs(padding=True)  # a key's score is its own; select_topk skips padding

    def protected(self) -> tuple[int, int]:
        return (self.sinks, self.window)

    def score(self, obs: Observation) -> torch.Tensor:
        return key_norm_scores(obs.keys)


@hookimpl
def evictkit_register_policies(register):
    register(KNorm)
