"""criticalkv on a left-padded batch: both stages skip padding, so each row keeps what it keeps alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from generation import assert_rows_as_alone
from models import tiny_model

from evictkit.observation import Observation
from evictkit.plugins.criticalkv import CriticalKV


def _obs(keys: torch.Tensor, values: torch.Tensor, weight: torch.Tensor,
         pad: torch.Tensor | None = None) -> Observation:
    """A prefill Observation of keys/values [B, H, T, D] whose first pad[b, h] slots are padding."""
    B, H, T, D = keys.shape
    slots = torch.arange(T)
    valid = None if pad is None else slots >= pad[..., None]
    positions = slots.expand(B, H, T) if pad is None else (slots - pad[..., None]).masked_fill(~valid, -1)
    module = SimpleNamespace(head_dim=D, config=SimpleNamespace(), o_proj=SimpleNamespace(weight=weight))
    return Observation(
        module=module, layer_idx=0, n_layers=1, phase="prefill", keys=keys, values=values, positions=positions,
        state={}, scratch={}, hidden_states=torch.zeros(B, T, weight.shape[0]), position_embeddings=(None, None),
        query_positions=torch.arange(T).expand(B, T), window=0, valid=valid,
    )


@pytest.mark.parametrize("ratio", [0.5, 0.0, 1.0])
def test_a_padded_row_keeps_what_it_keeps_alone(ratio):
    # knorm scores -|k|: the zero keys of the padding would top stage 1, and their huge values
    # would top stage 2, if either stage counted them
    g = torch.Generator().manual_seed(0)
    budget, T, D = 6, 30, 4
    lengths = torch.tensor([[30, 30], [22, 25], [9, 14]])  # real entries per (row, head)
    pad = T - lengths
    keys = torch.randn(3, 2, T, D, generator=g)
    values = torch.randn(3, 2, T, D, generator=g)
    junk = torch.arange(T) < pad[..., None]
    keys = keys.masked_fill(junk[..., None], 0.0)
    values = values.masked_fill(junk[..., None], 1e4)
    weight = torch.randn(8, 4 * D, generator=g)  # 4 query heads over 2 KV heads
    policy = CriticalKV(scorer="knorm", first_stage_ratio=ratio)
    kept = policy.select(_obs(keys, values, weight, pad), budget)
    assert bool((kept >= pad[..., None]).all())
    for b in range(3):
        for h in range(2):
            n = int(lengths[b, h])
            alone = _obs(keys[b:b + 1, :, T - n:], values[b:b + 1, :, T - n:], weight)
            assert (kept[b, h] - (T - n)).tolist() == policy.select(alone, budget)[0, h].tolist(), (b, h)


@pytest.mark.parametrize("scorer", ["expected_attention", "knorm"])  # expected_attention protects 4 sinks
def test_criticalkv_obeys_the_batch_law_in_generate(scorer):
    assert CriticalKV(scorer=scorer).needs().padding  # stepped as one batch (evictkit.padded)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (50, 37, 29)]
    assert_rows_as_alone(tiny_model(layers=2), prompts, "criticalkv", budget=16, scorer=scorer, prefill_chunk=16)
