"""ReST-KV (plugins/restkv.py, plugins/_restkv_math.py): the closed form against brute force,
EMA and AWS on hand-computed cases, a plain re-implementation of the released scorer, the cache
laws on tiny models for every ablation switch, memory, validation and low precision."""

from __future__ import annotations

import itertools
import json
import math
import types

import pytest
import torch
import torch.nn.functional as F
from generation import prompt_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from models import tiny_model

import evictkit
from evictkit.hf import cache_of
from evictkit.plugins import _restkv_aws as AWS
from evictkit.plugins import _restkv_math as M
from evictkit.plugins.restkv import RestKV

ARCHS = ("llama", "qwen2", "mistral")


# --- 1. the closed form is the exact single-token output change ------------------------------
def _brute_force_change(logits: torch.Tensor, v: torch.Tensor, wo: torch.Tensor) -> torch.Tensor:
    """||W_O o - W_O o'_j|| for every j, o'_j = attention output with key j removed and the
    softmax recomputed over the remaining logits (no shortcut through a/(1-a))."""
    full = wo @ (torch.softmax(logits, -1) @ v)
    out = []
    for j in range(logits.shape[-1]):
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep[j] = False
        o_j = torch.softmax(logits[keep], -1) @ v[keep]
        out.append((full - wo @ o_j).norm())
    return torch.stack(out)


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_equals_brute_force_removal(seed, monkeypatch):
    monkeypatch.setitem(M.CHUNK_ELEMS, "cpu", 1)  # 64-key chunks for the chunked variant
    g = torch.Generator().manual_seed(seed)
    n, d, hidden = 150, 8, 24
    logits = torch.randn(n, generator=g, dtype=torch.float64) * 2.0
    if seed == 3:
        logits[5] += 9.0  # one dominant key: a_5 ~ 0.99, the odds ratio is large
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    wo = torch.randn(hidden, d, generator=g, dtype=torch.float64)
    a = torch.softmax(logits, -1)
    o = a @ v
    closed = M.reconstruction_scores(a, v, o, wo.T @ wo)
    torch.testing.assert_close(closed, _brute_force_change(logits, v, wo), rtol=1e-9, atol=1e-12)
    chunked = M.chunked_reconstruction_scores(a, v, o, wo.T @ wo)
    torch.testing.assert_close(chunked, closed, rtol=1e-12, atol=0)


def test_per_query_scores_equal_brute_force():
    """metric_mode="before": every window query's score of every prefix key is its exact
    output change (o_t over all keys its causal mask allows), through the expanded Gram form."""
    g = torch.Generator().manual_seed(7)
    T, w, d, hidden = 30, 4, 8, 20
    logits = torch.randn(w, T, generator=g, dtype=torch.float64) * 2.0
    for t in range(w):  # query t sits at position T - w + t
        logits[t, T - w + t + 1 :] = float("-inf")
    v = torch.randn(T, d, generator=g, dtype=torch.float64)
    wo = torch.randn(hidden, d, generator=g, dtype=torch.float64)
    attn = torch.softmax(logits, -1)
    got = M.reconstruction_scores_per_query(
        attn.view(1, 1, 1, w, T), v.view(1, 1, T, d), (wo.T @ wo).view(1, 1, d, d), T - w
    )
    for t in range(w):
        visible = T - w + t + 1
        want = _brute_force_change(logits[t, :visible], v[:visible], wo)[: T - w]
        torch.testing.assert_close(got[0, 0, 0, t], want, rtol=1e-9, atol=1e-12)


def test_odds_ratio_is_clamped():
    a = torch.tensor([0.0, 0.5, 1.0, 1.0 - 1e-9])
    r = M.odds_ratio(a)
    assert torch.isfinite(r).all()
    assert r[1] == 1.0 and r[2] == pytest.approx(1 / M.ODDS_EPS)


# --- 2. the Gram form ------------------------------------------------------------------------
def test_gram_form_equals_naive_projection():
    g = torch.Generator().manual_seed(1)
    H, d, hidden, n = 3, 8, 40, 25
    proj = torch.nn.Linear(H * d, hidden, bias=False).double()
    with torch.no_grad():
        proj.weight.copy_(torch.randn(hidden, H * d, generator=g, dtype=torch.float64))
    x = torch.randn(H, n, d, generator=g, dtype=torch.float64)
    gram = M.head_grams(proj.weight, H, dtype=torch.float64)
    got = M.gram_norm(x, gram)
    # naive: put x in head h's slot of the concatenated head outputs and run the real o_proj
    for h in range(H):
        full = torch.zeros(n, H * d, dtype=torch.float64)
        full[:, h * d : (h + 1) * d] = x[h]
        torch.testing.assert_close(got[h], proj(full).norm(dim=-1), rtol=1e-10, atol=1e-12)


