"""H2O: accumulated attention by hand, against eager attention, and the laws on tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from generation import assert_generation_unchanged, generate_with_snapshots, prompt_ids, sharpen_attention
from models import tiny_model

import evictkit
from evictkit.contract import declared
from evictkit.kernels import compact_many
from evictkit.observation import Observation
from evictkit.plugins.h2o import H2O, STATE

PROMPT, NEW = 24, 12


def _ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return prompt_ids(n, seed)


# --- the hand computation -----------------------------------------------------------------
def _obs(queries, keys, q_pos, k_pos, state) -> Observation:
    """A one-head, d=1 observation with scaling 1: logit = q * k."""
    module = SimpleNamespace(head_dim=1, scaling=1.0, config=SimpleNamespace())
    T = len(keys)
    obs = Observation(
        module=module, layer_idx=0, n_layers=1, phase="decode",
        keys=torch.tensor(keys, dtype=torch.float64).view(1, 1, T, 1), values=torch.zeros(1, 1, T, 1),
        positions=torch.tensor(k_pos).view(1, 1, T), state=state, scratch={},
        hidden_states=torch.zeros(1, len(q_pos), 1), position_embeddings=(None, None),
        query_positions=torch.tensor(q_pos).view(1, -1), window=0,
    )
    obs.queries = torch.tensor(queries, dtype=torch.float64).view(1, 1, -1, 1)  # skip the projection
    return obs


def _step(policy, obs, budget):
    """What the core does: store observe()'s state, select, compact K/positions/state."""
    obs.state.update(policy.observe(obs))
    idx = policy.select(obs, budget)
    _, positions, score = compact_many([obs.keys, obs.positions, obs.state[STATE]], idx)
    return idx[0, 0].tolist(), positions[0, 0].tolist(), score


def test_accumulation_over_three_steps_by_hand():
    policy = H2O(recent=1)
    l2, l3, l12 = math.log(2), math.log(3), math.log(12)
    # Prefill: keys 0, ln2, ln3 at positions 0..2, all queries 1 -> causal rows
    # [1], [1/3, 2/3], [1/6, 2/6, 3/6]; column sums 1.5, 1, 0.5.
    keys = [0.0, l2, l3]
    obs = _obs([1.0, 1.0, 1.0], keys, [0, 1, 2], [0, 1, 2], {})
    kept, pos, score = _step(policy, obs, budget=2)
    assert kept == [0, 2] and pos == [0, 2]  # recent {2} + the heavier of 1.5 / 1
    torch.testing.assert_close(score[0, 0], torch.tensor([1.5, 0.5], dtype=torch.float32))

    # Decode 1: new key ln12 at position 3, query 1: row [1, 3, 12] / 16.
    keys = [0.0, l3, l12]
    state = {STATE: torch.cat([score, torch.zeros(1, 1, 1)], dim=-1)}  # the core zero-pads the new slot
    obs = _obs([1.0], keys, [3], [0, 2, 3], state)
    kept, pos, score = _step(policy, obs, budget=2)
    assert kept == [0, 2] and pos == [0, 3]  # 1.5625 beats 0.6875; position 3 is recent
    torch.testing.assert_close(score[0, 0], torch.tensor([1.5 + 1 / 16, 12 / 16]))

    # Decode 2: new key 0 at position 4, query 2: logits [0, 2 ln12, 0] -> [1, 144, 1] / 146.
    keys = [0.0, l12, 0.0]
    state = {STATE: torch.cat([score, torch.zeros(1, 1, 1)], dim=-1)}
    obs = _obs([2.0], keys, [4], [0, 3, 4], state)
    kept, pos, score = _step(policy, obs, budget=2)
    assert kept == [1, 2] and pos == [3, 4]  # 0.75 + 144/146 overtakes 1.5625 + 1/146: the sink goes
    torch.testing.assert_close(score[0, 0], torch.tensor([12 / 16 + 144 / 146, 1 / 146]))


