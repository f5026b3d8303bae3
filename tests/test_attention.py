"""evictkit.attention: the chunked column sums against the whole attention matrix, and the
visible-key bound each chunk uses, for slots in position order and shuffled."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evictkit import attention as A


def _brute_counts(query_positions, key_positions, chunk):
    """The definition: per chunk, 1 + the last slot any row's key at or before the chunk's
    newest query sits in; T when no slot is visible."""
    T = key_positions.shape[-1]
    out = []
    for start in range(0, query_positions.shape[1], chunk):
        newest = query_positions[:, start : start + chunk].max()
        seen = (key_positions <= newest).reshape(-1, T).any(0).nonzero()
        out.append(int(seen[-1]) + 1 if seen.numel() else T)
    return out


@settings(max_examples=200, deadline=None)
@given(
    T=st.integers(1, 40), q=st.integers(1, 30), chunk=st.integers(1, 12), rows=st.integers(1, 3),
    shuffled=st.booleans(), seed=st.integers(0, 2**31 - 1),
)
def test_visible_key_counts_match_the_definition(T, q, chunk, rows, shuffled, seed):
    gen = torch.Generator().manual_seed(seed)
    key_pos = torch.arange(T).expand(rows, 1, T).clone()
    if shuffled:  # evicted and re-ordered slots, different per row, gaps in the positions
        key_pos = torch.stack([torch.randperm(3 * T, generator=gen)[:T] for _ in range(rows)]).view(rows, 1, T)
    query_pos = torch.randint(-2, 3 * T + 2, (rows, q), generator=gen)
    assert A._visible_key_counts(query_pos, key_pos, chunk) == _brute_counts(query_pos, key_pos, chunk)


@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("chunk_elems", [1, 300, 1 << 24])  # one query per chunk, a few, all at once
def test_column_sums_equal_the_whole_matrix(shuffled, chunk_elems, monkeypatch):
    monkeypatch.setattr(A, "_CHUNK_ELEMENTS", chunk_elems)
    gen = torch.Generator().manual_seed(3)
    B, Hq, Hkv, T, D = 2, 4, 2, 23, 8
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    qpos = torch.arange(T).expand(B, T)
    kpos = torch.arange(T).expand(B, Hkv, T).clone()
    if shuffled:
        kpos = torch.stack([torch.randperm(T, generator=gen) for _ in range(B * Hkv)]).view(B, Hkv, T)
    want = A.attention_weights(q, k, qpos, kpos, D**-0.5).sum(2)
    got = A.attention_column_sums(q, k, qpos, kpos, D**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
