"""The shared-prefill engine equals running each policy directly under evictkit.compress."""

from __future__ import annotations

import pytest
import torch
from models import tiny_model

import evictkit
from evictkit.compress import Compression
from evictkit.eval import engine
from evictkit.eval.tasks import Sample, make_sample
from evictkit.eval.tokenizer import ByteTokenizer, Codec

CODEC = Codec(ByteTokenizer())


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3, vocab=128)


@pytest.fixture(scope="module")
def sample():
    return make_sample("ruler:niah_single_2", 0, 400, CODEC, max_new_tokens=5)


@pytest.fixture(scope="module")
def short_question():
    """Random context of 240 tokens and a 12-token question: keeps the 22 equivalence runs fast."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (252,), generator=gen).tolist()
    return Sample(task="t", index=0, length=252, context_ids=tuple(ids[:240]), question_ids=tuple(ids[240:]),
                  references=("x",), metric="all", max_new_tokens=5)


def _model_for(name, model, budget, length, params=None):
    """The tiny model, or a deeper one for policies whose layer schedule needs more layers (LaCache)."""
    policy = evictkit.policy(name, **(params or {}))
    try:
        Compression(model, policy, budget).schedule(length)
    except ValueError:
        model = tiny_model("llama", layers=18, heads=2, kv_heads=1, head_dim=8, vocab=128)
        Compression(model, policy, budget).schedule(length)
    return policy, model


def _cases():
    from evictkit import params_of

    cases = [(name, {}) for name in sorted(evictkit.policies())]
    streaming = evictkit.policies().get("streaming_llm")
    if streaming is not None and "positions" in params_of(streaming):
        cases.append(("streaming_llm", {"positions": "shift"}))  # the paper's position shift
    lacache = evictkit.policies().get("lacache")
    if lacache is not None and "positions" in params_of(lacache):
        cases.append(("lacache", {"positions": "shift"}))  # the reference's position handling
    return cases


@pytest.mark.parametrize("query_aware", [False, True])
@pytest.mark.parametrize("name, params", _cases())
def test_shared_prefill_equals_direct_run(model, short_question, name, params, query_aware):
    sample = short_question
    prompt = list(sample.context_ids) + (list(sample.question_ids) if query_aware else [])
    policy, model = _model_for(name, model, 48, len(prompt), params)
    pre = engine.shared_prefill(model, prompt)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in pre.cache.layers]
    shared = engine.run_variant(model, policy, 48, sample, pre, device="cpu", eos=frozenset(), query_aware=query_aware)
    direct = engine.run_variant(model, policy, 48, sample, None, device="cpu", eos=frozenset(), query_aware=query_aware)
    assert shared.tokens == direct.tokens and len(shared.tokens) == 5
    assert shared.kept.keys() == direct.kept.keys()
    for li in shared.kept:
        assert torch.equal(shared.kept[li], direct.kept[li]), f"layer {li}"
    assert shared.stats.sizes() == direct.stats.sizes()
    assert [s.after_prefill for s in shared.stats.layers] == [s.after_prefill for s in direct.stats.layers]
    # the shared full cache is left as it was, for the next variant
    for (k, v), layer in zip(before, pre.cache.layers):
        assert torch.equal(k, layer.keys) and torch.equal(v, layer.values)


def test_greedy_loop_matches_generate_on_the_full_cache(model, sample):
    full = evictkit.policy("full")
    pre = engine.shared_prefill(model, sample.context_ids)
    out = engine.run_variant(model, full, 1.0, sample, pre, device="cpu", eos=frozenset(), query_aware=False)
    ids = torch.tensor([list(sample.context_ids) + list(sample.question_ids)])
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    assert out.tokens == ref[0, ids.shape[1]:].tolist()


def test_compression_actually_evicts_and_keeps_true_positions(model, sample):
    policy = evictkit.policy("streaming_llm", sinks=4)
    pre = engine.shared_prefill(model, sample.context_ids)
    out = engine.run_variant(model, policy, 32, sample, pre, device="cpu", eos=frozenset(), query_aware=False)
    T, q = len(sample.context_ids), len(sample.question_ids)
    for pos in out.kept.values():  # after the question: 4 sinks + the 28 newest of context + question
        expected = list(range(4)) + list(range(T + q - 28, T + q))
        assert pos[0, 0].tolist() == expected


def test_teacher_forced_nll_matches_plain_loss(model):
    s = make_sample("ppl", 0, 200, CODEC, continuation=16)
    full = evictkit.policy("full")
    pre = engine.shared_prefill(model, s.context_ids)
    out = engine.run_variant(model, full, 1.0, s, pre, device="cpu", eos=frozenset(), query_aware=False)
    ids = torch.tensor([list(s.context_ids) + list(s.continuation_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0, len(s.context_ids) - 1 : -1]
    ref = torch.nn.functional.cross_entropy(logits.float(), ids[0, len(s.context_ids):])
    assert out.nll == pytest.approx(float(ref), rel=1e-4)


def test_recon_error_is_zero_without_eviction_and_positive_with_it(model):
    s = make_sample("recon", 0, 200, CODEC, continuation=16)
    pre = engine.shared_prefill(model, s.context_ids)
    ref = engine.recon_reference(model, pre, s.continuation_ids, "cpu")
    kw = dict(device="cpu", eos=frozenset(), query_aware=False, recon_ref=ref)
    full = engine.run_variant(model, evictkit.policy("full"), 1.0, s, pre, **kw)
    roomy = engine.run_variant(model, evictkit.policy("streaming_llm"), 500, s, pre, **kw)
    tight = engine.run_variant(model, evictkit.policy("streaming_llm"), 24, s, pre, **kw)
    assert len(full.recon) == 3
    assert max(full.recon) < 1e-5 and max(roomy.recon) < 1e-5
    assert min(tight.recon) > 1e-3


def test_recon_ignores_the_padding_of_ragged_layers(model):
    """AdaKV stores per-head budgets left-padded (true position -1); padding must not be attended."""
    if "adakv" not in evictkit.policies():
        pytest.skip("adakv is not registered")
    s = make_sample("recon", 0, 200, CODEC, continuation=16)
    pre = engine.shared_prefill(model, s.context_ids)
    ref = engine.recon_reference(model, pre, s.continuation_ids, "cpu")
    kw = dict(device="cpu", eos=frozenset(), query_aware=False, recon_ref=ref)
    out = engine.run_variant(model, evictkit.policy("adakv"), 500, s, pre, **kw)  # budget above the length
    assert max(out.recon) < 1e-5
    tight = engine.run_variant(model, evictkit.policy("adakv"), 40, s, pre, **kw)
    assert any(bool((p < 0).any()) for p in tight.kept.values()), "expected padded heads at a tight budget"
    # brute force: per query head, plain softmax attention over that KV head's real entries only
    T, N = len(s.context_ids), len(s.continuation_ids)
    compressed = engine.copy_cache(pre.cache)
    from evictkit.compress import Compression

    comp = Compression(model, evictkit.policy("adakv"), 40, ragged_layout="padded")  # read below as [B, H, T, D]
    with comp:
        engine.replay(comp, compressed, pre.inputs)
    for i, module in enumerate(engine.attention_modules(model)):
        li = module.layer_idx
        q = ref.queries[li][0]  # [Hq, N, D]
        ck, cv = ref.cont_kv[li]
        pos = engine.kept_positions(comp)[li][0]  # [Hkv, K]
        heads = []
        for h in range(q.shape[0]):
            kv = h // (q.shape[0] // pos.shape[0])
            real = pos[kv] >= 0
            keys = torch.cat([compressed.layers[li].keys[0, kv][real], ck[0, kv]])
            vals = torch.cat([compressed.layers[li].values[0, kv][real], cv[0, kv]])
            logits = (q[h] @ keys.T) * module.scaling
            causal = torch.ones(N, N, dtype=torch.bool).tril()
            mask = torch.cat([torch.ones(N, int(real.sum()), dtype=torch.bool), causal], dim=1)
            heads.append(torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ vals)
        with torch.no_grad():
            o = module.o_proj(torch.cat(heads, dim=-1))
        full = ref.outputs[li][0]
        assert tight.recon[i] == pytest.approx(float((o - full).norm() / full.norm()), rel=1e-4, abs=1e-6)
    assert T > 40
