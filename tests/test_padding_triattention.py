"""triattention on a left-padded batch: per-row prompts, statistics over real entries, per-row noise."""

from __future__ import annotations

import pytest
import torch

import evictkit
from evictkit.observation import Observation
from evictkit.plugins.triattention import PROMPT, TriAttention
from evictkit.specs.tiny import tiny_attention, tiny_model

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


def _context_then_as_decode(model, contexts, questions, steps=6):
    """Each row's context (a row may have none: it starts in the next forward), then its question
    under `as_decode()`, then `steps` greedy tokens: (tokens [B, steps], kept positions)."""
    from evictkit.hf import cache_arg, new_cache

    B, W = len(contexts), max(len(c) for c in contexts)
    ids, mask = torch.zeros(B, W, dtype=torch.long), torch.zeros(B, W, dtype=torch.long)
    for i, c in enumerate(contexts):
        if len(c):
            ids[i, W - len(c):], mask[i, W - len(c):] = c, 1
    with torch.no_grad(), evictkit.compress(model, "triattention", budget=14) as run:
        cache = new_cache(model)
        if W:
            model(ids, attention_mask=mask, **cache_arg(model, cache))
        mask = torch.cat([mask, torch.ones(B, questions.shape[1], dtype=torch.long)], 1)
        with run.as_decode():
            logits = model(questions, attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
        tokens = []
        for _ in range(steps):
            tokens.append(logits.argmax(-1))
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1)
            logits = model(tokens[-1][:, None], attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
        return torch.stack(tokens, 1), run.kept_positions()


def test_a_row_decoding_under_as_decode_beside_a_starting_row_keeps_what_it_keeps_alone():
    """Row 0 continues with 4 tokens under `as_decode()` (alone: decode, not prompt) while row 1
    starts in that forward (its prefill): the prompt end is each row's own phase (obs.rows.prefill),
    not a guess from query positions (row 0's question was taken as prompt and pinned)."""
    model = tiny_model(layers=2)
    g = torch.Generator().manual_seed(0)
    context, q0, q1 = (torch.randint(3, 128, (n,), generator=g) for n in (8, 4, 4))
    tokens, kept = _context_then_as_decode(model, [context, context[:0]], torch.stack([q0, q1]))
    for row, (c, q) in enumerate([(context, q0), (context[:0], q1)]):
        t1, k1 = _context_then_as_decode(model, [c], q[None])
        assert torch.equal(tokens[row], t1[0]), row
        for layer in k1:
            got = [h[h >= 0].tolist() for h in kept[layer][row]]
            assert got == [h[h >= 0].tolist() for h in k1[layer][0]], (row, layer)
