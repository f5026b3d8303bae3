"""streaming_llm on a left-padded layer: sinks count from each head's first real slot."""

from __future__ import annotations

import torch
from generation import padded_observation

from evictkit.plugins.streaming_llm import StreamingLLM


def test_sinks_are_each_heads_first_real_slots():
    # T = 12, budget 5 = 2 sinks + 3 recent; head pads 0, 3 and 7 (5 real entries: exactly the budget)
    kept = StreamingLLM(sinks=2).select(padded_observation(torch.tensor([[0, 3], [7, 0]]), 12), 5)
    assert kept.tolist() == [[[0, 1, 9, 10, 11], [3, 4, 9, 10, 11]],
                             [[7, 8, 9, 10, 11], [0, 1, 9, 10, 11]]]


def test_a_head_with_fewer_entries_than_the_budget_still_gets_increasing_slots():
    # its selection is not used (it does not evict) but must pass the core's index check
    kept = StreamingLLM(sinks=2).select(padded_observation(torch.tensor([[10]]), 12), 5)
    assert kept.tolist() == [[[7, 8, 9, 10, 11]]]
