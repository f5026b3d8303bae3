"""knorm, keydiff, lagkv, expected_attention and criticalkv against plain references.

Each reference is written out loop by loop (or worked by hand) from the method's definition,
independently of the policy's vectorised code, and the kept sets are compared. Parity with
kvpress 0.5.5 itself is measured by benchmarks/kvpress/ (docs/benchmarks.md, suite 4).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import attrs
import pytest
import torch
from generation import prompt_ids
from models import tiny_model

import evictkit
from evictkit.observation import Observation
from evictkit.plugins.criticalkv import CriticalKV, projected_value_norms
from evictkit.plugins.expected_attention import ExpectedAttention, averaged_rotation
from evictkit.plugins.keydiff import KeyDiff
from evictkit.plugins.knorm import KNorm
from evictkit.plugins.lagkv import LagKV, lagkv_scores
from evictkit.specs.tiny import tiny_attention


def _obs(keys: torch.Tensor, values: torch.Tensor | None = None, **extra) -> Observation:
    """A prefill Observation over `keys` [B, H, T, D] for policies that read keys and values only."""
    B, H, T, D = keys.shape
    fields = dict(
        module=SimpleNamespace(head_dim=D, config=SimpleNamespace()), layer_idx=0, n_layers=1, phase="prefill",
        keys=keys, values=torch.randn_like(keys) if values is None else values,
        positions=torch.arange(T).expand(B, H, T), state={}, scratch={}, hidden_states=torch.zeros(B, T, 4),
        position_embeddings=(None, None), query_positions=torch.arange(T).expand(B, T), window=0,
    )
    fields.update(extra)
    return Observation(**fields)


def _top(scores: list[float], k: int) -> list[int]:
    """The k best slots of one row, ties to the newer slot, ascending (evictkit's rule, by hand)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], -i))
    return sorted(order[:k])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- knorm ---------------------------------------------------------------------------------
def test_knorm_keeps_the_smallest_key_norms():
    keys = torch.randn(2, 3, 20, 8, generator=_gen(0))
    kept = KNorm().select(_obs(keys), 7)
    for b in range(2):
        for h in range(3):
            norms = [math.sqrt(sum(float(x) ** 2 for x in keys[b, h, t])) for t in range(20)]
            assert kept[b, h].tolist() == _top([-n for n in norms], 7)


def test_knorm_hand_worked_and_protection():
    # norms 5, 1, 3, 2, 4 (3-4-5 and axis vectors): the two smallest are slots 1 and 3
    keys = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 3.0], [0.0, -2.0], [4.0, 0.0]])[None, None]
    assert KNorm().select(_obs(keys), 2).tolist() == [[[1, 3]]]
    # sinks and window are forced in first; the rest by norm
    assert KNorm(sinks=1, window=1).select(_obs(keys), 3).tolist() == [[[0, 1, 4]]]


def test_knorm_scores_bf16_keys_in_fp32():
    keys = torch.randn(1, 2, 64, 16, generator=_gen(1)).bfloat16()
    s = KNorm().score(_obs(keys))
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, -keys.float().norm(dim=-1))


# --- keydiff -------------------------------------------------------------------------------
def _keydiff_reference(keys: list[list[float]]) -> list[float]:
    """Minus the cosine of each key with the mean of the unit keys, by hand (one head)."""
    def norm(v):
        return math.sqrt(sum(x * x for x in v))

    units = [[x / max(norm(k), 1e-12) for x in k] for k in keys]
    anchor = [sum(u[d] for u in units) / len(units) for d in range(len(keys[0]))]
    return [-sum(a * b for a, b in zip(k, anchor)) / max(norm(k) * norm(anchor), 1e-8) for k in keys]


def test_keydiff_matches_the_cosine_to_the_mean_unit_key():
    keys = torch.randn(1, 2, 24, 6, generator=_gen(2)).double()
    kept = KeyDiff().select(_obs(keys), 9)
    for h in range(2):
        ref = _keydiff_reference(keys[0, h].tolist())
        torch.testing.assert_close(KeyDiff().score(_obs(keys))[0, h].double(), torch.tensor(ref, dtype=torch.float64))
        assert kept[0, h].tolist() == _top(ref, 9)


