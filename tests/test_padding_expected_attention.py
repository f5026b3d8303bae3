"""expected_attention on a left-padded batch: a row's scores are the row's scores alone."""

from __future__ import annotations

import pytest
import torch

from evictkit.observation import Observation
from evictkit.plugins.expected_attention import ExpectedAttention
from evictkit.specs.tiny import tiny_attention

HQ, HKV, D, LAYER = 4, 2, 16, 1


def _obs(module, rope, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
         pad: torch.Tensor | None) -> Observation:
    """A one-shot prefill Observation: hidden [B, T, C], keys/values [B, H_kv, T, D]; the first
    pad[b] tokens of row b are padding (queries and, in every head, keys), None: no padding."""
    B, T, _ = hidden.shape
    slots = torch.arange(T)
    first = torch.zeros(B, dtype=torch.long) if pad is None else pad
    qpos = (slots - first[:, None]).masked_fill(slots < first[:, None], -1)  # [B, T]
    cos, sin = rope(hidden, qpos.clamp(min=0))
    valid = None if pad is None else (qpos >= 0)[:, None].expand(B, HKV, T)
    return Observation(
        module=module, layer_idx=LAYER, n_layers=2, phase="prefill", keys=keys, values=values,
        positions=qpos[:, None].expand(B, HKV, T), state={}, scratch={}, hidden_states=hidden,
        position_embeddings=(cos, sin), query_positions=qpos, window=0, valid=valid,
    )


@pytest.mark.parametrize("policy", [ExpectedAttention(), ExpectedAttention(sinks=0, covariance=False),
                                    ExpectedAttention(sinks=2, vnorm=False, epsilon=0.1)], ids=repr)
def test_a_padded_row_scores_what_it_scores_alone(policy):
    module, rope = tiny_attention(HQ, HKV, D, LAYER, "float32")
    g = torch.Generator().manual_seed(0)
    T, lengths = 30, [30, 21, 3]  # the 3-token row is all sinks: its statistics use every real query
    hidden = 20 * torch.randn(3, T, HQ * D, generator=g)  # padding tokens' hidden states are big junk
    keys, values = 20 * torch.randn(3, HKV, T, D, generator=g), torch.randn(3, HKV, T, D, generator=g)
    pad = torch.tensor([T - n for n in lengths])
    with torch.no_grad():
        batch = policy.score(_obs(module, rope, hidden, keys, values, pad))
        for b, n in enumerate(lengths):
            p = T - n
            alone = policy.score(_obs(module, rope, hidden[b : b + 1, p:], keys[b : b + 1, :, p:],
                                      values[b : b + 1, :, p:], None))
            torch.testing.assert_close(batch[b, :, p:], alone[0], rtol=1e-5, atol=1e-6, msg=f"row {b}")
            # the sinks are the row's first real entries, scored above every other entry
            sinks = min(policy.sinks, n)
            if sinks and n > sinks:
                assert bool((batch[b, :, p : p + sinks] > batch[b, :, p + sinks :].amax()).all())


def test_heads_with_different_padding_score_as_alone():
    # a head-ragged layer: head 0 of the row has 4 padding slots, head 1 has 9
    module, rope = tiny_attention(HQ, HKV, D, LAYER, "float32")
    g = torch.Generator().manual_seed(1)
    T, policy = 25, ExpectedAttention(sinks=3)
    hidden = torch.randn(1, T, HQ * D, generator=g)
    keys, values = torch.randn(1, HKV, T, D, generator=g), torch.randn(1, HKV, T, D, generator=g)
    obs = _obs(module, rope, hidden, keys, values, None)
    pads = [4, 9]
    obs.valid = torch.stack([torch.arange(T) >= p for p in pads])[None]
    obs.positions = torch.stack([(torch.arange(T) - p).masked_fill(torch.arange(T) < p, -1) for p in pads])[None]
    with torch.no_grad():
        batch = policy.score(obs)
        for h, p in enumerate(pads):
            alone = policy.score(_obs(module, rope, hidden, keys[:, :, p:], values[:, :, p:], None))
            # the same queries (the whole forward), head h's own real keys; the sinks score the
            # row's maximum + 1 over both heads, so compare the scored entries only
            torch.testing.assert_close(batch[0, h, p + 3 :], alone[0, h, 3:], rtol=1e-5, atol=1e-6)