def test_default_recent_is_half_the_budget():
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 0.0, 0.0, 0.0, 0.0]]])
    obs = SimpleNamespace(state={STATE: scores}, valid=None)
    assert H2O().select(obs, 4)[0, 0].tolist() == [0, 1, 6, 7]
    assert H2O(recent=0).select(obs, 4)[0, 0].tolist() == [0, 1, 2, 3]
    # a padded batch's row: the two leading padding slots are never kept, whatever they score
    padded = SimpleNamespace(state={STATE: scores}, valid=torch.arange(8)[None, None] >= 2)
    assert H2O().select(padded, 4)[0, 0].tolist() == [2, 3, 6, 7]
    assert [H2O().window_for(b) for b in (1, 2, 7, 256)] == [1, 1, 3, 128]  # the newest always stays
    newest = [declared(H2O(recent=r)).may_evict_newest for r in (0, None, 1)]
    assert newest == [True, False, False]


# --- against transformers' eager attention ------------------------------------------------
def _run(model, ids, new=NEW, **compress):
    return generate_with_snapshots(model, ids, "h2o", new, state=True, **compress)


def test_score_is_the_eager_attention_column_sum():
    """Without eviction the score is the column sum of the full causal attention matrix over
    every query so far, averaged over each KV head's query heads."""
    model = sharpen_attention(tiny_model("llama", attn="eager"))
    ids = _ids(12)
    out, snaps, _ = _run(model, ids, new=6, budget=64)
    full = model(out.sequences[:, :-1], output_attentions=True)
    for li, attn in enumerate(full.attentions):  # [1, H_q, N, N]
        B, Hq, N, _ = attn.shape
        expected = attn.double().sum(2).view(B, 2, Hq // 2, N).mean(2)
        torch.testing.assert_close(snaps[-1][li][STATE].double(), expected, rtol=1e-5, atol=1e-5)


def test_prefill_keeps_recent_plus_the_heaviest():
    model = sharpen_attention(tiny_model("qwen2", attn="eager"))
    ids = _ids()
    budget, recent = 10, 4
    _, snaps, _ = _run(model, ids, new=1, budget=budget, recent=recent)
    full = model(ids, output_attentions=True)
    for li, attn in enumerate(full.attentions):
        B, Hq, N, _ = attn.shape
        score = attn.double().sum(2).view(B, 2, Hq // 2, N).mean(2)[..., : N - recent]
        heavy = score.topk(budget - recent, dim=-1).indices.sort(dim=-1).values
        expected = torch.cat([heavy, torch.arange(N - recent, N).expand(B, 2, recent)], dim=-1)
        assert torch.equal(snaps[0][li]["positions"], expected)
        assert not torch.equal(expected[:, 0], expected[:, 1])  # KV heads keep different tokens


# --- the laws on tiny models --------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("slack", [0, 4])
def test_laws(arch, slack):
    model = sharpen_attention(tiny_model(arch))
    budget, recent = 12, 5
    ids = _ids()
    out, snaps, run = _run(model, ids, budget=budget, slack=slack, recent=recent)
    assert len(snaps) == NEW
    for step, snap in enumerate(snaps):
        seen = PROMPT + step
        for layer in snap.values():
            pos = layer["positions"]
            size = pos.shape[-1]
            assert size == budget if step == 0 or slack == 0 else budget <= size <= budget + slack
            assert bool((pos[..., 1:] > pos[..., :-1]).all())  # order kept
            assert torch.equal(pos[..., -recent:], torch.arange(seen - recent, seen).expand(1, 2, recent))
            assert layer[STATE].dtype == torch.float32 and bool(torch.isfinite(layer[STATE]).all())
    assert all(s.after_prefill == budget for s in run.stats.layers)
    again, snaps2, _ = _run(model, ids, budget=budget, slack=slack, recent=recent)
    assert torch.equal(out.sequences, again.sequences)
    assert all(torch.equal(a[li]["positions"], b[li]["positions"]) for a, b in zip(snaps, snaps2) for li in a)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_no_op_when_the_budget_holds_everything(arch):
    model = tiny_model(arch)
    assert_generation_unchanged(model, _ids(), "h2o", NEW, budget=PROMPT + NEW)


def test_bad_parameters_name_themselves():
    for bad in (-1, 2.5, "4", True):
        with pytest.raises(ValueError, match="recent"):
            evictkit.policy("h2o", recent=bad)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="recent=8"):
        evictkit.compress(model, "h2o", budget=8, recent=8)
    with pytest.raises(ValueError, match="recent=8"), evictkit.compress(model, "h2o", budget=0.25, recent=8):
        model(_ids(24))  # the fraction resolves to 6 entries at prefill
