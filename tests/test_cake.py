"""CAKE (plugins/cake.py) and the cross-layer step (evictkit/cross_layer.py), against a plain
re-computation of the reference's prefill (antgroup/cakekv: modify_llama.py, cake_cache.py)."""

from __future__ import annotations

import math

import attrs
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from generation import assert_rows_as_alone, prompt_ids, sharpen_attention
from models import tiny_model

import evictkit
from evictkit.attention import project_queries
from evictkit.hf import attention_modules
from evictkit.plugins.cake import Cake, adjust_budgets, layer_budgets


def reference_adjust(budget_list, total_budget, seq_len):
    """The authors' `adjust_budgets` (cake/utils.py), restated with numpy as they wrote it."""
    b = np.array(budget_list, dtype=int)
    excess = np.maximum(b - seq_len, 0)
    b = np.minimum(b, seq_len)
    total_excess = int(np.sum(excess))
    if total_excess > 0:
        valid = b < seq_len
        n = int(np.sum(valid))
        if n > 0:
            b[valid] += total_excess // n
            b[np.where(valid)[0][: total_excess % n]] += 1
    diff = total_budget - int(np.sum(b))
    if diff != 0:
        valid = b < seq_len if diff > 0 else b > 1
        n = int(np.sum(valid))
        if n > 0:
            sign = 1 if diff > 0 else -1
            b[valid] += sign * (abs(diff) // n)
            b[np.where(valid)[0][: abs(diff) % n]] += sign
    return b.tolist()


def test_adjust_budgets_by_hand():
    # shares 7.9, 1.5, 0.6 of 10 with a limit of 5: truncated 7, 1, 0; layer 0 clamped to 5 (excess 2,
    # one each to layers 1 and 2); the total is then 9, short by 1, which goes to the lowest layer below 5
    assert adjust_budgets([7.9, 1.5, 0.6], 10, [5, 5, 5]) == [5, 3, 2]
    assert reference_adjust([7.9, 1.5, 0.6], 10, 5) == [5, 3, 2]


@pytest.mark.parametrize("seed", range(40))
def test_adjust_budgets_equals_the_authors_on_random_inputs(seed):
    g = np.random.default_rng(seed)
    L = int(g.integers(1, 12))
    total = int(g.integers(L, 50 * L))
    prefs = g.exponential(size=L) ** 3
    shares = list(prefs / prefs.sum() * total)
    limit = int(g.integers(1, 3 * total // L + 2))
    assert adjust_budgets(shares, total, [limit] * L) == reference_adjust(shares, total, limit)


def test_layer_budgets_split_evenly_without_preferences_and_keep_each_limit():
    assert layer_budgets([0.0, 0.0, 0.0, 0.0], 40, [100] * 4) == [10, 10, 10, 10]
    assert layer_budgets([float("nan"), 1.0], 10, [100, 100]) == [5, 5]
    out = layer_budgets([100.0, 1.0, 1.0], 30, [12, 40, 40])
    assert out[0] == 12 and sum(out) == 30
    # everything fits: each layer keeps all it holds, and the total stays for decoding
    assert layer_budgets([5.0, 1.0], 30, [4, 4]) == [15, 15]


# --- the whole prefill against a plain re-computation -----------------------------------------------------
@torch.no_grad()
def _reference_prefill(model, ids: torch.Tensor, budget: int, window: int, gamma: float, tau1: float, tau2: float):
    """Per-layer budgets and kept positions of the reference's one-shot prefill (batch 1): window
    attention with a causal window block, fp32 softmax; entropy and variance of the prefix part;
    preference shares of (budget - window) * L; mean + gamma * var pooled (avg, 5, zero padding),
    averaged over the group; top-k plus the window."""
    captured = {}

    def grab(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    mods = attention_modules(model)
    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in mods]
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    cache = out.past_key_values
    n, W, L = ids.shape[1], window, len(mods)
    prefs, scores = [], []
    for m in mods:
        hidden, (cos, sin) = captured[m.layer_idx]
        q = project_queries(m, hidden[:, -W:], cos[:, -W:], sin[:, -W:])  # [1, Hq, W, D]
        k = cache.layers[m.layer_idx].keys  # [1, Hkv, n, D]
        G = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(G, dim=1)
        w = q @ k.transpose(2, 3) / math.sqrt(m.head_dim)
        w[:, :, :, -W:] += torch.triu(torch.full((W, W), torch.finfo(w.dtype).min), 1)
        a = torch.softmax(w, dim=-1, dtype=torch.float32)
        prefix = a[:, :, :, :-W]
        disp = -torch.sum(prefix * torch.log(prefix + 1e-10))
        var = torch.var(prefix, dim=-2).sum()
        prefs.append(float(disp ** (1 / tau1) * var ** (1 / tau2)))
        ind = (a.mean(dim=-2) + gamma * a.var(dim=-2))[:, :, :-W]
        ind = F.avg_pool1d(ind, kernel_size=5, padding=2, stride=1)
        scores.append(ind.reshape(1, k.shape[1] // G, G, -1).mean(dim=-2))
    total = (budget - W) * L
    budgets = reference_adjust([p / sum(prefs) * total for p in prefs], total, n - W)
    kept = {}
    for m, b, s in zip(mods, budgets, scores):
        b = min(b, n - W)
        top = s.topk(b, dim=-1).indices.sort(dim=-1).values
        kept[m.layer_idx] = torch.cat([top, torch.arange(n - W, n).expand(*top.shape[:2], W)], dim=-1)
    return [min(b, n - W) + W for b in budgets], kept


@pytest.mark.parametrize(("arch", "gamma", "tau"), [("llama", 200.0, (1.0, 1.0)), ("qwen2", 50.0, (1.6, 0.4))])
def test_prefill_keeps_what_the_reference_keeps(arch, gamma, tau):
    model = tiny_model(arch, layers=4, seed=3)
    sharpen_attention(model)
    ids = prompt_ids(96, seed=1)
    budget, window = 24, 8
    want_budgets, want_kept = _reference_prefill(model, ids, budget, window, gamma, *tau)
    policy = Cake(window=window, gamma=gamma, tau1=tau[0], tau2=tau[1])
    with torch.no_grad(), evictkit.compress(model, policy, budget=budget) as run:
        model(ids, use_cache=True)
        kept = run.kept_positions()
    assert [s.budget for s in run.stats.layers] == want_budgets
    assert sum(want_budgets) == 4 * budget and len(set(want_budgets)) > 1  # a real reallocation
    for li, pos in kept.items():
        assert pos.tolist() == want_kept[li].tolist(), li


def test_decode_holds_each_layer_at_its_allocated_budget():
    model = tiny_model("llama", layers=4, seed=3)
    sharpen_attention(model)
    ids = prompt_ids(80, seed=2)
    with evictkit.compress(model, "cake", budget=24, window=8, slack=2) as run:
        model.generate(ids, max_new_tokens=9, do_sample=False)
    budgets = [s.budget for s in run.stats.layers]
    assert sum(budgets) == 4 * 24
    for s in run.stats.layers:
        assert s.after_prefill == s.budget and s.budget <= s.size <= s.budget + 2 and s.evictions > 1


def test_chunked_prefill_cuts_every_layer_after_every_chunk():
    model = tiny_model("llama", layers=3, seed=5)
    sharpen_attention(model)
    ids = prompt_ids(100, seed=4)
    sizes = []

    def after_model(module, args, output):
        sizes.append([layer.keys.shape[2] for layer in output.past_key_values.layers])

    handle = model.register_forward_hook(after_model)
    try:
        with torch.no_grad(), evictkit.compress(model, "cake", budget=20, window=8, prefill_chunk=32) as run:
            model(ids, use_cache=True)
    finally:
        handle.remove()
    budgets = [s.budget for s in run.stats.layers]
    assert len(sizes) == 4 and sum(budgets) == 3 * 20  # chunks of 4, 32, 32, 32 tokens
    for layer_sizes in sizes[1:]:
        assert sum(layer_sizes) == 3 * 20, sizes


@pytest.mark.parametrize("chunk", [None, 16])
def test_a_padded_batch_keeps_what_each_row_keeps_alone(chunk):
    model = tiny_model("llama", layers=3, seed=7)
    sharpen_attention(model)
    prompts = [prompt_ids(70, seed=1)[0], prompt_ids(45, seed=2)[0], prompt_ids(58, seed=3)[0]]
    assert_rows_as_alone(model, prompts, "cake", budget=20, window=8, prefill_chunk=chunk)


class _BadAllocation(Cake):
    def allocate(self, signals, totals, available):
        return torch.ones(signals.shape[0] + 1, signals.shape[1], dtype=torch.long)


class _FloatSignal(Cake):
    def layer_signal(self, obs):
        return 1.0


@pytest.mark.parametrize(("cls", "match"), [(_BadAllocation, r"allocate\(\) must return an int tensor \[L, R\]"),
                                            (_FloatSignal, r"layer_signal\(\) must return a tensor \[B\]")])
def test_a_cross_layer_policy_that_breaks_its_contract_is_named(cls, match):
    model = tiny_model("llama", layers=2)
    policy = attrs.evolve(cls(), window=4)
    with pytest.raises(ValueError, match=match), evictkit.compress(model, policy, budget=12):
        model(prompt_ids(40), use_cache=True)


def test_cross_layer_policies_without_the_methods_say_what_is_missing():
    class Declares(evictkit.ScorePolicy):
        name = "declares_cross_layer"

        def needs(self):
            return evictkit.Needs(cross_layer=True, padding=True)

        def score(self, obs):
            return obs.keys.norm(dim=-1)

    model = tiny_model("llama", layers=2)
    with pytest.raises(NotImplementedError, match="has no layer_signal"), evictkit.compress(model, Declares(),
                                                                                           budget=8):
        model(prompt_ids(20), use_cache=True)


@pytest.mark.parametrize(("param", "value"), [("tau1", 0.0), ("tau2", -1.0), ("gamma", -1.0), ("kernel", 4),
                                              ("window", 0), ("gamma", float("nan"))])
def test_bad_parameters_name_themselves(param, value):
    with pytest.raises(ValueError, match=param):
        Cake(**{param: value})


def test_a_scorer_picks_the_entries_under_cakes_allocation():
    model = tiny_model("llama", layers=3, seed=3)
    sharpen_attention(model)
    ids = prompt_ids(90, seed=6)

    def prefill(policy, budget=24):
        with torch.no_grad(), evictkit.compress(model, policy, budget=budget) as run:
            model(ids, use_cache=True)
            return [s.budget for s in run.stats.layers], run.kept_positions()

    own, own_kept = prefill(Cake(window=8))
    with_snapkv, snap_kept = prefill(Cake(window=8, scorer="snapkv", scorer_options={"kernel": 3}))
    assert own == with_snapkv  # the allocation is CAKE's whatever picks the entries
    assert any(not torch.equal(own_kept[li], snap_kept[li]) for li in own_kept)

    one_layer = tiny_model("llama", layers=1, seed=3)
    sharpen_attention(one_layer)
    model = one_layer  # with one layer the allocation is the whole budget: plain snapkv
    _, kept = prefill(Cake(window=8, scorer=evictkit.policy("snapkv", window=8, kernel=3)))
    _, plain = prefill(evictkit.policy("snapkv", window=8, kernel=3))
    assert kept[0].tolist() == plain[0].tolist()


@pytest.mark.parametrize(("params", "match"), [
    ({"scorer_options": {"kernel": 3}}, "scorer_options=.*only with a scorer"),
    ({"scorer": evictkit.policy("snapkv", window=16), "window": 8}, "window=8: must equal the window of the scorer"),
    ({"scorer": "no_such_scorer"}, "scorer='no_such_scorer': must be a score policy"),
])
def test_bad_scorers_name_themselves(params, match):
    with pytest.raises(ValueError, match=match):
        Cake(**params)
