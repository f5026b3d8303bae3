"""`full`: no eviction. The reference every other policy is compared with.

Padded batches: nothing is evicted, so every real entry of every row stays (as alone).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, Policy, hookimpl


@attrs.define(frozen=True, kw_only=True)
class Full(Policy):
    """Keeps every entry: the full cache, whatever the budget.

    Per prefill chunk: keeps every entry
    """

    name: ClassVar[str] = "full"
    phases: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = "no eviction (reference)"

    def needs(self) -> Needs:
        return Needs(padding=True)

    def check_budget(self, budget: int) -> None:
        return None

    def select(self, obs: Observation, budget: int) -> torch.Tensor:
        B, H, T = obs.positions.shape
        return torch.arange(T, device=obs.keys.device).expand(B, H, T)


@hookimpl
def evictkit_register_policies(register):
    register(Full)