# --- 3. EMA ----------------------------------------------------------------------------------
ROWS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    "mode, want",
    [
        ("ema", [1.25, 1.25]),  # s=[1,0]; s=.5[0,1]+.5s=[.5,.5]; s=.5[2,2]+.5s=[1.25,1.25]
        ("inv_ema", [1.0, 0.75]),  # s=[2,2]; s=.5[0,1]+.5s=[1,1.5]; s=.5[1,0]+.5s=[1,.75]
        ("mean", [1.0, 1.0]),
        ("none", [2.0, 2.0]),
    ],
)
def test_temporal_hand_computed(mode, want):
    c = M.temporal_weights(3, mode, 0.5, dtype=torch.float64)
    torch.testing.assert_close(M.aggregate(ROWS, c), torch.tensor(want, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.3, 0.77, 1.0])
def test_ema_weights_equal_the_recursion(alpha):
    rows = torch.rand(2, 3, 32, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    s = rows[..., 0, :]
    for t in range(1, rows.shape[-2]):
        s = alpha * rows[..., t, :] + (1 - alpha) * s
    c = M.temporal_weights(32, "ema", alpha, dtype=torch.float64)
    torch.testing.assert_close(M.aggregate(rows, c), s, rtol=1e-12, atol=1e-14)
    assert float(c.sum()) == pytest.approx(1.0)


# --- 4. AWS ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "t, k, shift, ref_shift",
    [
        (0.0, 5, 0, 1),  # t = 0: truncation gives 0; the released code's branch gives +1
        (1999.0, 5, 0, 0),
        (-1999.0, 5, 0, 0),
        (2000.0, 5, 1, 1),  # 2*1+1 = 3 < k_min
        (-2000.0, 5, -1, 0),  # exact negative multiple: the code's floor+1 gives 0
        (-2500.0, 5, -1, -1),
        (4000.5, 5, 2, 2),
        (6500.0, 7, 3, 3),  # |t| >= 3 beta: the kernel grows past k_min, shift = k//2 (one-sided)
        (-6500.0, 7, -3, -3),
        (20000.0, 21, 10, 10),
    ],
)
def test_aws_kernel_and_shift(t, k, shift, ref_shift):
    kk, sh = M.aws_kernel(torch.tensor([t]), 2000.0, 5)
    assert (int(kk), int(sh)) == (k, shift)
    _, ref = M.aws_kernel(torch.tensor([t]), 2000.0, 5, reference_edge=True)
    assert int(ref) == ref_shift
    # the code's expression, literally
    tt = torch.tensor([t])
    assert int(torch.where(tt > 0, tt // 2000, tt // 2000 + 1)) == ref_shift


def test_shifted_pool_hand_computed():
    s = torch.tensor([[1.0, 2, 3, 4, 5, 6]] * 4, dtype=torch.float64)
    k = torch.tensor([3, 3, 3, 5])
    shift = torch.tensor([0, 1, -1, 2])
    got = M.shifted_avg_pool(s, k, shift)
    want = torch.tensor(
        [
            [4 / 3, 2, 3, 4, 5, 17 / 3],  # pad 1|1: [1,1,2,3,4,5,6,6]
            [2, 3, 4, 5, 17 / 3, 6],  # pad 0|2: [1,2,3,4,5,6,6,6]
            [1, 4 / 3, 2, 3, 4, 5],  # pad 2|0: [1,1,1,2,3,4,5,6]
            [3, 4, 4.8, 5.4, 5.8, 6],  # pad 0|4, k=5: mean of s[i..i+4] (one-sided window)
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(got, want)


def test_shifted_pool_equals_reference_loop():
    """Against the released code's per-head loop: replicate pad (k//2 - shift, k//2 + shift),
    avg_pool1d(k, stride 1)."""
    gen = torch.Generator().manual_seed(3)
    s = torch.rand(2, 5, 37, generator=gen, dtype=torch.float64)
    k = torch.tensor([[5, 5, 7, 3, 21], [1, 9, 5, 5, 7]])
    shift = torch.tensor([[0, 2, -3, 1, 10], [0, -4, -2, 0, 3]])
    got = M.shifted_avg_pool(s, k, shift)
    for b in range(2):
        for h in range(5):
            kk, sh = int(k[b, h]), int(shift[b, h])
            padded = F.pad(s[b, h].view(1, 1, -1), (kk // 2 - sh, kk // 2 + sh), mode="replicate")
            want = F.avg_pool1d(padded, kk, stride=1).view(-1)
            assert want.shape[-1] == s.shape[-1]
            torch.testing.assert_close(got[b, h], want)


def test_shifted_pool_brute_force_any_shift_and_fp32_range():
    """Windows reaching past either edge, |shift| > k//2 (the window off the row entirely), and
    fp32 scores spanning 12 orders of magnitude: the mean of s[clamp(j)] computed slot by slot."""
    gen = torch.Generator().manual_seed(5)
    n = 23
    s = torch.rand(3, 4, n, generator=gen) * torch.logspace(-6, 6, n)
    k = torch.randint(0, 8, (3, 4), generator=gen) * 2 + 1
    shift = torch.randint(-40, 41, (3, 4), generator=gen)
    got = M.shifted_avg_pool(s, k, shift)
    assert got.dtype == torch.float32
    for b in range(3):
        for h in range(4):
            kk, sh = int(k[b, h]), int(shift[b, h])
            for i in range(n):
                j = torch.arange(i + sh - kk // 2, i + sh + kk // 2 + 1).clamp(0, n - 1)
                want = s[b, h].double()[j].mean().float()
                torch.testing.assert_close(got[b, h, i], want, rtol=1e-6, atol=0)


def test_aws_drift_hand_computed():
    T = 10
    attn = torch.zeros(5, T)
    ranks = [0.9, 0.5]  # the two largest weights of each row; the rest stays below 0.1
    tops = {0: (2, 3), 1: (2, 5), 2: (0, 1), 3: (8, 9), 4: (7, 9)}  # row 2 is the odd middle one
    for row, pos in tops.items():
        attn[row] = torch.linspace(0.01, 0.05, T)
        attn[row, list(pos)] = torch.tensor(ranks)
    # front = rows 0,1: mean(2,3,2,5) = 3; rear = rows 3,4: mean(8,9,7,9) = 8.25
    assert float(M.aws_drift(attn, 2)) == pytest.approx(3 - 8.25)
    assert float(M.aws_drift(attn[:4], 2)) == pytest.approx((2 + 3 + 2 + 5) / 4 - (0 + 1 + 8 + 9) / 4)
    assert float(M.aws_drift(attn[:1], 2)) == 0.0  # one query: no halves


def _drifting_attention(data, lead=(2, 3)):
    """Random window attention [*lead, w, T] whose front queries lean to early keys and rear
    ones to late keys by a random amount (drifts anywhere in +-T), sometimes with many ties."""
    w = data.draw(st.integers(1, 9), label="w")
    T = data.draw(st.integers(20, 400), label="T")
    k = data.draw(st.integers(1, T), label="k")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    lean = data.draw(st.floats(-8.0, 8.0), label="lean")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*lead, w, T, generator=gen)
    ramp = torch.linspace(0.0, lean, T)
    x[..., : w // 2, :] *= torch.exp(-ramp)
    x[..., w // 2 :, :] *= torch.exp(ramp)
    if data.draw(st.booleans(), label="ties"):
        x = (x * 4).round() / 4
    return x, k


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_drift_bounds_contain_the_exact_drift(data):
    attn, k = _drifting_attention(data)
    exact = M.aws_drift(attn, k)
    lo, hi = M.aws_drift_bounds(attn, k)
    assert (lo <= exact + 1e-9).all() and (exact <= hi + 1e-9).all()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_aws_params_equal_the_exact_top_k(data):
    """The bound-then-verify path gives the kernel and shift of the exact drift, for betas that
    put steps anywhere in the drift's range (including right at the bounds)."""
    attn, k = _drifting_attention(data)
    T, w = attn.shape[-1], attn.shape[-2]
    beta = data.draw(st.integers(1, max(1, T - k)), label="beta")
    want = M.aws_kernel(M.aws_drift(attn, k), float(beta), 5)
    got = M.aws_params(attn, k + w, float(beta), 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_aws_params_falls_back_when_the_bounds_straddle_a_step(monkeypatch):
    """A drift sitting on a step of beta cannot be settled by the bounds: the exact top-k runs."""
    attn = torch.zeros(1, 1, 2, 100)
    attn[0, 0, 0, 60:70] = 1.0  # front query: top-10 at 60..69, mean 64.5
    attn[0, 0, 1, 10:20] = 1.0  # rear query: 10..19, mean 14.5 -> t = 50
    calls = []
    real = M.aws_drift
    monkeypatch.setattr(AWS, "aws_drift", lambda a, k: calls.append(a.shape) or real(a, k))
    kernel, shift = M.aws_params(attn, 12, 50.0, 5)  # budget 12, w 2: k = 10; t / beta = 1 exactly
    assert calls == [(1, 2, 100)]  # one head, re-run exactly
    assert (int(kernel), int(shift)) == (5, 1)
    calls.clear()
    kernel, shift = M.aws_params(attn, 12, 80.0, 5)  # t = 50 inside (-80, 80): settled by the bounds
    assert calls == [] and (int(kernel), int(shift)) == (5, 0)


# --- 5. the whole scorer against a plain re-implementation of the released code --------------
def _released_scorer(q, k, v, wo, budget, w, alpha, beta, k_min):
    """MHA, batch 1, float64, written like restkv_utils.RestKVCluster (after mode, EMA loop,
    naive [H, L, hidden] projection, argsort, per-head pad + avg_pool1d) but with the truncated
    shift evictkit documents. q, k, v: [H, L, d]; wo: [hidden, H*d]. returns [H, L - w]."""
    H, L, d = q.shape
    logits = q[:, L - w :] @ k.transpose(1, 2) / math.sqrt(d)
    causal = torch.arange(L)[None, :] > torch.arange(L - w, L)[:, None]
    attn = torch.softmax(logits.masked_fill(causal, float("-inf")), -1)  # [H, w, L]
    a = attn[:, 0, : L - w]
    for t in range(1, w):
        a = alpha * attn[:, t, : L - w] + (1 - alpha) * a
    o = torch.einsum("hl,hld->hd", a, v[:, : L - w])
    wo3 = wo.reshape(-1, H, d)
    po = torch.einsum("hd,chd->hc", o, wo3)
    pv = torch.einsum("hld,chd->hlc", v, wo3)
    score = a / (1 - a) * (po[:, None] - pv[:, : L - w]).norm(dim=-1)
    n = budget - w
    top_first = attn[:, : w // 2].argsort(-1)[..., L - n :]
    top_second = attn[:, w // 2 :].argsort(-1)[..., L - n :]
    t_shift = (top_first - top_second).double().mean((1, 2))
    out = []
    for h in range(H):
        kk = max(k_min, int(2 * (t_shift[h].abs() // beta) + 1))
        sh = int(torch.trunc(t_shift[h] / beta))
        padded = F.pad(score[h].view(1, 1, -1), (kk // 2 - sh, kk // 2 + sh), mode="replicate")
        out.append(F.avg_pool1d(padded, kk, stride=1).view(-1))
    return torch.stack(out)


@pytest.mark.parametrize("beta", [2000.0, 3.0])  # 3.0: drifts of a few tokens grow and shift the kernel
def test_scorer_matches_released_code(beta):
    gen = torch.Generator().manual_seed(5)
    H, L, d, hidden, w, budget = 3, 64, 8, 20, 8, 24
    q = torch.randn(H, L, d, generator=gen, dtype=torch.float64)
    k = torch.randn(H, L, d, generator=gen, dtype=torch.float64)
    v = torch.randn(H, L, d, generator=gen, dtype=torch.float64)
    wo = torch.randn(hidden, H * d, generator=gen, dtype=torch.float64)
    # evictkit's own window attention (causal by position)
    from evictkit.attention import attention_weights

    pos = torch.arange(L).view(1, 1, L).expand(1, H, L)
    attn = attention_weights(q[None, :, L - w :], k[None], torch.arange(L - w, L)[None], pos, d**-0.5).double()
    got = M.restkv_scores(attn, v[None], M.head_grams(wo, H, dtype=torch.float64), budget=budget, beta=beta)
    want = _released_scorer(q, k, v, wo, budget, w, 0.3, beta, 5)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-7)  # attention_weights runs in fp32
    if beta == 3.0:
        t = M.aws_drift(attn, budget - w)
        assert (M.aws_kernel(t, beta, 5)[0] > 5).any() or (M.aws_kernel(t, beta, 5)[1] != 0).any()


def test_drift_skip_is_exact():
    """When T - (budget - w) < beta the top-k is skipped: same result as computing the drift."""
    gen = torch.Generator().manual_seed(9)
    attn = torch.softmax(torch.randn(1, 2, 8, 100, generator=gen) * 3, -1)
    v = torch.randn(1, 2, 100, 4, generator=gen)
    gram = torch.eye(4).expand(2, 4, 4)
    beta = 100 - (40 - 8) + 1  # just above the bound T - k
    got = M.restkv_scores(attn, v, gram, budget=40, beta=beta)
    t = M.aws_drift(attn, 40 - 8)
    assert (t.abs() < beta).all()
    plain = M.restkv_scores(attn, v, gram, budget=40, spatial="none")
    torch.testing.assert_close(got, M.shifted_avg_pool(plain, *M.aws_kernel(t, beta, 5)))


# --- 6. the cache laws on tiny models, every ablation switch ---------------------------------
def _cache(out):
    return cache_of(out)


@pytest.fixture(scope="module", params=ARCHS)
def arch_run(request):
    model = tiny_model(request.param)
    ids = prompt_ids(40)
    with torch.no_grad():
        full = _cache(model(ids, use_cache=True))
    return model, ids, [(layer.keys.clone(), layer.values.clone()) for layer in full.layers]


def _run(model, ids, budget, **params):
    with torch.no_grad(), evictkit.compress(model, "restkv", budget=budget, **params) as run:
        cache = _cache(model(ids, use_cache=True))
    return run, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _kept_indices(kept: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Slot of each kept key in the full cache, per head: [B, H, K] (exact row match)."""
    eq = (kept[:, :, :, None, :] == full[:, :, None, :, :]).all(-1)  # [B, H, K, T]
    assert bool((eq.sum(-1) == 1).all()), "a kept key is not an unique key of the full cache"
    return eq.float().argmax(-1)


COMBOS = list(itertools.product(M.INDICATORS, M.TEMPORALS, M.SPATIALS))


@pytest.mark.parametrize("indicator, temporal, spatial", COMBOS)
def test_laws_every_switch(arch_run, indicator, temporal, spatial):
    model, ids, full = arch_run
    T, budget, window = ids.shape[1], 24, 8
    params = dict(indicator=indicator, temporal=temporal, spatial=spatial, window=window)
    run, cache = _run(model, ids, budget, **params)
    _, again = _run(model, ids, budget, **params)
    assert run.stats.sizes() == [budget] * len(full)
    assert [s.after_prefill for s in run.stats.layers] == [budget] * len(full)
    for (k, v), (fk, fv), (k2, v2) in zip(cache, full, again):
        assert k.shape[2] == v.shape[2] == budget
        assert k.dtype == fk.dtype and torch.isfinite(k).all()
        idx = _kept_indices(k, fk)
        assert bool((idx[..., 1:] > idx[..., :-1]).all()), "kept entries left their original order"
        assert bool((idx[..., -window:] == torch.arange(T - window, T)).all()), "window not kept"
        torch.testing.assert_close(k[:, :, -window:], fk[:, :, -window:], rtol=0, atol=0)
        torch.testing.assert_close(v, fv.gather(2, idx[..., None].expand_as(v)), rtol=0, atol=0)
        assert torch.equal(k, k2) and torch.equal(v, v2), "two runs differ"


@pytest.mark.parametrize(
    "params", [dict(metric_mode="before"), dict(gqa="max"), dict(metric_mode="before", gqa="max", alpha=1.0)]
)
def test_laws_other_switches(arch_run, params):
    model, ids, full = arch_run
    run, cache = _run(model, ids, 24, window=8, **params)
    _, again = _run(model, ids, 24, window=8, **params)
    assert run.stats.sizes() == [24] * len(full)
    for (k, _), (fk, _), (k2, _) in zip(cache, full, again):
        idx = _kept_indices(k, fk)
        assert bool((idx[..., -8:] == torch.arange(32, 40)).all())
        assert torch.equal(k, k2)


def test_default_parameters_reach_the_cache(arch_run):
    model, ids, full = arch_run
    long_ids = prompt_ids(80, seed=1)
    with torch.no_grad():
        ref = _cache(model(long_ids, use_cache=True))
    run, cache = _run(model, long_ids, 48)  # window=32 default
    assert run.stats.sizes() == [48] * len(full)
    for (k, _), layer in zip(cache, ref.layers):
        torch.testing.assert_close(k[:, :, -32:], layer.keys[:, :, -32:], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_op_when_prompt_fits(arch):
    model = tiny_model(arch)
    ids = prompt_ids(20)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, do_sample=False)
        full = _cache(model(ids, use_cache=True))
        with evictkit.compress(model, "restkv", budget=20, window=8) as run:
            got = model.generate(ids, max_new_tokens=6, do_sample=False)
        with evictkit.compress(model, "restkv", budget=20, window=8):
            cache = _cache(model(ids, use_cache=True))
    assert torch.equal(got, want)
    assert all(s.evictions == 0 for s in run.stats.layers)
    for layer, ref in zip(cache.layers, full.layers):
        assert torch.equal(layer.keys, ref.keys) and torch.equal(layer.values, ref.values)


def test_generate_and_decode_phase():
    model = tiny_model("llama")
    ids = prompt_ids(40)
    with torch.no_grad(), evictkit.compress(model, "restkv", budget=24, window=8) as run:
        out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == 45
    assert run.stats.sizes() == [24 + 4] * 2  # prefill only: decoded tokens are appended
    with torch.no_grad(), evictkit.compress(model, "restkv", budget=24, window=8, phase="both") as run:
        model.generate(ids, max_new_tokens=5, do_sample=False)
    assert run.stats.sizes() == [24] * 2
    assert all(s.evictions == 5 for s in run.stats.layers)  # prefill + 4 decode steps that overflowed


# --- 7. memory -------------------------------------------------------------------------------
def _allocations(fn) -> tuple[int, int]:
    """(peak bytes live, largest single allocation) of torch's CPU allocator while fn runs.

    torch.profiler with profile_memory=True records every allocation and free of the c10 CPU
    allocator (the one behind every CPU tensor) as a "[memory]" event with its signed size;
    replaying them in order gives the peak of memory that fn itself allocated (inputs made
    before are not counted). tracemalloc cannot see these allocations.
    """
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            data = json.load(fh)
    finally:
        os.unlink(path)
    events = data["traceEvents"] if isinstance(data, dict) else data
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0))
    )
    assert mem, "the profiler recorded no allocation"
    live = peak = biggest = 0
    for e in mem:
        nbytes = int(e["args"]["Bytes"])
        live += nbytes
        peak, biggest = max(peak, live), max(biggest, nbytes)
    return peak, biggest


@pytest.mark.parametrize("metric_mode", ["after", "before"])
def test_scoring_never_materialises_the_projection(metric_mode):
    """At L = 8192 one [Hq, L, hidden] fp32 tensor (what the reference's einsum builds) is
    128 MiB. The whole score step of the policy (Gram matrices, indicator, EMA, AWS, GQA
    reduction), given the window attention, must stay within 2 x (Hq*W*L + Hq*L*d) floats
    (~6 MiB), and no single allocation may reach 1/4 of that [Hq, L, hidden] tensor.
    The measuring method is checked to catch the naive projection (last assertion)."""
    Hq, Hkv, d, hidden, L, W, budget = 4, 2, 16, 1024, 8192, 8, 72
    gen = torch.Generator().manual_seed(0)
    attn = torch.softmax(torch.randn(1, Hq, W, L, generator=gen) * 4, -1)
    values = torch.randn(1, Hkv, L, d, generator=gen)
    weight = torch.randn(hidden, Hq * d, generator=gen) / 32
    obs = types.SimpleNamespace(
        window_attention=attn, values=values, o_proj_weight=weight, n_heads=Hq, n_kv_heads=Hkv, scratch={},
        phase="prefill", valid=None, rows=None,
    )
    policy = RestKV(window=W, metric_mode=metric_mode, beta=100.0)  # small beta: AWS top-k runs
    scores = [None]
    peak, biggest = _allocations(lambda: scores.__setitem__(0, policy.score(obs, budget)))
    assert scores[0].shape == (1, Hkv, L) and torch.isfinite(scores[0]).all()
    projection = Hq * L * hidden * 4
    bound = 2 * (Hq * W * L + Hq * L * d) * 4
    assert biggest < projection / 4, f"largest allocation {biggest} B"
    assert peak <= bound, f"peak {peak} B > bound {bound} B"
    per_head = weight.view(hidden, Hkv, 2, d)[:, :, 0]
    naive_peak, _ = _allocations(lambda: torch.einsum("bhld,chd->bhlc", values, per_head))
    assert naive_peak >= projection / 2  # the method does see a projection-sized tensor


# --- 7b. decode-time eviction: the carried aggregate -------------------------------------------
def _layer_inputs(model, ids):
    """Each attention module's (hidden_states, cos, sin) over a full forward of `ids`."""
    from evictkit.models import attention_modules

    grabbed = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda mod, args, kwargs, li=li: grabbed.__setitem__(
                li, (kwargs["hidden_states"], *kwargs["position_embeddings"])
            ),
            with_kwargs=True,
        )
        for li, m in enumerate(attention_modules(model))
    ]
    try:
        with torch.no_grad():
            full = _cache(model(ids, use_cache=True))
    finally:
        for h in hooks:
            h.remove()
    return grabbed, full


@pytest.mark.parametrize("temporal", ["ema", "mean", "none"])
def test_carried_aggregate_equals_the_aggregate_over_every_query(temporal):
    """Without decode evictions (budget above the final length), the carried side tensors after
    N decoded tokens equal the temporal aggregate over the w window queries and the N decode
    queries, each query's attention recomputed from scratch over the final full cache."""
    from evictkit.attention import attention_weights, project_queries
    from evictkit.models import attention_modules

    model = tiny_model("qwen2")  # GQA: 2 query heads per KV head
    ids, w, new = prompt_ids(30), 8, 6
    with (
        torch.no_grad(),
        evictkit.compress(model, "restkv", budget=64, window=w, temporal=temporal, phase="both") as run,
    ):
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        states = {li: dict(st.state) for li, st in run._layers.items()}
    seq = out[:, :-1]  # the last token was sampled but never forwarded
    grabbed, full = _layer_inputs(model, seq)
    T = seq.shape[1]
    n = w + new - 1
    weights = M.temporal_weights(n, temporal, 0.3, dtype=torch.float64)
    for li, module in enumerate(attention_modules(model)):
        hidden, cos, sin = grabbed[li]
        q = project_queries(module, hidden[:, T - n :], cos[:, T - n :], sin[:, T - n :])
        keys = full.layers[li].keys
        pos = torch.arange(T).expand(1, keys.shape[1], T)
        rows = attention_weights(q, keys, torch.arange(T - n, T)[None], pos, module.scaling)  # [1, Hq, n, T]
        want = M.aggregate(rows.double(), weights)  # [1, Hq, T]
        Hkv = keys.shape[1]
        got = states[li]["restkv_a"].transpose(2, 3)  # [B, H_kv, g, T]: query heads in order
        assert got.shape[2] == want.shape[1] // Hkv
        torch.testing.assert_close(got.reshape(want.shape).double(), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("decode", ["carried", "window"])
@pytest.mark.parametrize("indicator, temporal, spatial", COMBOS[::3] + [("reconstruction", "ema", "adaptive")])
def test_decode_phase_laws(decode, indicator, temporal, spatial):
    """phase="both": every layer stays at the budget through decode evictions, the window and
    order are kept, every kept key is one of the sequence's, two runs agree."""
    model = tiny_model("qwen2")
    ids, budget, window, new = prompt_ids(40), 24, 8, 6
    params = dict(indicator=indicator, temporal=temporal, spatial=spatial, window=window, decode=decode)

    def run_once():
        with torch.no_grad(), evictkit.compress(model, "restkv", budget=budget, phase="both", **params) as run:
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 return_dict_in_generate=True)
            kept = {li: st.positions.clone() for li, st in run._layers.items()}
        return run, out, kept

    run, out, kept = run_once()
    _, out2, kept2 = run_once()
    assert torch.equal(out.sequences, out2.sequences)
    assert run.stats.sizes() == [budget] * len(kept)
    assert all(s.evictions == new for s in run.stats.layers)  # prefill + every decode step but the last
    T = ids.shape[1] + new - 1
    for li, pos in kept.items():
        assert torch.equal(pos, kept2[li])
        assert bool((pos[..., 1:] > pos[..., :-1]).all())
        assert bool((pos[..., -window:] == torch.arange(T - window, T)).all())


def test_cached_value_norms_give_the_direct_reconstruction_scores():
    gen = torch.Generator().manual_seed(11)
    B, Hkv, g, P, d = 2, 3, 2, 37, 8
    values = torch.randn(B, Hkv, P, d, generator=gen, dtype=torch.float64)
    gram = M.head_grams(torch.randn(20, Hkv * g * d, generator=gen, dtype=torch.float64), Hkv * g, dtype=torch.float64)
    gram = gram.view(Hkv, g, d, d)
    a = torch.softmax(torch.randn(B, Hkv, g, P, generator=gen, dtype=torch.float64) * 3, -1)
    vgv = M.value_gram_norms(values, gram)
    brute = torch.einsum("bkpd,kgde,bkpe->bkgp", values, gram, values)
    torch.testing.assert_close(vgv, brute, rtol=1e-12, atol=1e-12)
    direct = M.reconstruction_scores(a, values.unsqueeze(2), torch.matmul(a, values), gram)
    cached = M.reconstruction_scores_cached(a, values, gram, vgv)
    torch.testing.assert_close(cached, direct, rtol=1e-9, atol=1e-12)
    # fp32, as the policy runs it: equal to the direct form up to rounding
    cached32 = M.reconstruction_scores_cached(a.float(), values.float(), gram.float(), vgv.float())
    torch.testing.assert_close(cached32.double(), direct, rtol=1e-4, atol=1e-6)


def test_carried_value_norms_match_the_final_cache_and_keep_decode_selections():
    """The per-token ||W_O v||^2 side tensor equals a recomputation over the cache it sits in,
    after prefill and decode evictions, and decode-time selections are the ones the direct
    (uncached) indicator makes."""
    from evictkit.models import attention_modules
    from evictkit.plugins import restkv as R

    model = tiny_model("qwen2")  # GQA: 2 query heads per KV head
    ids = prompt_ids(40)

    def run_once():
        with torch.no_grad(), evictkit.compress(model, "restkv", budget=20, window=4, phase="both") as run:
            out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 return_dict_in_generate=True)
            return _cache(out), {li: (st.positions.clone(), dict(st.state)) for li, st in run._layers.items()}

    cache, cached = run_once()
    for li, module in enumerate(attention_modules(model)):
        positions, state = cached[li]
        assert positions.shape[-1] <= 20  # decode evictions happened
        gram = R.head_grams(module.o_proj.weight.detach(), model.config.num_attention_heads)
        gram = gram.view(model.config.num_key_value_heads, -1, *gram.shape[1:])
        want = M.value_gram_norms(cache.layers[li].values.float(), gram).transpose(2, 3)
        torch.testing.assert_close(state[R.VALUE_NORMS], want, rtol=1e-5, atol=1e-6)
    # the same run without the cached norms: the direct indicator picks the same entries
    real_observe = R.RestKV.observe

    def observe_without_norms(self, obs):
        out = dict(real_observe(self, obs))
        out.pop(R.VALUE_NORMS, None)
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R.RestKV, "observe", observe_without_norms)
        _, direct = run_once()
    assert all(R.VALUE_NORMS not in direct[li][1] for li in direct)
    for li in cached:
        assert torch.equal(cached[li][0], direct[li][0])


def test_carried_and_window_decode_differ_and_carried_reuses_prefill_aws():
    model = tiny_model("llama")
    ids = prompt_ids(40)
    kept = {}
    for decode in ("carried", "window"):
        with torch.no_grad(), evictkit.compress(model, "restkv", budget=20, window=4, beta=1.0, phase="both",
                                                 decode=decode) as run:
            model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            kept[decode] = torch.cat([st.positions for st in run._layers.values()])
            if decode == "carried":
                kernel, shift = run._layers[0].scratch["restkv_aws"]
                assert kernel.shape == shift.shape == (1, 4) and bool((kernel >= 5).all())
    assert not torch.equal(kept["carried"], kept["window"])


# --- 8. validation, precision, contract ------------------------------------------------------
@pytest.mark.parametrize(
    "param, value",
    [
        ("alpha", 0.0),
        ("alpha", 1.5),
        ("alpha", -0.1),
        ("beta", 0),
        ("beta", -5.0),
        ("k_min", 4),
        ("k_min", 0),
        ("k_min", -3),
        ("window", 0),
        ("window", 2.5),
        ("metric_mode", "during"),
        ("indicator", "random"),
        ("temporal", "inv-ema"),
        ("spatial", "avgpool"),
        ("decode", "ema"),
        ("gqa", "sum"),
    ],
)
def test_bad_parameters(param, value):
    with pytest.raises(ValueError, match=param):
        evictkit.policy("restkv", **{param: value})
    with pytest.raises(ValueError, match=param):
        RestKV(**{param: value})


def test_defaults_and_contract():
    p = evictkit.policy("restkv")
    assert (p.window, p.alpha, p.beta, p.k_min) == (32, 0.3, 2000, 5)
    assert (p.metric_mode, p.indicator, p.temporal, p.spatial, p.gqa) == (
        "after", "reconstruction", "ema", "adaptive", "mean"
    )
    assert p.phases == ("prefill",)
    assert p.decode == "carried" and p.carries
    assert p.needs() == evictkit.Needs(window=32, queries=True, attention_weights=True, layer_weights=True,
                                         padding=True)
    assert not evictkit.policy("restkv", temporal="inv_ema").carries
    assert not evictkit.policy("restkv", metric_mode="before").carries
    assert not evictkit.policy("restkv", decode="window").carries
    assert p.protected() == (0, 32)


def test_budget_not_above_window_is_refused():
    model = tiny_model("llama")
    for budget in (8, 4):
        with pytest.raises(ValueError, match="window"):
            evictkit.compress(model, "restkv", budget=budget, window=8)
    with pytest.raises(ValueError, match="window"), torch.no_grad():
        with evictkit.compress(model, "restkv", budget=0.1, window=8):  # 10% of 40 = 4 <= window
            model(prompt_ids(40), use_cache=True)


class _Spy(RestKV):
    """Records every score tensor (subclassing keeps the attrs fields and the frozen instance)."""

    seen: list = []

    def score(self, obs, budget=None):
        s = super().score(obs, budget)
        _Spy.seen.append(s)
        return s


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric_mode", ["after", "before"])
def test_low_precision_models_give_finite_scores(dtype, metric_mode):
    model = tiny_model("qwen2", dtype=dtype)
    ids = prompt_ids(40)
    _Spy.seen = []
    with torch.no_grad(), evictkit.compress(model, _Spy(window=8, metric_mode=metric_mode), budget=24) as run:
        cache = _cache(model(ids, use_cache=True))
    assert len(_Spy.seen) == 2 and run.stats.sizes() == [24, 24]
    for s in _Spy.seen:
        assert s.dtype == torch.float32 and torch.isfinite(s).all()
    assert all(layer.keys.dtype == dtype for layer in cache.layers)


def test_score_without_budget():
    """`score(obs)` (the ScorePolicy contract) works without a budget: AWS falls back to t = 0."""
    gen = torch.Generator().manual_seed(0)
    obs = types.SimpleNamespace(
        window_attention=torch.softmax(torch.randn(1, 4, 8, 50, generator=gen), -1),
        values=torch.randn(1, 2, 50, 16, generator=gen),
        o_proj_weight=torch.randn(64, 64, generator=gen),
        n_heads=4,
        n_kv_heads=2,
        scratch={},
        phase="prefill",
        valid=None,
        rows=None,
    )
    s = RestKV(window=8).score(obs)
    assert s.shape == (1, 2, 50) and torch.isfinite(s).all()
    assert bool((s[..., -8:] > s[..., :-8].amax(-1, keepdim=True)).all())  # window ranks first


def test_per_query_aggregate_equals_aggregated_per_query(monkeypatch):
    monkeypatch.setitem(M.CHUNK_ELEMS, "cpu", 1)  # 64-key chunks: 900 keys cross 14 boundaries
    gen = torch.Generator().manual_seed(4)
    attn = torch.softmax(torch.randn(1, 2, 3, 6, 900, generator=gen, dtype=torch.float64), -1)
    values = torch.randn(1, 2, 900, 8, generator=gen, dtype=torch.float64)
    gram = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    gram = gram @ gram.transpose(-1, -2)
    c = M.temporal_weights(6, "ema", 0.3, dtype=torch.float64)
    per_q = M.reconstruction_scores_per_query(attn, values, gram, 894)
    torch.testing.assert_close(M.reconstruction_scores_per_query(attn, values, gram, 894, c), M.aggregate(per_q, c))


# --- 9. the shared conformance kit -----------------------------------------------------------
from evictkit.specs import conformance_tests  # noqa: E402

TestRestKVConformance = conformance_tests(
    "restkv",
    params=[{"window": 4}, {"window": 3, "metric_mode": "before", "gqa": "max", "beta": 1.0, "k_min": 1}],
)
