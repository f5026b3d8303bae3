"""streaming_llm on a left-padded layer: sinks count from each head's first real slot."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from evictkit.observation import Observation
from evictkit.plugins.streaming_llm import StreamingLLM


def _obs(pad: torch.Tensor, T: int) -> Observation:
    """A prefill Observation of T slots whose first pad[b, h] are padding (position -1)."""
    B, H = pad.shape
    slots = torch.arange(T)
    valid = slots >= pad[..., None]
    positions = (slots - pad[..., None]).masked_fill(~valid, -1)
    keys = torch.randn(B, H, T, 4)
    return Observation(
        module=SimpleNamespace(head_dim=4, config=SimpleNamespace()), layer_idx=0, n_layers=1, phase="prefill",
        keys=keys, values=keys, positions=positions, state={}, scratch={}, hidden_states=torch.zeros(B, T, 4),
        position_embeddings=(None, None), query_positions=torch.arange(T).expand(B, T), window=0, valid=valid,
    )


def test_sinks_are_each_heads_first_real_slots():
    # T = 12, budget 5 = 2 sinks + 3 recent; head pads 0, 3 and 7 (5 real entries: exactly the budget)
    kept = StreamingLLM(sinks=2).select(_obs(torch.tensor([[0, 3], [7, 0]]), 12), 5)
    assert kept.tolist() == [[[0, 1, 9, 10, 11], [3, 4, 9, 10, 11]],
                             [[7, 8, 9, 10, 11], [0, 1, 9, 10, 11]]]


def test_a_head_with_fewer_entries_than_the_budget_still_gets_increasing_slots():
    # its selection is not used (it does not evict) but must pass the core's index check
    kept = StreamingLLM(sinks=2).select(_obs(torch.tensor([[10]]), 12), 5)
    assert kept.tolist() == [[[7, 8, 9, 10, 11]]]
