"""R-KV (plugins/rkv.py) against a plain restatement of the authors' `R1KV.update_kv`."""

from __future__ import annotations

import math

import pytest
import torch

import evictkit
from evictkit.observation import Observation
from evictkit.plugins.rkv import RKV, redundancy
from evictkit.specs import conformance_tests


def authors_kept(queries, keys, budget, window=8, kernel=7, mix=0.07, threshold=0.5):
    """The positions the reference keeps, one (row, KV head) at a time with plain loops.

    queries [H_q, w, D] (the newest w), keys [H_kv, T, D]; returns a list of sets per KV head.
    As the reference: logits q.k / sqrt(D), max over the group before the softmax, softmax over
    the prefix keys, mean over the queries, max-pool (zero-free: out-of-range neighbours ignored);
    similarities with the diagonal and each row's last key above the threshold (else key 0)
    zeroed, column means, softmax over all T; top budget - w of the prefix by
    mix * attention - (1 - mix) * redundancy, plus the last w.
    """
    Hq, w, D = queries.shape
    Hkv, T, _ = keys.shape
    G = Hq // Hkv
    P = T - window
    kept = []
    for h in range(Hkv):
        attn = [0.0] * P
        for i in range(w):
            logits = [max(float(queries[h * G + g, i] @ keys[h, j]) / math.sqrt(D) for g in range(G))
                      for j in range(P)]
            top = max(logits)
            e = [math.exp(x - top) for x in logits]
            for j in range(P):
                attn[j] += e[j] / sum(e) / w
        pooled = [max(attn[max(0, j - kernel // 2) : j + kernel // 2 + 1]) for j in range(P)]
        unit = [keys[h, j] / (float(keys[h, j].norm()) + 1e-8) for j in range(T)]
        sim = [[0.0 if i == j else float(unit[i] @ unit[j]) for j in range(T)] for i in range(T)]
        for i in range(T):
            similar = [j for j in range(T) if sim[i][j] > threshold]
            sim[i][max(similar) if similar else 0] = 0.0
        means = [sum(sim[i][j] for i in range(T)) / T for j in range(T)]
        top = max(means)
        e = [math.exp(m - top) for m in means]
        red = [x / sum(e) for x in e]
        z = [mix * pooled[j] - (1 - mix) * red[j] for j in range(P)]
        best = sorted(range(P), key=lambda j: -z[j])[: budget - window]
        kept.append(set(best) | set(range(P, T)))
    return kept


def observation(queries, keys, window):
    B, Hkv, T, D = keys.shape
    q = queries.shape[2]
    return Observation.from_tensors(
        keys=keys, values=torch.randn_like(keys), queries=queries,
        query_positions=torch.arange(T - q, T).expand(B, q), scaling=D**-0.5, layer_idx=0, n_layers=1,
        window=window,
    )


def similar_keys(B, Hkv, T, D, gen):
    """Keys in a few tight clusters, so that many pairs pass the 0.5 threshold."""
    centres = torch.randn(B, Hkv, 4, D, generator=gen)
    pick = torch.randint(0, 4, (B, Hkv, T), generator=gen)
    keys = centres.gather(2, pick[..., None].expand(-1, -1, -1, D)) + 0.6 * torch.randn(B, Hkv, T, D, generator=gen)
    return keys


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("window", "kernel", "mix"), [(8, 7, 0.07), (3, 3, 0.5), (2, 1, 1.0), (4, 5, 0.0)])
def test_kept_sets_equal_the_authors_on_a_first_compression(seed, window, kernel, mix):
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, T, D, budget = 2, 4, 2, 40, 8, 20
    keys = similar_keys(B, Hkv, T, D, gen)
    queries = torch.randn(B, Hq, window, D, generator=gen)
    policy = RKV(window=window, kernel=kernel, mix=mix)
    idx = policy.select(observation(queries, keys, window), budget)
    assert idx.shape == (B, Hkv, budget)
    for b in range(B):
        want = authors_kept(queries[b], keys[b], budget, window, kernel, mix)
        for h in range(Hkv):
            assert set(idx[b, h].tolist()) == want[h], (b, h)


def test_redundancy_by_hand():
    # keys 0 and 2 point the same way, key 1 is orthogonal: row 0's last similar key is 2, row 2's
    # is 0 (both zeroed), row 1 has none and zeroes its entry of key 0 (already 0): C is all zero
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])[None, None]
    assert torch.allclose(redundancy(keys, 0.5), torch.full((1, 1, 3), 1 / 3))
    # unit keys (1, 0), (.8, .6), (1, 0): rows (0, .8, 1) -> its last similar key 2 zeroed;
    # (.8, 0, .8) -> 2 zeroed; (1, .8, 0) -> 1 zeroed: column sums 1.8, .8, 0
    keys = torch.tensor([[1.0, 0.0], [0.8, 0.6], [2.0, 0.0]])[None, None]
    means = torch.tensor([1.8, 0.8, 0.0]) / 3
    assert torch.allclose(redundancy(keys, 0.5), means.softmax(-1)[None, None], atol=1e-6)


def test_the_row_blocks_change_nothing():
    gen = torch.Generator().manual_seed(7)
    keys = similar_keys(2, 3, 50, 8, gen)
    assert torch.allclose(redundancy(keys, 0.5, rows=7), redundancy(keys, 0.5), atol=1e-6)


def test_redundant_copies_lose_to_distinct_keys_when_attention_is_flat():
    # mix=0: redundancy alone; five copies of one key and distinct others: the copies go first
    gen = torch.Generator().manual_seed(0)
    D, T, w = 16, 24, 2
    keys = torch.randn(1, 1, T, D, generator=gen)
    keys[0, 0, 1:6] = keys[0, 0, 0]
    idx = RKV(window=w, mix=0.0).select(observation(torch.randn(1, 1, w, D, generator=gen), keys, w), T - 4)
    dropped = set(range(T)) - set(idx[0, 0].tolist())
    assert dropped <= set(range(6)) and len(dropped) == 4


def test_defaults_contract_and_errors():
    p = evictkit.policy("rkv")
    assert (p.window, p.kernel, p.mix, p.threshold) == (8, 7, 0.07, 0.5)
    assert p.phases == ("prefill", "decode") and p.protected() == (0, 8)
    assert p.needs() == evictkit.Needs(window=8, padding=True)
    for bad, match in [({"window": 0}, "window=0"), ({"kernel": 4}, "kernel=4"), ({"mix": 1.5}, "mix=1.5"),
                       ({"threshold": 1.0}, "threshold=1.0"), ({"mix": True}, "mix=True")]:
        with pytest.raises(ValueError, match=match):
            evictkit.policy("rkv", **bad)
    with pytest.raises(ValueError, match="budget=8"):
        p.check_budget(8)


def test_the_buffer_is_the_slack():
    # the reference's buffer of N decode tokens is slack=N-1: back to the budget every N tokens
    from models import tiny_model

    from evictkit.hf import cache_arg

    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    sizes = []
    with evictkit.compress(model, "rkv", budget=24, slack=7) as run:
        out = model(ids, use_cache=True)
        assert [s.after_prefill for s in run.stats.layers] == [24] * len(run.stats.layers)
        for _ in range(20):
            tok = out.logits[:, -1:].argmax(-1)
            out = model(tok, use_cache=True, **cache_arg(model, out.past_key_values))
            sizes.append(run.stats.layers[0].size)
    assert sizes[:10] == [25, 26, 27, 28, 29, 30, 31, 24, 25, 26]
    assert max(s.peak for s in run.stats.layers) <= 24 + 8


def _agreement_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "rkv_agreement.py"
    spec = importlib.util.spec_from_file_location("rkv_agreement", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_agreement_replay_differs_from_the_authors_by_storage_order_only():
    # benchmarks/rkv_agreement.py on synthetic streams: its restatement of the authors' cache
    # agrees with evictkit at every compression when kept in position order, and at the first
    # when kept in theirs (docs/policies/rkv.md reports the SmolLM2 numbers)
    agreement = _agreement_module()
    gen = torch.Generator().manual_seed(3)
    L, Hkv, Hq, N, D = 2, 2, 4, 90, 8
    keys = [similar_keys(1, Hkv, N, D, gen)[0] for _ in range(L)]
    queries = [torch.randn(Hq, N, D, generator=gen) for _ in range(L)]
    policy = RKV(window=4)
    control = agreement.replay(keys, queries, 40, 24, policy, every=16, storage_order=False)
    assert len(control) == 4 and all(share == 1.0 for _, share in control)
    theirs = agreement.replay(keys, queries, 40, 24, policy, every=16)
    assert theirs[0] == (39, 1.0) and min(share for _, share in theirs) < 1.0


TestLaws_rkv = conformance_tests("rkv", params=[{"window": 2, "kernel": 3}, {"window": 1, "mix": 1.0},
                                                {"window": 3, "mix": 0.0, "threshold": 0.0}])
