"""A compress block's options, checked once: every bad value is refused before a hook goes on.

`Options.check` validates what `evictkit.compress` takes (the policy, budget, phase, slack,
prefill_chunk and ragged_layout) and resolves what they imply for the per-layer step: the
phases the policy evicts in, its declared `Needs`, and, in StreamingLLM's "shift" position mode,
the RoPE frequencies kept keys are re-rotated with.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from evictkit.budget import check_budget
from evictkit.contract import PHASES, Needs, Policy, declared
from evictkit.hf import sliding_layers
from evictkit.positions import check_position_mode, rope_inv_freq
from evictkit.ragged_cache import RAGGED_LAYOUTS
from evictkit.step import StepConfig

PHASE_CHOICES = ("prefill", "decode", "both")


@attrs.frozen
class Options:
    """What a compress block was asked for, checked (see `Options.check`)."""

    policy: Policy
    budget: int | float
    phases: tuple[str, ...]
    slack: int
    prefill_chunk: int | None
    ragged_layout: str
    needs: Needs  # declared(policy): needs(), with a legacy subclass's old declarations folded in
    inv_freq: torch.Tensor | None  # set in "shift" mode: kept keys are re-rotated to their cache slots

    @classmethod
    def check(cls, model: nn.Module, policy: Policy, budget: int | float, *, phase: str | None, slack: int,
              prefill_chunk: int | None, ragged_layout: str, release_memory: bool = True) -> Options:
        """Raise ValueError naming the first bad option and its valid range; else the checked options."""
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be an evictkit.Policy or a registered name, got {type(policy).__name__}")
        if ragged_layout not in RAGGED_LAYOUTS:
            raise ValueError(f"ragged_layout={ragged_layout!r}: must be one of {', '.join(RAGGED_LAYOUTS)} (how "
                             "layers whose KV heads keep different counts are stored)")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk={prefill_chunk!r}: must be None (no chunking) or an int >= 1 "
                             "(tokens per prefill forward)")
        if not isinstance(release_memory, bool):
            raise ValueError(f"release_memory={release_memory!r}: must be True (hand freed heap memory back to the "
                             "OS after prefill forwards) or False")
        budget = check_budget(budget)
        if isinstance(budget, int):
            policy.check_budget(budget)
        if phase is None or (phase in PHASE_CHOICES and not policy.phases):
            # a policy that never evicts (full) keeps no phase, whatever `phase` asks: a grid that
            # sets phase="both" for every policy keeps its full-cache reference
            phases = tuple(policy.phases)
        elif phase in PHASE_CHOICES:
            phases = PHASES if phase == "both" else (phase,)
        else:
            raise ValueError(
                f"phase={phase!r}: must be one of {', '.join(PHASE_CHOICES)} (or None for the policy's own)")
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(
                f"slack={slack!r}: must be an int >= 0 (extra entries allowed before a decode-time eviction)")
        needs = declared(policy)
        check_position_mode(needs.positions, f"policy {policy.name!r}: needs().positions")
        inv_freq = None
        if needs.positions == "shift":
            if sliding_layers(model):
                raise ValueError("positions='shift' is not supported on models with sliding-window layers")
            inv_freq = rope_inv_freq(model)
        return cls(policy=policy, budget=budget, phases=phases, slack=slack, prefill_chunk=prefill_chunk,
                   ragged_layout=ragged_layout, needs=needs, inv_freq=inv_freq)

    def step_config(self) -> StepConfig:
        return StepConfig(policy=self.policy, needs=self.needs, phases=self.phases, slack=self.slack,
                          inv_freq=self.inv_freq)


__all__ = ["PHASE_CHOICES", "Options"]