def test_keydiff_hand_worked():
    # three keys along +x, one along +y: the anchor leans to x, so the y key is the most distinctive
    keys = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])[None, None]
    assert KeyDiff().select(_obs(keys), 1).tolist() == [[[2]]]


def test_keydiff_block_mode_is_the_block_recursion():
    keys = torch.randn(1, 2, 40, 4, generator=_gen(3)).double()
    budget, block = 10, 7
    kept = KeyDiff(block=block).select(_obs(keys), budget)
    for h in range(2):
        rows = keys[0, h].tolist()
        current = list(range(budget))
        for start in range(budget, 40, block):
            cand = current + list(range(start, min(start + block, 40)))
            ref = _keydiff_reference([rows[i] for i in cand])
            current = [cand[i] for i in _top(ref, budget)]
        assert kept[0, h].tolist() == current
    # one block as long as the cache is the one-shot selection
    assert torch.equal(KeyDiff(block=1000).select(_obs(keys), budget), KeyDiff().select(_obs(keys), budget))


# --- lagkv ---------------------------------------------------------------------------------
def _lag_scores_reference(k: list[list[float]], v: list[list[float]], sinks: int, lag: int, ranks: bool) -> list[float]:
    """LagKV by its definition, loop by loop, for one head."""
    T, D = len(k), len(k[0])
    if T < sinks + 2 * lag:
        return [1.0] * sinks + [i / (T - sinks) for i in range(T - sinks)]
    end = sinks + (T - sinks) // lag * lag

    def part_scores(x, start):
        ref = x[start + lag : start + 2 * lag]
        lo = [min(r[d] for r in ref) for d in range(D)]
        hi = [max(r[d] for r in ref) for d in range(D)]
        spread = []
        for t in range(start, start + lag):
            z = [(x[t][d] - lo[d]) / (hi[d] - lo[d]) for d in range(D)]
            mean = sum(z) / D
            spread.append(math.sqrt(sum((a - mean) ** 2 for a in z) / (D - 1)))
        e = [math.exp(s - max(spread)) for s in spread]
        return [a / sum(e) for a in e]

    out = [1.0] * sinks
    for start in range(sinks, end - lag, lag):
        s = [(a + b) / 2 for a, b in zip(part_scores(k, start), part_scores(v, start))]
        if ranks:
            order = sorted(range(lag), key=lambda i: s[i])
            rank = [0] * lag
            for r, i in enumerate(order):
                rank[i] = r
            s = [r / lag for r in rank]
        out += s
    return out + [1.0] * (T - len(out))


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("T", [12, 19, 26])
def test_lagkv_scores_match_the_definition(T, cross):
    keys = torch.randn(1, 2, T, 5, generator=_gen(T)).double()
    values = torch.randn(1, 2, T, 5, generator=_gen(T + 100)).double()
    got = lagkv_scores(keys, values, sinks=2, lag=4, cross_scoring=cross)
    for h in range(2):
        ref = _lag_scores_reference(keys[0, h].tolist(), values[0, h].tolist(), 2, 4, not cross)
        torch.testing.assert_close(got[0, h].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_lagkv_hand_worked_layout():
    # sinks 1, lag 2, T 8: partitions [1, 3) and [3, 5) are scored (against [3, 5) and [5, 7)),
    # [5, 7) has no reference and joins the leftover slot 7 in the tail
    keys, values = torch.randn(1, 1, 8, 3, generator=_gen(5)), torch.randn(1, 1, 8, 3, generator=_gen(6))
    s = lagkv_scores(keys, values, sinks=1, lag=2, cross_scoring=False)[0, 0]
    assert s[[0, 5, 6, 7]].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert sorted(s[1:3].tolist()) == [0.0, 0.5] and sorted(s[3:5].tolist()) == [0.0, 0.5]
    # budget 6 = sink + tail + the better entry of each partition: no tie straddles the cut
    kept = LagKV(sinks=1, lag=2).select(_obs(keys, values), 6)[0, 0].tolist()
    best = [1 + int(s[2] > s[1]), 3 + int(s[4] > s[3])]
    assert kept == sorted([0, *best, 5, 6, 7])


def test_lagkv_short_cache_keeps_sinks_and_newest():
    keys = torch.randn(1, 2, 10, 4, generator=_gen(7))
    assert LagKV(sinks=2, lag=4).select(_obs(keys), 5)[0].tolist() == [[0, 1, 7, 8, 9]] * 2


def test_lagkv_constant_reference_channel_gives_no_nan():
    keys = torch.randn(1, 1, 30, 4, generator=_gen(8))
    keys[..., 0] = 1.0  # one channel constant everywhere
    s = LagKV(sinks=2, lag=4, cross_scoring=True).score(_obs(keys, torch.zeros_like(keys)))
    assert not torch.isnan(s).any()


# --- expected attention --------------------------------------------------------------------
def _ea_obs(T: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, seed: int = 0) -> tuple[Observation, dict]:
    """A prefill Observation of a real (tiny, random) Llama attention module over T tokens."""
    module, rope = tiny_attention(heads, kv_heads, head_dim, 0, "float32")
    g = _gen(seed)
    hidden = torch.randn(1, T, module.config.hidden_size, generator=g)
    pos = torch.arange(T)[None]
    cos, sin = rope(hidden, pos)
    keys = torch.randn(1, kv_heads, T, head_dim, generator=g)
    values = torch.randn(1, kv_heads, T, head_dim, generator=g)
    obs = Observation(
        module=module, layer_idx=0, n_layers=1, phase="prefill", keys=keys, values=values,
        positions=pos[:, None].expand(1, kv_heads, T), state={}, scratch={}, hidden_states=hidden,
        position_embeddings=(cos, sin), query_positions=pos, window=0,
    )
    return obs, {"module": module, "rope": rope, "hidden": hidden, "keys": keys, "values": values}


def _ea_reference(parts: dict, sinks: int, future: int, covariance: bool, vnorm: bool, eps: float) -> torch.Tensor:
    """Expected attention by its definition, in fp64: each future position's rotation matrix is
    obtained by rotating the basis vectors with the model's own apply_rotary_pos_emb."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    module, rope, hidden = parts["module"], parts["rope"], parts["hidden"]
    keys, values = parts["keys"][0].double(), parts["values"][0].double()
    Hkv, T, D = keys.shape
    Hq = module.config.num_attention_heads
    q = module.q_proj(hidden[:, sinks:]).view(1, T - sinks, Hq, D)[0].transpose(0, 1).double()  # [Hq, N, D]
    eye = torch.eye(D)[None, None]  # rotate each basis vector: column j of R(p) is R(p) e_j
    rots = []
    for p in range(T, T + future):
        cos, sin = rope(torch.zeros(1), torch.tensor([[p]]))
        rotated, _ = apply_rotary_pos_emb(eye.expand(1, 1, D, D), eye.expand(1, 1, D, D), cos, sin)
        rots.append(rotated[0, 0].double().T)
    R = torch.stack(rots).mean(0)
    scores = torch.zeros(Hkv, T)
    for kv in range(Hkv):
        per_head = []
        for h in range(kv * Hq // Hkv, (kv + 1) * Hq // Hkv):
            mu = q[h].mean(0)
            cov = (q[h] - mu).T @ (q[h] - mu) / q[h].shape[0]
            mu, cov = R @ mu, R @ cov @ R.T
            z = torch.tensor([float(mu @ keys[kv, t]) / math.sqrt(D)
                              + (float(keys[kv, t] @ cov @ keys[kv, t]) / (2 * D) if covariance else 0.0)
                              for t in range(sinks, T)])
            per_head.append(torch.softmax(z, 0))
        s = torch.stack(per_head).mean(0)
        if vnorm:
            s = (s + eps) * values[kv, sinks:].norm(dim=-1)
        scores[kv, sinks:] = s
        scores[kv, :sinks] = float("inf")
    return scores


@pytest.mark.parametrize("covariance,vnorm,eps", [(True, True, 0.0), (False, True, 0.01), (True, False, 0.0)])
def test_expected_attention_matches_the_definition(covariance, vnorm, eps):
    obs, parts = _ea_obs(40)
    policy = ExpectedAttention(sinks=3, future=16, covariance=covariance, vnorm=vnorm, epsilon=eps)
    ref = _ea_reference(parts, 3, 16, covariance, vnorm, eps)
    got = policy.score(obs)[0]
    torch.testing.assert_close(got[:, 3:].double(), ref[:, 3:].double(), rtol=1e-4, atol=1e-7)
    assert bool((got[:, :3] > got[:, 3:].amax()).all())  # the sinks outrank every scored key
    kept = policy.select(obs, 12)[0]
    for h in range(2):
        assert kept[h].tolist() == _top(ref[h].tolist(), 12)


def test_expected_attention_averaged_rotation_by_hand():
    # D = 2, one frequency: R(p) = [[cos, -sin], [sin, cos]] at angle p; the mean of p = 0 and pi/2
    angles = torch.tensor([[0.0, math.pi / 2]])
    cos, sin = angles.cos()[..., None].expand(1, 2, 2), angles.sin()[..., None].expand(1, 2, 2)
    torch.testing.assert_close(averaged_rotation(cos, sin)[0], torch.tensor([[0.5, -0.5], [0.5, 0.5]]))


def test_expected_attention_gaussian_closed_form():
    # E[exp(q.k / sqrt d)] for q ~ N(mu, Sigma) is exp(mu.k / sqrt d + k^T Sigma k / 2d): the logit used
    g = _gen(9)
    D = 4
    mu, A, k = torch.randn(D, generator=g).double(), torch.randn(D, D, generator=g).double() * 0.3, torch.randn(D)
    cov = A @ A.T
    q = torch.distributions.MultivariateNormal(mu, cov).sample((400_000,))
    empirical = torch.exp(q @ k.double() / math.sqrt(D)).mean().log()
    closed = mu @ k.double() / math.sqrt(D) + k.double() @ cov @ k.double() / (2 * D)
    assert abs(float(empirical - closed)) < 0.02


@pytest.mark.parametrize("name", ["knorm", "keydiff", "lagkv", "expected_attention", "criticalkv"])
def test_prefill_eviction_in_compress_on_a_tiny_model(name):
    model = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16)
    params = {"lagkv": {"lag": 8}, "criticalkv": {"scorer_options": {"window": 8}}}.get(name, {})
    with evictkit.compress(model, name, budget=20, **params) as run:
        model.generate(prompt_ids(48, 10), max_new_tokens=3, do_sample=False)
    assert [s.after_prefill for s in run.stats.layers] == [20, 20]


# --- criticalkv ----------------------------------------------------------------------------
def _tiny_layer_obs(T: int, seed: int = 0, window: int = 4) -> Observation:
    module, rope = tiny_attention(4, 2, 8, 0, "float32")
    g = _gen(seed)
    hidden = torch.randn(1, T, module.config.hidden_size, generator=g)
    pos = torch.arange(T)[None]
    return Observation(
        module=module, layer_idx=0, n_layers=1, phase="prefill", keys=torch.randn(1, 2, T, 8, generator=g),
        values=torch.randn(1, 2, T, 8, generator=g), positions=pos[:, None].expand(1, 2, T), state={}, scratch={},
        hidden_states=hidden, position_embeddings=rope(hidden, pos), query_positions=pos, window=window,
    )


def test_projected_value_norms_by_hand():
    # one KV head, two query heads, D = 1, hidden 2: W_O columns are head 0 -> (1, -2), head 1 -> (3, 0)
    values = torch.tensor([[[[1.0], [-2.0]]]])  # [1, 1, 2, 1]
    weight = torch.tensor([[1.0, 3.0], [-2.0, 0.0]])
    # v = 1: |(1, -2)|_1 = 3 and |(3, 0)|_1 = 3 -> 3; v = -2: 6 and 6 -> 6
    assert projected_value_norms(values, weight).tolist() == [[[3.0, 6.0]]]


@pytest.mark.parametrize("scorer,options", [("snapkv", {"window": 4, "kernel": 3}), ("knorm", {}),
                                            ("expected_attention", {"future": 8, "vnorm": False})])
def test_criticalkv_is_the_two_stage_selection(scorer, options):
    obs = _tiny_layer_obs(32)
    budget, first = 12, 6
    policy = CriticalKV(scorer=scorer, scorer_options=options)
    base = evictkit.policy(scorer, **options)
    sinks, window = base.protected()
    s = base.score(obs)
    W = obs.module.o_proj.weight
    kept = policy.select(obs, budget)[0]
    for kv in range(2):
        row = s[0, kv].tolist()
        forced = [t for t in range(32) if t < sinks or t >= 32 - window]
        stage1 = _top([math.inf if t in forced else x for t, x in enumerate(row)], first)
        norms = []
        for t in range(32):
            v = obs.values[0, kv, t]
            per_head = [float((W[:, h * 8 : (h + 1) * 8] @ v).abs().sum()) for h in (2 * kv, 2 * kv + 1)]
            norms.append(sum(per_head) / 2)
        weighted = [math.inf if t in stage1 or t in forced else (row[t] + 1e-4) * norms[t] for t in range(32)]
        assert kept[kv].tolist() == _top(weighted, budget)


def test_criticalkv_delegates_to_the_scorer():
    policy = CriticalKV(scorer="pyramidkv", scorer_options={"window": 8})
    assert policy.protected() == (0, 8)
    # the scorer's needs, plus the o_proj weight the re-weighting reads
    assert policy.needs() == attrs.evolve(evictkit.policy("pyramidkv", window=8).needs(), layer_weights=True)
    assert policy.layer_budget(64, 0, 4, 1000) == evictkit.policy("pyramidkv", window=8).layer_budget(64, 0, 4, 1000)
    with pytest.raises(ValueError, match="scorer='adakv'"):
        CriticalKV(scorer="adakv")
    with pytest.raises(ValueError, match="nonsense"):
        CriticalKV(scorer="knorm", scorer_options={"nonsense": 1})
    with pytest.raises(ValueError, match="first_stage_ratio"):
        CriticalKV(first_stage_ratio=1.5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_expected_attention_rotates_with_the_models_own_rotary_embedding(arch):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen3Config

    from evictkit.plugins.expected_attention import future_cos_sin

    sizes = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8)
    config = {"llama": lambda: LlamaConfig(**sizes, rope_scaling={"rope_type": "linear", "factor": 2.0}),
              "qwen3": lambda: Qwen3Config(**sizes),
              "gemma3": lambda: Gemma3TextConfig(**sizes, sliding_window=8,
                                                 layer_types=["sliding_attention", "full_attention"])}[arch]()
    model = AutoModelForCausalLM.from_config(config).eval()
    module = model.model.layers[-1].self_attn  # a full-attention layer in gemma3
    pos = torch.arange(50, 60)[None]
    x = torch.zeros(1, dtype=torch.float32)
    args = (x, pos, "full_attention") if arch == "gemma3" else (x, pos)
    want = model.model.rotary_emb(*args)
    got = future_cos_sin(module, pos, x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_expected_attention_refuses_an_observation_without_the_attention_module():
    obs = Observation.from_tensors(
        keys=torch.randn(1, 2, 8, 4), values=torch.randn(1, 2, 8, 4), queries=torch.randn(1, 4, 8, 4),
        query_positions=torch.arange(8)[None], scaling=0.5, layer_idx=0, n_layers=1, window=0,
    )
    with pytest.raises(ValueError, match="q_proj"):
        ExpectedAttention().score(obs)
