"""keydiff on a left-padded batch: each row keeps what it keeps alone, junk padding keys included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from generation import assert_rows_as_alone

from evictkit.observation import Observation
from evictkit.plugins.keydiff import KeyDiff
from evictkit.specs.tiny import tiny_model


def _obs(keys: torch.Tensor, pad: torch.Tensor | None = None) -> Observation:
    """A prefill Observation of keys [B, H, T, D] whose first pad[b, h] slots are padding (None: none)."""
    B, H, T, D = keys.shape
    slots = torch.arange(T)
    valid = None if pad is None else slots >= pad[..., None]
    positions = slots.expand(B, H, T) if pad is None else (slots - pad[..., None]).masked_fill(~valid, -1)
    return Observation(
        module=SimpleNamespace(head_dim=D, config=SimpleNamespace()), layer_idx=0, n_layers=1, phase="prefill",
        keys=keys, values=torch.randn_like(keys), positions=positions, state={}, scratch={},
        hidden_states=torch.zeros(B, T, 4), position_embeddings=(None, None),
        query_positions=torch.arange(T).expand(B, T), window=0, valid=valid,
    )


@pytest.mark.parametrize("policy", [KeyDiff(), KeyDiff(sinks=2, window=3), KeyDiff(block=5),
                                    KeyDiff(block=4, sinks=1, window=2)], ids=repr)
def test_a_padded_row_keeps_what_it_keeps_alone(policy):
    g = torch.Generator().manual_seed(0)
    budget, T, D = 8, 37, 6
    lengths = torch.tensor([[37, 37], [29, 33], [20, 17], [6, 6]])  # real entries per (row, head)
    keys = 50 * torch.randn(4, 2, T, D, generator=g)  # the padding slots' keys are big junk
    kept = policy.select(_obs(keys, T - lengths), budget)
    assert kept.shape == (4, 2, budget) and bool((kept[..., 1:] > kept[..., :-1]).all())
    for b in range(3):  # the last row holds fewer entries than the budget: it does not evict
        for h in range(2):
            n = int(lengths[b, h])
            alone = policy.select(_obs(keys[b : b + 1, h : h + 1, T - n :]), budget)
            assert (kept[b, h] - (T - n)).tolist() == alone[0, 0].tolist(), (b, h)


def test_the_mean_key_is_over_real_keys_only():
    # alone the anchor of +x, +x, +y leans to x, so +y is kept; padding of many -x keys would
    # flip the anchor toward -x if it counted (then a +x key would be the most distinctive)
    real = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    keys = torch.cat([torch.tensor([[-1.0, 0.0]] * 5), real])[None, None]
    assert KeyDiff().select(_obs(keys, torch.tensor([[5]])), 1).tolist() == [[[7]]]


def test_block_mode_obeys_the_batch_law_in_generate():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (55, 40, 31)]
    assert_rows_as_alone(tiny_model(layers=2), prompts, "keydiff", budget=16, block=6, prefill_chunk=16)
