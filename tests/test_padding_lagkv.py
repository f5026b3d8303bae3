"""lagkv on a left-padded batch: sinks and partitions count from each head's first real slot."""

from __future__ import annotations

import pytest
import torch

from evictkit.plugins.lagkv import lagkv_scores


def _valid(pad: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T) >= pad[..., None]


def test_hand_worked_sinks_and_ramp_from_the_first_real_slot():
    # 3 padding slots, then 4 real entries: with sinks=1, lag=2 a head of 4 has no scored
    # partition (4 < 1 + 2 * 2), so the sink scores 1 and the rest the ramp 0, 1/3, 2/3
    keys = torch.randn(1, 1, 7, 4)
    s = lagkv_scores(keys, keys.clone(), sinks=1, lag=2, cross_scoring=False, valid=_valid(torch.tensor([[3]]), 7))
    torch.testing.assert_close(s[0, 0], torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1 / 3, 2 / 3]))


@pytest.mark.parametrize("cross_scoring", [False, True])
@pytest.mark.parametrize("sinks,lag", [(0, 3), (2, 4), (4, 1)])
def test_each_head_scores_as_it_does_alone(sinks, lag, cross_scoring):
    g = torch.Generator().manual_seed(sinks + lag)
    T = 41
    keys, values = 30 * torch.randn(3, 2, T, 6, generator=g), torch.randn(3, 2, T, 6, generator=g)
    pad = torch.tensor([[0, 5], [13, 22], [35, 40]])  # long, middling and too-short heads
    s = lagkv_scores(keys, values, sinks, lag, cross_scoring, _valid(pad, T))
    for b in range(3):
        for h in range(2):
            p = int(pad[b, h])
            alone = lagkv_scores(keys[b : b + 1, h : h + 1, p:], values[b : b + 1, h : h + 1, p:], sinks, lag,
                                 cross_scoring)
            assert torch.equal(s[b, h, p:], alone[0, 0]), (b, h)
            assert bool((s[b, h, :p] == 0).all())
