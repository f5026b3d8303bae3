"""triattention on a left-padded batch: per-row prompts, statistics over real entries, per-row noise."""

from __future__ import annotations

import pytest
import torch

from evictkit.observation import Observation
from evictkit.plugins.triattention import PROMPT, TriAttention
from evictkit.specs.tiny import tiny_attention

H_KV, G, D = 2, 2, 8


class _Fixed(TriAttention):
    """Query statistics given by the test (a zero mean makes every score a tie of the magnitude term)."""

    def _layer_stats(self, obs):
        g = torch.Generator().manual_seed(7)
        z = torch.complex(torch.randn(H_KV * G, D // 2, generator=g), torch.randn(H_KV * G, D // 2, generator=g))
        if self.offsets == 1:  # the tie case: no trigonometric term, equal magnitudes
            z = torch.zeros_like(z)
        inv_freq = 1.0 / 10000 ** (torch.arange(D // 2).double() / (D // 2))
        B = obs.keys.shape[0]
        return z.expand(B, -1, -1), (z.abs() + 1).expand(B, -1, -1), inv_freq, 1.0


def _obs(keys: torch.Tensor, lengths: list[int], prompts, module) -> Observation:
    """A decode Observation whose row b holds its newest lengths[b] slots for real (the rest padding)."""
    B, H, T, _ = keys.shape
    pad = torch.tensor([T - n for n in lengths])[:, None].expand(B, H)
    slots = torch.arange(T)
    valid = slots >= pad[..., None]
    positions = (slots - pad[..., None]).masked_fill(~valid, -1)
    last = torch.tensor(lengths)[:, None] - 1
    return Observation(
        module=module, layer_idx=0, n_layers=1, phase="decode", keys=keys, values=keys.clone(),
        positions=positions, state={}, scratch={PROMPT: prompts}, hidden_states=torch.zeros(B, 1, 4 * D),
        position_embeddings=(None, None), query_positions=last, window=0, valid=None if bool(valid.all()) else valid,
    )


@pytest.mark.parametrize("params", [{}, {"sinks": 1, "window": 2}, {"seed": 0, "group": "mean"},
                                    {"offsets": 1, "seed": 5}], ids=repr)
def test_a_padded_row_keeps_what_it_keeps_alone(params):
    module, _ = tiny_attention(H_KV * G, H_KV, D, 0, "float32")
    g = torch.Generator().manual_seed(1)
    lengths, prompts, budget, T = [21, 14, 9], [5, 10, 3], 8, 21
    keys = torch.randn(3, H_KV, T, D, generator=g)
    if params.get("offsets") == 1:
        keys = keys[:, :, :1].expand(-1, -1, T, -1).contiguous()  # one key everywhere: only the noise tells
    policy = _Fixed(**params)
    batch = _obs(keys, lengths, torch.tensor(prompts), module)
    kept = policy.select(batch, budget)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        alone = policy.select(_obs(keys[b : b + 1, :, T - n :], [n], p, module), budget)
        assert (kept[b] - (T - n)).tolist() == alone[0].tolist(), b
    # the 10-entry prompt fills the budget of 8 with its first entries (and the window's newest);
    # padding is never kept
    w = policy.window
    assert (kept[1] - (T - 14)).tolist() == [list(range(8 - w)) + list(range(14 - w, 14))] * H_KV
    assert bool((batch.positions.gather(2, kept[:2]) >= 0).all())
