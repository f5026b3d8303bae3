"""h2o_prefill on a left-padded batch: padding keys take no attention from real queries, so a
row's column sums are the row's alone."""

from __future__ import annotations

import torch

from evictkit.observation import Observation
from evictkit.plugins.h2o_prefill import H2OPrefill

HQ, HKV, D = 4, 2, 8


def _obs(queries: torch.Tensor, keys: torch.Tensor, pad: torch.Tensor | None) -> Observation:
    """A one-shot prefill Observation: queries [B, H_q, T, D], keys [B, H_kv, T, D]; the first
    pad[b] tokens of row b are padding, None: no padding."""
    B, _, T, _ = keys.shape
    slots = torch.arange(T)
    first = torch.zeros(B, dtype=torch.long) if pad is None else pad
    qpos = (slots - first[:, None]).masked_fill(slots < first[:, None], -1)  # [B, T]
    obs = Observation.from_tensors(keys=keys, values=torch.ones_like(keys), queries=queries, query_positions=qpos,
                                   scaling=D**-0.5, layer_idx=0, n_layers=1, window=4,
                                   positions=qpos[:, None].expand(B, HKV, T))
    obs.valid = None if pad is None else (qpos >= 0)[:, None].expand(B, HKV, T)
    return obs


def test_a_padded_row_scores_and_keeps_what_it_does_alone():
    g = torch.Generator().manual_seed(0)
    T, lengths, budget = 24, [24, 17, 11], 8
    queries, keys = torch.randn(3, HQ, T, D, generator=g), torch.randn(3, HKV, T, D, generator=g)
    keys[:, :, :13] += 3 * queries[:, ::2, :13].mean(2, keepdim=True)  # padding keys every query would favour
    pad = torch.tensor([T - n for n in lengths])
    policy = H2OPrefill(window=4)
    obs = _obs(queries, keys, pad)
    scores, kept = policy.score(obs), policy.select(obs, budget)
    for b, n in enumerate(lengths):
        p = T - n
        alone = _obs(queries[b : b + 1, :, p:], keys[b : b + 1, :, p:], None)
        torch.testing.assert_close(scores[b, :, p:], policy.score(alone)[0], rtol=1e-5, atol=1e-6)
        assert (kept[b] - p).tolist() == policy.select(alone, budget)[0].tolist(), b
