"""AdaKV: budget allocation golden values, ragged storage (the cache shrinks, padding is masked),
equivalence with per-head masking of the full cache, laws, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import evictkit
from evictkit import ragged, registry
from evictkit.helpers import RaggedSelection
from evictkit.models import attention_modules
from evictkit.plugins.adakv import AdaKV, allocate_head_budgets, mass_share_weights
from evictkit.plugins.pyramidkv import pyramid_budgets
from evictkit.plugins.random import Random
from evictkit.plugins.snapkv import SnapKV

sys.path.insert(0, str(Path(__file__).parent))
from generation import assert_generation_unchanged, prompt_ids  # noqa: E402
from models import tiny_model  # noqa: E402

from evictkit.hf import cache_arg, cache_of

ARCHS = ("llama", "qwen2", "mistral")


# --- allocation ---------------------------------------------------------------------------------

def test_allocation_golden():
    # H=3, per_head B=4 (total 12), alpha=0.25 -> floor 1 each, 9 adaptive units split as 10:2:0 of 12:
    # quotas 7.5, 1.5, 0 -> floors 7, 1, 0; one unit left to the largest remainder (tie -> lower head)
    caps = allocate_head_budgets(torch.tensor([[10, 2, 0]]), 4, 0.25)
    assert caps.tolist() == [[9, 2, 1]]
    # alpha = 0: the global top-k counts themselves; alpha = 1: uniform
    assert allocate_head_budgets(torch.tensor([[10, 2, 0]]), 4, 0.0).tolist() == [[10, 2, 0]]
    assert allocate_head_budgets(torch.tensor([[10, 2, 0]]), 4, 1.0).tolist() == [[4, 4, 4]]
    # a head limit (decode time) moves the excess to the heads that asked most
    caps = allocate_head_budgets(torch.tensor([[10, 2, 0]]), 4, 0.25, limit=torch.tensor([[6, 9, 9]]))
    assert caps.tolist() == [[6, 5, 1]]


@pytest.mark.parametrize("seed", range(30))
def test_allocation_sums_and_floor(seed):
    g = torch.Generator().manual_seed(seed)
    B, H = 2, int(torch.randint(1, 9, (1,), generator=g))
    per_head = int(torch.randint(1, 60, (1,), generator=g))
    alpha = float(torch.rand(1, generator=g))
    # random counts summing to H * per_head, each at most L (the candidates per head)
    L = per_head + int(torch.randint(0, 40, (1,), generator=g))
    counts = torch.zeros(B, H, dtype=torch.long)
    for b in range(B):
        slots = torch.randperm(H * L, generator=g)[: H * per_head] // L
        counts[b] = torch.bincount(slots, minlength=H)
    caps = allocate_head_budgets(counts, per_head, alpha)
    floor_cap = int(alpha * per_head + 1e-9)
    assert bool((caps.sum(-1) == H * per_head).all())
    assert bool((caps >= floor_cap).all())
    assert bool((caps <= L).all())
    exact = floor_cap + counts * (per_head - floor_cap) / per_head
    assert bool(((caps - exact).abs() < 1).all())


# --- the reference's options: normalize, skip, pyram_mode ---------------------------------------

# Two heads, four evictable slots and one window slot each. Head 0 is concentrated (its top 2 hold
# 0.70 of 0.72), head 1 flat but higher (top 2: 0.69 of 1.34).
_SCORES = torch.tensor([[[0.40, 0.30, 0.01, 0.01, 9.0], [0.35, 0.34, 0.33, 0.32, 9.0]]])


def _select_on(scores, policy, monkeypatch, layer_idx=0):
    monkeypatch.setattr(AdaKV, "score", lambda self, obs: scores)
    obs = type("Obs", (), {"valid": None, "layer_idx": layer_idx})()
    return policy.select(obs, 3)  # budget 3 = window 1 + B = 2 per head, 4 picks in the layer


def test_normalize_by_hand(monkeypatch):
    candidate = torch.tensor([[[True] * 4 + [False]] * 2])
    weights = mass_share_weights(_SCORES, candidate, 2)
    torch.testing.assert_close(weights.flatten(), torch.tensor([0.70 / 0.72, 0.69 / 1.34]))
    # plain: the global top 4 are 0.40 (head 0), 0.35, 0.34, 0.33 (head 1) -> caps 1, 3
    _, kept = _select_on(_SCORES, AdaKV(window=1, alpha=0.0), monkeypatch)
    assert kept.tolist() == [[1 + 1, 3 + 1]]
    # weighted: 0.389, 0.292 (head 0) beat 0.180, 0.175 (head 1) -> caps 2, 2
    idx, kept = _select_on(_SCORES, AdaKV(window=1, alpha=0.0, normalize=True), monkeypatch)
    assert kept.tolist() == [[3, 3]]
    assert idx.tolist() == [[[0, 1, 4], [0, 1, 4]]]


def test_skip_gives_lower_layers_uniform_caps(monkeypatch):
    policy = AdaKV(window=1, alpha=0.0, skip=1)
    assert _select_on(_SCORES, policy, monkeypatch, layer_idx=0)[1].tolist() == [[3, 3]]
    assert _select_on(_SCORES, policy, monkeypatch, layer_idx=1)[1].tolist() == [[2, 4]]


def test_skip_layers_keep_what_snapkv_keeps():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(0))
    _, ada, _ = _prefill(model, ids, AdaKV(window=4, alpha=0.0, skip=1), 16)
    _, snap, _ = _prefill(model, ids, evictkit.policy("snapkv", window=4), 16)
    assert [len(k) for k in _kept_sets(ada, 0)] == [16, 16]
    assert all(torch.equal(a, b) for a, b in zip(_kept_sets(ada, 0), _kept_sets(snap, 0)))
    assert len({len(k) for k in _kept_sets(ada, 1)}) > 1  # layer 1 still adapts


def test_pyram_mode_takes_pyramidkv_layer_budgets():
    model = tiny_model("qwen2", layers=4)
    ids = torch.randint(3, 128, (1, 64), generator=torch.Generator().manual_seed(1))
    _, run, _ = _prefill(model, ids, AdaKV(window=4, alpha=0.2, pyram_mode=True, pyram_beta=20), 16)
    want = pyramid_budgets(16, 4, 4, 64, 20)
    assert len(set(want)) > 1
    assert [s.entries for s in run.stats.layers] == [2 * b for b in want]


# --- ragged storage -----------------------------------------------------------------------------

def _prefill(model, ids, policy, budget, **kw):
    cache = DynamicCache()
    run = evictkit.compress(model, policy, budget=budget, **kw)
    with torch.no_grad(), run:
        logits = model(ids, **cache_arg(model, cache)).logits
    return cache, run, logits


def _kept_sets(run, layer):
    """Per head, the real kept positions (padding has position -1)."""
    pos = run._layers[layer].positions[0]
    return [p[p >= 0] for p in pos]


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_really_shrinks_with_ragged_heads(arch):
    model = tiny_model(arch, layers=2)
    T, budget, window = 64, 16, 4
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(0))
    cache, run, _ = _prefill(model, ids, AdaKV(window=window, alpha=0.0), budget)
    ragged_layers = 0
    for li in range(2):
        st = run._layers[li]
        kept = _kept_sets(run, li)
        counts = [len(k) for k in kept]
        assert sum(counts) == 2 * budget  # the layer total, H_kv * budget
        assert cache.layers[li].keys.shape[2] == max(counts) < T  # physically smaller than the prompt
        assert run.stats.layers[li].entries == 2 * budget
        for k in kept:
            assert bool((k[1:] > k[:-1]).all())
            assert k[-window:].tolist() == list(range(T - window, T))
        if len(set(counts)) > 1:
            ragged_layers += 1
            assert st.pad is not None and st.pad.tolist() == [[max(counts) - c for c in counts]]
    assert ragged_layers > 0, "alpha=0 on a random model should give uneven heads"


def _masked_reference_decode(model, ids, kept_by_layer, tokens):
    """Full cache, no eviction; per-head masks hide exactly the entries the compression evicted."""
    handles = []
    n_heads = model.config.num_attention_heads

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"]
        past = cache_of(kwargs).layers[module.layer_idx].get_seq_length()
        q = hidden.shape[1]
        kept = kept_by_layer[module.layer_idx]  # list over KV heads of kept positions
        visible = torch.zeros(len(kept), past + q, dtype=torch.bool)
        for h, k in enumerate(kept):
            visible[h, k] = True
        visible[:, prompt:] = True  # every decoded token, the new one included (q == 1)
        visible = visible.repeat_interleave(n_heads // len(kept), dim=0)[None, :, None, :]
        mask = kwargs.get("attention_mask")
        if model.config._attn_implementation == "eager":
            visible = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
        elif mask is not None and mask.dtype != torch.bool:
            raise AssertionError("unexpected mask dtype")
        kwargs = dict(kwargs, attention_mask=visible)
        return args, kwargs

    prompt = ids.shape[1]
    cache = DynamicCache()
    out = []
    with torch.no_grad():
        model(ids, **cache_arg(model, cache))
        for m in attention_modules(model):
            handles.append(m.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            for t in tokens:
                out.append(model(t.view(1, 1), **cache_arg(model, cache)).logits[0, -1])
        finally:
            for h in handles:
                h.remove()
    return torch.stack(out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_ragged_decode_equals_masking_the_full_cache(arch, attn):
    model = tiny_model(arch, layers=2, attn=attn)
    T, budget = 48, 12
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (1, T), generator=g)
    tokens = torch.randint(3, 128, (6,), generator=g)
    cache = DynamicCache()
    run = evictkit.compress(model, AdaKV(window=4, alpha=0.0), budget=budget)
    with torch.no_grad(), run:
        model(ids, **cache_arg(model, cache))
        kept = {li: _kept_sets(run, li) for li in range(2)}
        assert any(len({len(k) for k in kept[li]}) > 1 for li in range(2)), "needs uneven heads"
        got = torch.stack([model(t.view(1, 1), **cache_arg(model, cache)).logits[0, -1] for t in tokens])
    ref = _masked_reference_decode(model, ids, kept, tokens)
    assert torch.allclose(got, ref, atol=1e-5)
    # and the comparison can fail: without the per-head masks the logits differ
    full = _masked_reference_decode(model, ids, {li: [torch.arange(T)] * 2 for li in range(2)}, tokens)
    assert not torch.allclose(got, full, atol=1e-3)


def test_ragged_multi_token_forward_is_causal():
    # a second chunk of several tokens after a ragged prefill: equal to feeding them one by one
    model = tiny_model("llama", layers=2)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (1, 40), generator=g)
    chunk = torch.randint(3, 128, (1, 5), generator=g)
    outs = []
    for one_by_one in (False, True):
        cache = DynamicCache()
        with torch.no_grad(), evictkit.compress(model, AdaKV(window=4, alpha=0.0), budget=12) as run:
            model(ids, **cache_arg(model, cache))
            assert any(run._layers[li].pad is not None for li in range(2))
            if one_by_one:
                steps = [model(chunk[:, i : i + 1], **cache_arg(model, cache)).logits for i in range(5)]
                outs.append(torch.cat(steps, dim=1))
            else:
                outs.append(model(chunk, **cache_arg(model, cache)).logits)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_batch_rows_match_single_runs():
    # two sequences in one batch get their own per-head counts; each row decodes as it would alone
    model = tiny_model("qwen2", layers=2)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, 128, (2, 40), generator=g)
    tokens = torch.randint(3, 128, (2, 4), generator=g)

    def decode(rows, toks):
        cache = DynamicCache()
        with torch.no_grad(), evictkit.compress(model, AdaKV(window=4, alpha=0.0), budget=12) as run:
            model(rows, **cache_arg(model, cache))
            steps = [model(toks[:, i : i + 1], **cache_arg(model, cache)).logits for i in range(toks.shape[1])]
            logits = torch.cat(steps, 1)
        return logits, run

    both, run = decode(ids, tokens)
    assert [s.entries for s in run.stats.layers] == [2 * (12 + 4)] * 2  # per batch row, after 4 steps
    for b in range(2):
        alone, _ = decode(ids[b : b + 1], tokens[b : b + 1])
        assert torch.allclose(both[b : b + 1], alone, atol=1e-5)


# --- laws ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 1.0])
def test_prefill_laws_and_determinism(arch, alpha):
    model = tiny_model(arch, layers=2)
    T, budget, window = 40, 14, 4
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(3))
    runs = [_prefill(model, ids, AdaKV(window=window, alpha=alpha), budget)[1] for _ in range(2)]
    for li in range(2):
        kept = _kept_sets(runs[0], li)
        assert sum(len(k) for k in kept) == 2 * budget
        assert min(len(k) for k in kept) >= window + int(alpha * (budget - window) + 1e-9)
        if alpha == 1.0:
            assert runs[0]._layers[li].pad is None and all(len(k) == budget for k in kept)
        assert torch.equal(runs[0]._layers[li].positions, runs[1]._layers[li].positions)


@pytest.mark.parametrize("arch,phase,slack", [(arch, "both", 0) for arch in ARCHS] + [("llama", "decode", 2)])
def test_decode_laws(arch, phase, slack):
    model = tiny_model(arch, layers=2)
    T, budget, window, steps = 24, 12, 4, 10
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 128, (1, T), generator=g)
    new = torch.randint(3, 128, (steps,), generator=g)
    cache = DynamicCache()
    with torch.no_grad(), evictkit.compress(
        model, AdaKV(window=window, alpha=0.1), budget=budget, phase=phase, slack=slack
    ) as run:
        model(ids, **cache_arg(model, cache))
        for step in range(steps):
            model(new[step].view(1, 1), **cache_arg(model, cache))
            newest = T + step
            for li in range(2):
                kept = _kept_sets(run, li)
                total = sum(len(k) for k in kept)
                assert total <= 2 * (budget + slack), "never above budget + slack (layer total)"
                assert run.stats.layers[li].entries == total
                for k in kept:
                    assert bool((k[1:] > k[:-1]).all())
                    assert k[-window:].tolist() == list(range(newest - window + 1, newest + 1))
    assert sum(s.evictions for s in run.stats.layers) >= 4


@pytest.mark.parametrize("arch", ARCHS)
def test_noop(arch):
    model = tiny_model(arch, layers=2)
    assert_generation_unchanged(model, prompt_ids(20, seed=5), "adakv", 8, budget=28, window=4, phase="both")


def test_generate_with_ragged_cache_runs_and_uses_true_positions():
    model = tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), evictkit.compress(model, "adakv", budget=16, window=4, alpha=0.0) as run:
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 54
    assert run._layers[0].seen == 53
    assert all(s.entries == 2 * (16 + 5) for s in run.stats.layers)


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "params,param",
    [
        (dict(alpha=-0.1), "alpha"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha="high"), "alpha"),
        (dict(window=0), "window"),
        (dict(window=-2), "window"),
        (dict(scorer="streaming_llm"), "scorer"),
        (dict(scorer="no_such_policy"), "scorer"),
        (dict(scorer="adakv"), "scorer"),
        (dict(scorer_options={"kernel": 4}), "kernel"),
        (dict(scorer_options={"window": 4}), "window"),
        (dict(normalize="yes"), "normalize"),
        (dict(skip=-1), "skip"),
        (dict(pyram_mode=1), "pyram_mode"),
        (dict(pyram_beta=0), "pyram_beta"),
    ],
)
def test_bad_parameters(params, param):
    with pytest.raises(ValueError, match=param):
        evictkit.policy("adakv", **params)


def test_window_must_fit_in_budget():
    model = tiny_model("llama", layers=2)
    with pytest.raises(ValueError, match="window"):
        evictkit.compress(model, "adakv", budget=32, window=32)


def test_other_scorers_and_options():
    p = evictkit.policy("adakv", scorer="h2o_prefill", window=4)
    assert p.protected() == (0, 4)
    p = evictkit.policy("adakv", scorer_options={"kernel": 3, "pool": "avg"}, window=4)
    assert p.scorer_options == (("kernel", 3), ("pool", "avg"))
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(7))
    cache, run, _ = _prefill(model, ids, evictkit.policy("adakv", scorer="h2o_prefill", window=4), 12)
    assert all(s.entries == 24 for s in run.stats.layers)


# --- the wrapper: a scorer instance, the registry only for a name ----------------------------------

def test_scorer_instance_keeps_what_the_name_keeps():
    model = tiny_model("qwen2", layers=2)
    ids = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(3))
    by_instance = AdaKV(scorer=SnapKV(window=4, kernel=3), window=4, alpha=0.1)
    by_name = evictkit.policy("adakv", window=4, alpha=0.1, scorer_options={"kernel": 3})
    assert by_instance.protected() == by_name.protected() and by_instance.needs() == by_name.needs()
    _, a, _ = _prefill(model, ids, by_instance, 12)
    _, b, _ = _prefill(model, ids, by_name, 12)
    for layer in range(2):
        assert [k.tolist() for k in _kept_sets(a, layer)] == [k.tolist() for k in _kept_sets(b, layer)]


def test_scorer_instance_loads_no_plugin(monkeypatch):
    fresh = registry.Registry()
    monkeypatch.setattr(registry, "_registry", fresh)
    AdaKV(scorer=SnapKV(window=8), window=8, pyram_mode=True)
    assert not fresh._loaded  # nothing looked up: constructing a policy loads no plugin


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(window=32), "window=32: must equal the window of the scorer instance"),
        (dict(window=8, scorer_options={"kernel": 3}), "scorer_options=.*only for a scorer given by name"),
    ],
)
def test_scorer_instance_bad_parameters(params, message):
    with pytest.raises(ValueError, match=message):
        AdaKV(scorer=SnapKV(window=8), **params)


def test_scorer_instance_must_be_a_windowed_scorer():
    with pytest.raises(ValueError, match="scorer=AdaKV"):
        AdaKV(scorer=AdaKV(window=4), window=4)
    with pytest.raises(ValueError, match="scorer=Random"):
        AdaKV(scorer=Random())


def test_select_returns_a_ragged_selection(monkeypatch):
    sel = _select_on(_SCORES, AdaKV(window=1, alpha=0.0), monkeypatch)
    assert isinstance(sel, RaggedSelection)
    assert sel.idx.dtype == sel.counts.dtype == torch.int64


def test_ragged_selection_is_validated():
    idx = torch.tensor([[[0, 1, 5], [0, 2, 5]]])
    with pytest.raises(ValueError, match="entries per layer"):
        ragged.check_ragged(idx, torch.tensor([[3, 2]]), None, 1, 2, 6, 3, "p", "sdpa")
    with pytest.raises(ValueError, match="increasing"):
        bad = torch.tensor([[[0, 5, 1], [0, 2, 5]]])
        ragged.check_ragged(bad, torch.tensor([[3, 3]]), None, 1, 2, 6, 3, "p", "sdpa")
    with pytest.raises(ValueError, match="attn_implementation"):
        ragged.check_ragged(idx, torch.tensor([[3, 1]]), None, 1, 2, 6, 2, "p", "flash_attention_2")
    with pytest.raises(ValueError, match="padding slot"):
        ragged.check_ragged(idx, torch.tensor([[3, 1]]), torch.tensor([[1, 0]]), 1, 2, 6, 2, "p", "sdpa")
    gather, pad = ragged.check_ragged(idx, torch.tensor([[3, 1]]), None, 1, 2, 6, 2, "p", "sdpa")
    assert pad.tolist() == [[0, 2]] and gather.tolist() == [[[0, 1, 5], [0, 0, 5]]]


# --- the shared conformance kit -----------------------------------------------------------------
from evictkit.specs import conformance_tests  # noqa: E402

TestAdaKVConformance = conformance_tests("adakv", params={"window": 2, "alpha": 0.0})
