"""random on a left-padded layer: a head's real entries get the draw they get alone."""

from __future__ import annotations

import torch
from generation import padded_observation

from evictkit.plugins.random import Random


def test_each_heads_real_slots_score_as_alone():
    policy, T = Random(seed=3), 20
    pad = torch.tensor([[0, 0, 0], [5, 5, 5], [4, 9, 20]])  # heads of one row may differ (a ragged layer)
    scores = policy.score(padded_observation(pad, T, layer_idx=1, n_layers=2))
    for b in range(3):
        for h in range(3):
            n = T - int(pad[b, h])
            if n:
                alone = policy.score(padded_observation((1, 3), n, layer_idx=1, n_layers=2))
                assert torch.equal(scores[b, h, T - n:], alone[0, h]), (b, h)
    # and the draw does depend on the length: a padded head is not just a slice of the full draw
    assert not torch.equal(scores[1, 0, 5:], scores[0, 0, 5:])
