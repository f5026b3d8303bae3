"""Shared selection: protected slots, tie-break toward recent, sorted output, GQA reduction, pooling."""

import pytest
import torch

from evictkit.selection import check_indices, pool1d, reduce_gqa, select_topk


def test_topk_keeps_highest_and_sorts():
    s = torch.tensor([[[0.1, 0.9, 0.3, 0.8, 0.2]]])
    assert select_topk(s, 2).tolist() == [[[1, 3]]]


def test_ties_go_to_the_more_recent_slot():
    s = torch.tensor([[[1.0, 1.0, 1.0, 1.0, 0.0]]])
    assert select_topk(s, 2).tolist() == [[[2, 3]]]


def test_protected_sinks_and_window_are_forced_in():
    s = torch.tensor([[[0.0, 5.0, 5.0, 5.0, 0.0, 0.0]]])
    assert select_topk(s, 4, sinks=1, window=2).tolist() == [[[0, 3, 4, 5]]]


def test_budget_at_least_length_keeps_everything():
    s = torch.rand(2, 3, 5)
    assert select_topk(s, 9).tolist() == torch.arange(5).expand(2, 3, 5).tolist()


def test_nan_scores_are_an_error():
    with pytest.raises(ValueError, match="NaN"):
        select_topk(torch.tensor([[[0.0, float("nan"), 1.0]]]), 2, policy="bad")


def test_reduce_gqa_mean_and_max():
    s = torch.tensor([[[1.0, 4.0], [3.0, 0.0], [5.0, 5.0], [1.0, 1.0]]])  # 4 query heads, 2 KV heads
    assert reduce_gqa(s, 2, "mean").tolist() == [[[2.0, 2.0], [3.0, 3.0]]]
    assert reduce_gqa(s, 2, "max").tolist() == [[[3.0, 4.0], [5.0, 5.0]]]
    with pytest.raises(ValueError, match="gqa"):
        reduce_gqa(s, 2, "sum")


def test_pool1d_max_and_avg_by_hand():
    s = torch.tensor([[[0.0, 3.0, 0.0, 0.0, 6.0]]])
    assert pool1d(s, 3, "max").tolist() == [[[3.0, 3.0, 3.0, 6.0, 6.0]]]
    assert pool1d(s, 3, "avg").tolist() == [[[1.0, 1.0, 1.0, 2.0, 2.0]]]  # zero padding counted
    with pytest.raises(ValueError, match="kernel"):
        pool1d(s, 4, "max")


def test_check_indices_rejects_bad_selections():
    check_indices(torch.tensor([[[0, 2]]]), 1, 1, 3, 2, "p")
    with pytest.raises(ValueError, match="strictly increasing"):
        check_indices(torch.tensor([[[2, 0]]]), 1, 1, 3, 2, "p")
    with pytest.raises(ValueError, match="shape"):
        check_indices(torch.tensor([[[0, 1, 2]]]), 1, 1, 3, 2, "p")
    with pytest.raises(ValueError, match="outside"):
        check_indices(torch.tensor([[[0, 3]]]), 1, 1, 3, 2, "p")
