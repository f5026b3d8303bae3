"""R-KV's scorer on a padded batch's layer (evictkit.padded): with leading padding slots holding
junk (copies of real keys) and padding window queries, every real entry scores as it does alone."""

from __future__ import annotations

import torch

from evictkit.plugins.rkv import importance, redundancy


def _padded(alone: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """alone [1, H, T, D] -> [1, H, pad + T, D] with `pad` junk slots in front (copies of the newest
    real keys: the worst junk, a perfect match for them), and the valid mask [1, H, pad + T]."""
    junk = alone[:, :, -pad:].clone()
    valid = torch.arange(pad + alone.shape[2]) >= pad
    return torch.cat([junk, alone], dim=2), valid.expand(1, alone.shape[1], -1)


def test_redundancy_ignores_padding_keys_and_counts_key_0_from_the_first_real_slot():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 2, 12, 8, generator=g)
    keys[:, :, 5] = keys[:, :, 9]  # a similar pair, so some rows have a newest similar key and some not
    padded, valid = _padded(keys, 4)
    for threshold in (0.5, 0.99, -0.5):
        alone = redundancy(keys, threshold)
        got = redundancy(padded, threshold, valid=valid)
        torch.testing.assert_close(got[..., 4:], alone, rtol=1e-6, atol=1e-8)
        assert not got[..., :4].any()
    # the hand-worked case: with no similar key, row i zeroes C[i, first real slot], as alone C[i, 0]
    two = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])  # orthogonal: nothing above 0.5
    # column means alone: row 0 zeroes C[0, 0] (already the diagonal), row 1 zeroes C[1, 0] (= 0): all 0
    torch.testing.assert_close(redundancy(two, 0.5), torch.tensor([[[0.5, 0.5]]]))
    p2, v2 = _padded(two, 1)
    torch.testing.assert_close(redundancy(p2, 0.5, valid=v2), torch.tensor([[[0.0, 0.5, 0.5]]]))


def test_importance_ignores_padding_keys_and_padding_queries():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(1, 2, 10, 8, generator=g)
    queries = torch.randn(1, 4, 3, 8, generator=g)
    alone = importance(queries, keys, 0.35, 3)
    padded, valid = _padded(keys, 5)
    junk_q = torch.cat([torch.randn(1, 4, 2, 8, generator=g), queries], dim=2)  # two padding queries first
    real_q = torch.tensor([[False, False, True, True, True]])
    got = importance(junk_q, padded, 0.35, 3, key_valid=valid, query_valid=real_q)
    torch.testing.assert_close(got[..., 5:], alone, rtol=1e-6, atol=1e-8)
    assert not got[..., :4].any()  # padding gets 0; the max-pool (kernel 3) reaches one slot into it
    # a row with no real key yet (not started) stays finite
    none = importance(junk_q, padded, 0.35, 3, key_valid=torch.zeros_like(valid), query_valid=real_q)
    assert torch.isfinite(none).all()
