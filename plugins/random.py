"""`random`: keeps a seeded random subset. The floor any scorer must beat."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Observation, ScorePolicy, hookimpl


def _an_int(_inst: object, attr: attrs.Attribute, value: object) -> None:
    """attrs validator: any int, but not a bool (True is an int to Python, never a seed here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{attr.name}={value!r}: must be an int (True/False are not seeds)")


@attrs.define(frozen=True, kw_only=True)
class Random(ScorePolicy):
    """Uniformly random scores, a fresh draw per (seed, layer, cache length), so runs repeat exactly.
    Every batch row gets the same draw, so a row keeps what it keeps alone (the batch law).

    Parameters: `seed` (0).

    Per prefill chunk: a fresh seeded draw over the cache after each chunk
    """

    name: ClassVar[str] = "random"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "seeded random subset (floor)"

    seed: int = attrs.field(default=0, validator=_an_int)

    def score(self, obs: Observation) -> torch.Tensor:
        B, H, T = obs.positions.shape
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + obs.layer_idx * 10_007 + T)
        return torch.rand((1, H, T), generator=gen).to(obs.keys.device).expand(B, H, T)


@hookimpl
def evictkit_register_policies(register):
    register(Random)
