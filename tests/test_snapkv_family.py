"""SnapKV, PyramidKV and H2O-prefill (KVCache-Factory variant): golden values, laws, bad input."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import attrs
import pytest
import torch
from transformers import DynamicCache

import evictkit
import evictkit.attention
from evictkit.plugins.h2o_prefill import H2OPrefill
from evictkit.plugins.pyramidkv import pyramid_budgets
from evictkit.plugins.snapkv import SnapKV, window_scores

sys.path.insert(0, str(Path(__file__).parent))
from generation import assert_generation_unchanged, prompt_ids  # noqa: E402
from models import tiny_model  # noqa: E402

from evictkit.hf import cache_arg

ARCHS = ("llama", "qwen2", "mistral")


def fake_obs(window_attention: torch.Tensor, n_kv_heads: int):
    """The two things window_scores reads from an Observation."""
    return types.SimpleNamespace(window_attention=window_attention, n_kv_heads=n_kv_heads, valid=None)


# --- golden: pooling and a hand-computed selection ------------------------------------------------

def test_pooling_golden_max_and_avg():
    # one query head, one window query; the last `window`=1 slot is not pooled
    row = torch.tensor([0.0, 1.0, 0.0, 0.0, 5.0, 0.0, 0.0, 2.0, 9.0])
    attn = row.view(1, 1, 1, 9)
    mx = window_scores(fake_obs(attn, 1), window=1, kernel=3, pool="max", gqa="mean")[0, 0]
    av = window_scores(fake_obs(attn, 1), window=1, kernel=3, pool="avg", gqa="mean")[0, 0]
    # max over [i-1, i+1] of the prefix; the window slot (9.0) passes through and does not spill
    assert mx.tolist() == [1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 2.0, 2.0, 9.0]
    # avg counts the zero padding: the border slots are divided by 3, not 2
    third = 1.0 / 3.0
    expected = [third, third, third, 5 * third, 5 * third, 5 * third, 2 * third, 2 * third, 9.0]
    assert torch.allclose(av, torch.tensor(expected))
    # kernel 5, max
    mx5 = window_scores(fake_obs(attn, 1), window=1, kernel=5, pool="max", gqa="mean")[0, 0]
    assert mx5.tolist() == [1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 2.0, 9.0]
    # kernel 1 and pool="none" leave the sums alone
    assert window_scores(fake_obs(attn, 1), window=1, kernel=1, pool="max", gqa="mean")[0, 0].tolist() == row.tolist()
    assert window_scores(fake_obs(attn, 1), window=1, kernel=7, pool="none", gqa="mean")[0, 0].tolist() == row.tolist()


def test_snapkv_selection_golden_reduces_gqa_before_pooling():
    # 2 query heads share 1 KV head; window=2 queries, T=8; prefix = slots 0..5.
    # Column sums over the window: head q0 -> [0,1,0,0,0,0 | .5,.5], head q1 -> [0,0,0,1,0,0 | .5,.5]
    attn = torch.zeros(1, 2, 2, 8)
    attn[0, 0, 0, 1] = 1.0
    attn[0, 1, 1, 3] = 1.0
    attn[0, :, :, 6:] = 0.25
    # reduce first (mean): [0, .5, 0, .5, 0, 0]; max pool k=3: [.5, .5, .5, .5, .5, 0]
    scores = SnapKV(window=2, kernel=3).score(fake_obs(attn, 1))
    assert torch.allclose(scores[0, 0, :6], torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.0]))
    # budget 3 = 1 prefix slot + the 2 window slots; the tie among slots 0..4 goes to the newest (4).
    # (pooling first and averaging second, kvpress' order, would score slot 2 at 1.0 and keep it.)
    idx = SnapKV(window=2, kernel=3).select(fake_obs(attn, 1), 3)
    assert idx.tolist() == [[[4, 6, 7]]]
    # sum vs mean over the window does not change the ranking; avg pooling: [.167,.167,.333,.167,.167,0]
    idx_avg = SnapKV(window=2, kernel=3, pool="avg").select(fake_obs(attn, 1), 3)
    assert idx_avg.tolist() == [[[2, 6, 7]]]
    # gqa="max": [0, 1, 0, 1, 0, 0] -> pooled [1, 1, 1, 1, 1, 0]; budget 4 keeps the two newest of the tie
    idx_max = SnapKV(window=2, kernel=3, gqa="max").select(fake_obs(attn, 1), 4)
    assert idx_max.tolist() == [[[3, 4, 6, 7]]]


# --- golden: PyramidKV budgets --------------------------------------------------------------------

def test_pyramid_budgets_golden():
    # C=40, W=8, L=4, n=100: avg 32, min = max(32 // 20, 1) = 1, max = 63; exact ramp 63, 42.33, 21.67, 1
    # floors 63+42+21+1 = 127, one unit left -> largest remainder (21.67)
    assert pyramid_budgets(40, 8, 4, 100, beta=20) == [71, 50, 30, 9]
    # clamp regime: n=66 -> max = n - W = 58, min = 64 - 58 = 6; ramp 58, 40.67, 23.33, 6 -> 58, 41, 23, 6
    assert pyramid_budgets(40, 8, 4, 66, beta=20) == [66, 49, 31, 14]


def test_pyramid_regimes():
    # n < C: nothing to evict; C <= n < 2(C - W): uniform (the reference disables the pyramid)
    assert pyramid_budgets(40, 8, 4, 39) == [40] * 4
    assert pyramid_budgets(40, 8, 4, 63) == [40] * 4
    assert pyramid_budgets(40, 8, 4, 64) != [40] * 4
    assert pyramid_budgets(40, 8, 1, 1000) == [40]


def test_pyramid_mean_is_exact_where_the_reference_overshoots():
    # the reference's floored step: C=512, W=8, L=32 -> 983 - 30 l, mean prefix 518 > 504
    C, W, L, n, beta = 512, 8, 32, 100_000, 20
    ref = [(983 - 30 * layer) + W for layer in range(L)]
    assert sum(ref) / L == 518 + W
    ours = pyramid_budgets(C, W, L, n, beta)
    assert sum(ours) == L * C
    assert ours[0] == 983 + W and ours[-1] == 25 + W
    assert all(a >= b for a, b in zip(ours, ours[1:]))


@pytest.mark.parametrize("seed", range(40))
def test_pyramid_budget_properties(seed):
    g = torch.Generator().manual_seed(seed)
    W = int(torch.randint(1, 40, (1,), generator=g))
    C = W + int(torch.randint(1, 300, (1,), generator=g))
    L = int(torch.randint(2, 40, (1,), generator=g))
    n = int(torch.randint(1, 4 * C, (1,), generator=g))
    beta = int(torch.randint(1, 30, (1,), generator=g))
    b = pyramid_budgets(C, W, L, n, beta)
    assert len(b) == L
    assert sum(b) == L * C  # the mean equals the uniform budget exactly, in every regime
    assert all(x > W for x in b)  # every layer keeps more than its window
    assert all(x >= y for x, y in zip(b, b[1:]))  # falls with depth
    if n >= C:
        assert max(b) <= n
    # each layer is the floor or the ceiling of the exact linear ramp
    if b != [C] * L:
        exact = [b[0] - W - layer * (b[0] - b[-1]) / (L - 1) for layer in range(L)]
        assert all(abs((x - W) - e) < 1 for x, e in zip(b, exact))


# --- golden: H2O-prefill column sums vs brute-force eager attention ---------------------------------

RECORDED: dict[int, torch.Tensor] = {}


@attrs.define(frozen=True, kw_only=True)
class _SpyH2O(H2OPrefill):
    def score(self, obs):
        s = super().score(obs)
        RECORDED[obs.layer_idx] = s.clone()
        return s


@pytest.mark.parametrize("arch", ARCHS)
def test_h2o_prefill_column_sums_match_eager_attention(arch, monkeypatch):
    monkeypatch.setattr(evictkit.attention, "_CHUNK_ELEMENTS", 4 * 2 * 48 * 5)  # force chunks of 5 queries
    model = tiny_model(arch, layers=2, attn="eager")
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids, output_attentions=True, use_cache=False).attentions  # per layer [1, H_q, T, T]
    RECORDED.clear()
    policy = _SpyH2O(window=6)
    cache = DynamicCache()
    with torch.no_grad(), evictkit.compress(model, policy, budget=20) as run:
        model(ids, **cache_arg(model, cache))
    for layer, attn in enumerate(ref):
        brute = attn.float().sum(2).view(1, 2, 2, 48).mean(2)  # column sums, mean over each GQA group
        assert torch.allclose(RECORDED[layer], brute, atol=1e-5)
        prefix_top = torch.topk(brute[0, :, :42], 14, dim=-1).indices.sort(-1).values
        kept = run._layers[layer].positions[0]
        assert torch.equal(kept[:, :14], prefix_top)
        assert torch.equal(kept[:, 14:], torch.arange(42, 48).expand(2, 6))


# --- laws on tiny models ----------------------------------------------------------------------------

def _policies():
    return [
        ("snapkv", dict(window=4, kernel=3)),
        ("snapkv", dict(window=4, kernel=5, pool="avg", gqa="max")),
        ("pyramidkv", dict(window=4, kernel=3, beta=4)),
        ("h2o_prefill", dict(window=4)),
    ]


def _budgets(run) -> list[int]:
    return [s.budget for s in run.stats.layers]


def _check_layer(st, size: int, window: int, newest: int):
    pos = st.positions[0]  # [H_kv, size]
    assert pos.shape[-1] == size
    assert bool((pos[:, 1:] > pos[:, :-1]).all()), "order kept"
    assert torch.equal(pos[:, -window:], torch.arange(newest - window + 1, newest + 1).expand(pos.shape[0], window))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,params", _policies())
def test_prefill_laws(arch, name, params):
    model = tiny_model(arch, layers=4)
    T, budget = 40, 16
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(2))
    kept = []
    for _ in range(2):
        cache = DynamicCache()
        with torch.no_grad(), evictkit.compress(model, name, budget=budget, **params) as run:
            model(ids, **cache_arg(model, cache))
        budgets = _budgets(run)
        if name == "pyramidkv":
            assert budgets == pyramid_budgets(budget, params["window"], 4, T, params["beta"])
            assert len(set(budgets)) > 1
        else:
            assert budgets == [budget] * 4
        for li, b in enumerate(budgets):
            assert cache.layers[li].keys.shape[2] == min(T, b)
            _check_layer(run._layers[li], min(T, b), params["window"], T - 1)
        kept.append([run._layers[li].positions.clone() for li in range(4)])
    assert all(torch.equal(a, b) for a, b in zip(*kept)), "determinism"


@pytest.mark.parametrize(
    "arch,phase,slack", [(arch, "both", 0) for arch in ARCHS] + [("llama", "decode", 3)]
)
@pytest.mark.parametrize("name,params", _policies())
def test_decode_laws(arch, name, params, phase, slack):
    model = tiny_model(arch, layers=4)
    T, budget, steps = 24, 16, 12
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 128, (1, T), generator=g)
    new = torch.randint(3, 128, (steps,), generator=g)
    cache = DynamicCache()
    with torch.no_grad(), evictkit.compress(model, name, budget=budget, phase=phase, slack=slack, **params) as run:
        model(ids, **cache_arg(model, cache))
        budgets = _budgets(run)
        expected = [min(T, b) if phase == "both" else T for b in budgets]
        for step in range(steps):
            model(new[step].view(1, 1), **cache_arg(model, cache))
            newest = T + step
            for li, b in enumerate(budgets):
                expected[li] = b if expected[li] + 1 > b + slack else expected[li] + 1
                size = cache.layers[li].keys.shape[2]
                assert size == expected[li]
                assert size <= b + slack, "never above budget + slack while decoding"
                _check_layer(run._layers[li], size, params["window"], newest)
    assert sum(s.evictions for s in run.stats.layers) > 0


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,params", _policies())
def test_noop_when_budget_covers_everything(arch, name, params):
    model = tiny_model(arch, layers=4)
    assert_generation_unchanged(model, prompt_ids(20, seed=4), name, 8, budget=28, phase="both", **params)


def test_eviction_changes_generation():
    # the no-op test above must be able to fail: a real eviction changes the logits
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        cache = DynamicCache()
        with evictkit.compress(model, "snapkv", budget=10, window=4, kernel=3):
            model(ids, **cache_arg(model, cache))
        step = model(torch.tensor([[7]]), **cache_arg(model, cache)).logits[0, -1]
        ref = model(torch.cat([ids, torch.tensor([[7]])], dim=1)).logits[0, -1]
    assert not torch.allclose(step, ref, atol=1e-4)
    assert torch.isfinite(full).all()


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name,params,param",
    [
        ("snapkv", dict(kernel=4), "kernel"),
        ("snapkv", dict(kernel=0), "kernel"),
        ("snapkv", dict(kernel=-3), "kernel"),
        ("snapkv", dict(window=0), "window"),
        ("snapkv", dict(window=-1), "window"),
        ("snapkv", dict(pool="mean"), "pool"),
        ("snapkv", dict(gqa="sum"), "gqa"),
        ("pyramidkv", dict(kernel=6), "kernel"),
        ("pyramidkv", dict(beta=0), "beta"),
        ("pyramidkv", dict(window=-5), "window"),
        ("h2o_prefill", dict(window=0), "window"),
        ("h2o_prefill", dict(window=True), "window"),
    ],
)
def test_bad_parameters(name, params, param):
    with pytest.raises(ValueError, match=param):
        evictkit.policy(name, **params)


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o_prefill"])
def test_window_must_fit_in_budget(name):
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="window"):
        evictkit.compress(model, name, budget=8, window=8)
    # a fractional budget is resolved at prefill: 10% of 40 tokens = 4 <= window 8
    ids = torch.randint(3, 128, (1, 40))
    with pytest.raises(ValueError, match="window"), evictkit.compress(model, name, budget=0.1, window=8):
        model(ids, **cache_arg(model, DynamicCache()))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_layers_of_different_lengths_decode_in_chunks(attn):
    # PyramidKV leaves layers of different lengths; transformers sizes one mask for all layers
    # (from layer 0) and eager attention adds it unsliced. The core rebuilds it per layer: a chunk
    # of 5 tokens must equal feeding them one by one.
    model = tiny_model("llama", layers=4, attn=attn)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 128, (1, 40), generator=g)
    chunk = torch.randint(3, 128, (1, 5), generator=g)
    outs = []
    for one_by_one in (False, True):
        cache = DynamicCache()
        with torch.no_grad(), evictkit.compress(model, "pyramidkv", budget=16, window=4, kernel=3, beta=4) as run:
            model(ids, **cache_arg(model, cache))
            assert len(set(run.stats.sizes())) == 4
            if one_by_one:
                steps = [model(chunk[:, i : i + 1], **cache_arg(model, cache)).logits for i in range(5)]
                outs.append(torch.cat(steps, dim=1))
            else:
                outs.append(model(chunk, **cache_arg(model, cache)).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    with torch.no_grad(), evictkit.compress(model, "pyramidkv", budget=16, window=4, kernel=3, beta=4):
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    other = tiny_model("llama", layers=4, attn="eager" if attn == "sdpa" else "sdpa")  # same seed, same weights
    with torch.no_grad(), evictkit.compress(other, "pyramidkv", budget=16, window=4, kernel=3, beta=4):
        assert torch.equal(other.generate(ids, max_new_tokens=6, do_sample=False), out)


# --- the shared conformance kit ---------------------------------------------------------------------
from evictkit.specs import conformance_tests  # noqa: E402

TestSnapKVConformance = conformance_tests("snapkv", params={"window": 2, "kernel": 3})
TestPyramidKVConformance = conformance_tests("pyramidkv", params={"window": 2, "kernel": 3, "beta": 4})
TestH2OPrefillConformance = conformance_tests("h2o_prefill", params={"window": 2})
