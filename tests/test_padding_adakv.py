"""adakv on a left-padded batch: each row's per-head caps and kept entries are those of the row alone."""

from __future__ import annotations

import pytest
import torch

from evictkit.observation import Observation
from evictkit.plugins.adakv import AdaKV
from evictkit.plugins.snapkv import SnapKV


class _SinkSnap(SnapKV):
    """SnapKV that also protects the first 2 real entries of each head (adakv's sink path)."""

    def protected(self) -> tuple[int, int]:
        return (2, self.window)


def _obs(keys: torch.Tensor, queries: torch.Tensor, real: torch.Tensor, length: torch.Tensor) -> Observation:
    """keys [B, H, T, D] whose last real[b, h] slots are real (the rest leading padding) and hold
    positions length[b] - real[b, h] .. length[b] - 1; queries [B, H_q, w, D] are each row's newest."""
    B, H, T, _ = keys.shape
    w = queries.shape[2]
    slots = torch.arange(T)
    valid = slots >= (T - real)[..., None]
    positions = (slots + (length[:, None] - T)[..., None]).masked_fill(~valid, -1)
    obs = Observation.from_tensors(
        keys=keys, values=torch.zeros_like(keys), queries=queries,
        query_positions=length[:, None] - w + torch.arange(w), scaling=keys.shape[-1] ** -0.5,
        layer_idx=0, n_layers=1, window=w, positions=positions,
    )
    obs.valid = None if bool(valid.all()) else valid
    return obs


@pytest.mark.parametrize("policy", [AdaKV(scorer=SnapKV(window=3, kernel=3), window=3, alpha=0.2),
                                    AdaKV(scorer=_SinkSnap(window=3, kernel=3), window=3, alpha=0.0),
                                    AdaKV(scorer=SnapKV(window=3, kernel=1), window=3, normalize=True)],
                         ids=["snapkv", "sinks", "normalize"])
def test_a_padded_row_keeps_what_it_keeps_alone(policy):
    g = torch.Generator().manual_seed(0)
    budget, T, D, w = 7, 40, 8, 3
    real = torch.tensor([[40, 40], [31, 24], [6, 22]])  # real entries per (row, head): ragged heads, one short
    length = torch.tensor([40, 50, 30])  # each row's tokens seen
    keys = 4 * torch.randn(3, 2, T, D, generator=g)  # padding slots hold big junk keys too
    queries = 4 * torch.randn(3, 4, w, D, generator=g)
    idx, counts = policy.select(_obs(keys, queries, real, length), budget)
    K = idx.shape[-1]
    for b in range(3):
        n = int(real[b].max())  # alone, the row is as wide as its longest head
        alone_idx, alone_counts = policy.select(
            _obs(keys[b:b + 1, :, T - n:], queries[b:b + 1], real[b:b + 1], length[b:b + 1]), budget)
        assert counts[b].tolist() == alone_counts[0].tolist(), b
        assert int(counts[b].sum()) == 2 * budget
        for h in range(2):
            c = int(counts[b, h])
            kept = idx[b, h, K - c:]
            assert bool((kept >= T - real[b, h]).all()), (b, h)  # never a padding slot
            assert (kept - (T - n)).tolist() == alone_idx[0, h, alone_idx.shape[-1] - c:].tolist(), (b, h)
