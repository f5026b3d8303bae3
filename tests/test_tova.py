"""TOVA: a two-head toy example by hand, eager attention as reference, and the laws."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from generation import assert_generation_unchanged, generate_with_snapshots, prompt_ids, sharpen_attention
from models import tiny_model

import evictkit
from evictkit.contract import declared
from evictkit.observation import Observation
from evictkit.plugins.tova import TOVA

PROMPT, NEW = 24, 12


def _ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return prompt_ids(n, seed)


def _toy(n_kv_heads: int) -> Observation:
    """Two query heads, d=2, scaling 1, four keys at positions 0..3, the query at position 3.

    Head 0 reads dim 0: logits [0, ln2, ln3, 0] -> softmax [1, 2, 3, 1] / 7.
    Head 1 reads dim 1: logits [ln4, 0, 0, ln2] -> softmax [4, 1, 1, 2] / 8.
    With one KV head both query heads see the same keys (GQA group of 2).
    """
    l2, l3, l4 = math.log(2), math.log(3), math.log(4)
    k0 = [[0.0, 0.0], [l2, 0.0], [l3, 0.0], [0.0, 0.0]]
    k1 = [[0.0, l4], [0.0, 0.0], [0.0, 0.0], [0.0, l2]]
    if n_kv_heads == 2:
        keys = torch.tensor([k0, k1], dtype=torch.float64).unsqueeze(0)
    else:
        keys = torch.tensor([[[a[0], b[1]] for a, b in zip(k0, k1)]], dtype=torch.float64).unsqueeze(0)
    queries = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64).unsqueeze(0)  # [1, 2, 1, 2]
    module = SimpleNamespace(head_dim=2, scaling=1.0, config=SimpleNamespace())
    T = 4
    return Observation(
        module=module, layer_idx=0, n_layers=1, phase="decode", keys=keys, values=torch.zeros_like(keys),
        positions=torch.arange(T).expand(1, n_kv_heads, T), state={}, scratch={},
        hidden_states=torch.zeros(1, 1, 4), position_embeddings=(None, None),
        query_positions=torch.tensor([[3]]), window=1, window_buffer=(queries, torch.tensor([[3]])),
    )


HEAD0 = torch.tensor([1, 2, 3, 1]) / 7
HEAD1 = torch.tensor([4, 1, 1, 2]) / 8


def test_two_head_toy_by_hand():
    obs = _toy(2)
    mean = (HEAD0 + HEAD1) / 2  # [0.321, 0.205, 0.277, 0.196]
    torch.testing.assert_close(TOVA().score(obs)[0].double(), torch.stack([mean, mean]).double())
    # layer-wise: both KV heads keep {0, 2}; the current token (slot 3) is evicted
    assert TOVA().select(obs, 2)[0].tolist() == [[0, 2], [0, 2]]
    # head-wise: each KV head by its own query head
    assert TOVA(head_wise=True).select(obs, 2)[0].tolist() == [[1, 2], [0, 3]]
    # budget 3: both heads have a tie at the boundary (1/7 at slots 0 and 3, 1/8 at slots 1 and 2);
    # it goes to the more recent slot
    assert TOVA(head_wise=True).select(obs, 3)[0].tolist() == [[1, 2, 3], [0, 2, 3]]


def test_head_wise_with_one_group_is_layer_wise():
    obs = _toy(1)
    torch.testing.assert_close(TOVA(head_wise=True).score(obs), TOVA().score(obs)[:, :1])
    assert TOVA(head_wise=True).select(obs, 2)[0].tolist() == [[0, 2]]


# --- through the core ---------------------------------------------------------------------
def _run(model, ids, new=NEW, **compress):
    return generate_with_snapshots(model, ids, "tova", new, **compress)


@pytest.mark.parametrize("head_wise", [False, True])
def test_prefill_keeps_the_top_of_the_last_row(head_wise):
    model = sharpen_attention(tiny_model("llama", attn="eager"))
    ids, budget = _ids(), 9
    _, snaps, _ = _run(model, ids, new=1, budget=budget, head_wise=head_wise)
    full = model(ids, output_attentions=True)
    differs = []
    for li, attn in enumerate(full.attentions):  # [1, H_q=4, N, N], 2 KV heads
        row = attn[:, :, -1].double()
        score = row.view(1, 2, 2, -1).mean(2) if head_wise else row.mean(1, keepdim=True).expand(1, 2, -1)
        expected = score.topk(budget, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(snaps[0][li], expected)
        differs.append(not torch.equal(expected[:, 0], expected[:, 1]))
    assert any(differs) == head_wise  # head-wise KV heads choose for themselves


@pytest.mark.parametrize(
    ("arch", "slack", "head_wise"),
    [(a, s, False) for a in ("llama", "qwen2", "mistral") for s in (0, 4)] + [("qwen2", 0, True), ("llama", 4, True)],
)
def test_laws(arch, slack, head_wise):
    model = sharpen_attention(tiny_model(arch))
    budget, ids = 12, _ids()
    out, snaps, run = _run(model, ids, budget=budget, slack=slack, head_wise=head_wise)
    assert len(snaps) == NEW
    for step, snap in enumerate(snaps):
        for pos in snap.values():
            size = pos.shape[-1]
            assert size == budget if step == 0 or slack == 0 else budget <= size <= budget + slack
            assert bool((pos[..., 1:] > pos[..., :-1]).all())
            assert int(pos.max()) < PROMPT + step
            if not head_wise:
                assert bool((pos == pos[:, :1]).all())  # layer-wise: every KV head keeps the same tokens
    assert all(s.after_prefill == budget for s in run.stats.layers)
    again, snaps2, _ = _run(model, ids, budget=budget, slack=slack, head_wise=head_wise)
    assert torch.equal(out.sequences, again.sequences)
    assert all(torch.equal(a[li], b[li]) for a, b in zip(snaps, snaps2) for li in a)


def test_no_op_when_the_budget_holds_everything():
    model = tiny_model("qwen2")
    assert_generation_unchanged(model, _ids(), "tova", NEW, budget=PROMPT + NEW)


def test_bad_parameters_name_themselves():
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="head_wise"):
            evictkit.policy("tova", head_wise=bad)
    assert declared(TOVA()).may_evict_newest
