"""`random`: keeps a seeded random subset. The floor any scorer must beat."""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl


def _an_int(_inst: object, attr: attrs.Attribute, value: object) -> None:
    """attrs validator: any int, but not a bool (True is an int to Python, never a seed here)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{attr.name}={value!r}: must be an int (True/False are not seeds)")


@attrs.define(frozen=True, kw_only=True)
class Random(ScorePolicy):
    """Uniformly random scores, a fresh draw per (seed, layer, cache length), so runs repeat exactly.
    Every batch row gets the same draw, so a row keeps what it keeps alone (the batch law).
    Padded batches: a head's real entries get the draw of its own length (its real entries, the
    cache length alone), placed on its real slots; padding scores 0 and is never kept.

    Parameters: `seed` (0).

    Per prefill chunk: a fresh seeded draw over the cache after each chunk
    """

    name: ClassVar[str] = "random"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "seeded random subset (floor)"

    seed: int = attrs.field(default=0, validator=_an_int)

    def needs(self) -> Needs:
        return Needs(padding=True)

    def _draw(self, layer_idx: int, length: int, H: int) -> torch.Tensor:
        """[1, H, length]: the draw for a cache of `length` entries (generated on the CPU, so the
        numbers are the same on every device)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_idx * 10_007 + length)
        return torch.rand((1, H, length), generator=gen)

    def score(self, obs: Observation) -> torch.Tensor:
        B, H, T = obs.positions.shape
        device = obs.keys.device
        if obs.valid is None:
            return self._draw(obs.layer_idx, T, H).to(device).expand(B, H, T)
        # The draw is tied to the length, so each head draws for its own real length, as alone;
        # one draw per distinct length (a handful in a batch), not one per row.
        lengths = obs.valid.sum(-1)  # [B, H]
        scores = torch.zeros(B, H, T, device=device)
        slot = torch.arange(T, device=device)
        for n in lengths.unique().tolist():
            if n == 0:
                continue
            draw = torch.zeros(1, H, T)
            draw[..., T - n:] = self._draw(obs.layer_idx, n, H)  # the real slots are the last n
            scores = torch.where((lengths == n)[..., None] & (slot >= T - n), draw.to(device), scores)
        return scores


@hookimpl
def evictkit_register_policies(register):
    register(Random)
