"""random on a left-padded layer: a head's real entries get the draw they get alone."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from evictkit.observation import Observation
from evictkit.plugins.random import Random


def _obs(pad: torch.Tensor | None, B: int, H: int, T: int) -> Observation:
    """A prefill Observation of T slots whose first pad[b, h] are padding (None: none)."""
    slots = torch.arange(T)
    valid = None if pad is None else slots >= pad[..., None]
    positions = slots.expand(B, H, T) if pad is None else (slots - pad[..., None]).masked_fill(~valid, -1)
    keys = torch.randn(B, H, T, 4)
    return Observation(
        module=SimpleNamespace(head_dim=4, config=SimpleNamespace()), layer_idx=1, n_layers=2, phase="prefill",
        keys=keys, values=keys, positions=positions, state={}, scratch={}, hidden_states=torch.zeros(B, T, 4),
        position_embeddings=(None, None), query_positions=torch.arange(T).expand(B, T), window=0, valid=valid,
    )


def test_each_heads_real_slots_score_as_alone():
    policy, T = Random(seed=3), 20
    pad = torch.tensor([[0, 0, 0], [5, 5, 5], [4, 9, 20]])  # heads of one row may differ (a ragged layer)
    scores = policy.score(_obs(pad, 3, 3, T))
    for b in range(3):
        for h in range(3):
            n = T - int(pad[b, h])
            if n:
                alone = policy.score(_obs(None, 1, 3, n))
                assert torch.equal(scores[b, h, T - n:], alone[0, h]), (b, h)
    # and the draw does depend on the length: a padded head is not just a slice of the full draw
    assert not torch.equal(scores[1, 0, 5:], scores[0, 0, 5:])
