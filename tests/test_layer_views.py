"""The layer views (evictkit.layout): every storage answers the step's questions the same way,
and the varlen layer's batch operations move rows, never tokens."""

import pytest
import torch

from evictkit.hf import dense_layer
from evictkit.layout import PaddedView, VarlenView, real_counts, real_entries, view_of
from evictkit.ragged_cache import RaggedLayer

B, H, K, D = 3, 2, 5, 4


def _padded():
    """A head-padded layer: row b, head h keeps its last K - pad[b, h] slots; positions -1 before them."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(B, H, K, D, generator=g), torch.randn(B, H, K, D, generator=g)
    pad = torch.tensor([[0, 2], [1, 1], [4, 0]])
    positions = torch.arange(K).expand(B, H, K).clone()
    positions[torch.arange(K) < pad[..., None]] = -1
    keys[positions < 0] = 0
    values[positions < 0] = 0
    return keys, values, pad, positions


def test_one_definition_of_real_entries_in_every_layout():
    keys, values, pad, positions = _padded()
    want = int(real_counts(positions).sum(-1).max())
    assert want == 8  # row 0 holds 5 + 3 real entries, row 1 4 + 4, row 2 1 + 5
    padded = view_of(dense_layer(keys, values), pad)
    varlen = view_of(RaggedLayer.from_padded(keys, values, pad))
    assert isinstance(padded, PaddedView) and isinstance(varlen, VarlenView)
    assert padded.real_entries() == varlen.real_entries() == real_entries(pad, H, K) == want
    assert view_of(dense_layer(keys, values)).real_entries() == H * K  # no padding tracked: dense


def test_views_agree_on_length_keys_and_newest_entries():
    keys, values, pad, _ = _padded()
    padded = view_of(dense_layer(keys, values), pad)
    varlen = view_of(RaggedLayer.from_padded(keys, values, pad))
    assert padded.slots == varlen.slots == K and padded.n_kv_heads == varlen.n_kv_heads == H
    for before in (0, 1):
        torch.testing.assert_close(padded.newest_keys(before), varlen.newest_keys(before), rtol=0, atol=0)
    vk, vv = varlen.kv()
    torch.testing.assert_close(vk, keys, rtol=0, atol=0)
    torch.testing.assert_close(vv, values, rtol=0, atol=0)
    assert varlen.costly_to_read and not varlen.masked and padded.masked and not padded.costly_to_read


def _rows(layer: RaggedLayer) -> list[list[torch.Tensor]]:
    """Per row, per head, the segment of keys."""
    segs = list(layer.keys.split(layer.counts.flatten().tolist()))
    return [segs[b * H:(b + 1) * H] for b in range(layer.shape[0])]


def test_varlen_batch_operations_move_whole_rows():
    keys, values, pad, _ = _padded()
    layer = RaggedLayer.from_padded(keys, values, pad)
    before = _rows(layer)
    layer.batch_repeat_interleave(2)
    after = _rows(layer)
    assert layer.shape == (2 * B, H) and len(after) == 2 * B
    for b in range(2 * B):
        assert all(torch.equal(x, y) for x, y in zip(after[b], before[b // 2]))
    layer.batch_select_indices(torch.tensor([5, 0]))
    assert layer.shape == (2, H)
    assert all(torch.equal(x, y) for x, y in zip(_rows(layer)[0], before[2]))
    assert all(torch.equal(x, y) for x, y in zip(_rows(layer)[1], before[0]))
    assert layer.values.shape[0] == layer.keys.shape[0] == int(layer.counts.sum())


def test_varlen_layer_refuses_what_it_cannot_do():
    keys, values, pad, _ = _padded()
    layer = RaggedLayer.from_padded(keys, values, pad)
    with pytest.raises(NotImplementedError, match="ragged_layout='padded'"):
        layer.crop(2)
    with pytest.raises(NotImplementedError, match="never initialized empty"):
        layer.lazy_initialization(keys, values)
