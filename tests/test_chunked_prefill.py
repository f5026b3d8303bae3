"""Chunked prefill: a forward that continues a sequence with several tokens is a prefill chunk,
and every prefill policy compresses each layer back to its budget after it."""

import pytest
import torch
from generation import TINY_POLICIES
from transformers import DynamicCache

import evictkit
from evictkit.hf import cache_arg
from evictkit.specs.tiny import tiny_model

PROMPT, CHUNK, BUDGET = 100, 16, 40
H_KV = 2  # tiny_model's default
POLICIES = [p for p in TINY_POLICIES if p[0] != "full"]
IDS = [p for p, _ in POLICIES]


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))


def _generate(model, ids, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, **kw)


@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_every_chunk_leaves_each_layer_within_its_budget(model, ids, name, params):
    """A hand-written loop of forwards: after each chunk, no layer holds more than its budget."""
    if "prefill" not in evictkit.policies()[name].phases:
        pytest.skip(f"{name} evicts at decode only: the chunks are its prompt (the kit's chunked law covers it)")
    cache = DynamicCache(config=model.config)
    with evictkit.compress(model, name, budget=BUDGET, **params) as run:
        for start in range(0, PROMPT, CHUNK):
            model(ids[:, start:start + CHUNK], **cache_arg(model, cache), use_cache=True)
            seen = min(start + CHUNK, PROMPT)
            for s in run.stats.layers:  # real entries: a ragged layer (AdaKV) pads its shorter heads
                assert s.entries <= H_KV * min(seen, s.budget), (start, s)
    assert max(s.prompt_length for s in run.stats.layers) == PROMPT
    assert all(s.evictions == -(-(PROMPT - BUDGET) // CHUNK) or s.evictions >= 1 for s in run.stats.layers)


@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_three_ways_to_chunk_agree(model, ids, name, params):
    """generate(prefill_chunk_size=N), compress(prefill_chunk=N) and a loop of N-token forwards
    keep the same entries (PyramidKV's length-dependent schedule aside, see below). transformers
    cuts from the start and evictkit from the end, so the prompt here is a multiple of N."""
    ids = ids[:, : PROMPT - PROMPT % CHUNK]
    with evictkit.compress(model, name, budget=BUDGET, **params) as by_hf:
        out_hf = _generate(model, ids, prefill_chunk_size=CHUNK)
    with evictkit.compress(model, name, budget=BUDGET, prefill_chunk=CHUNK, **params) as ours:
        out_ours = _generate(model, ids)
    if name != "pyramidkv":
        assert torch.equal(out_hf, out_ours)
        assert by_hf.stats.sizes() == ours.stats.sizes()
    assert all(s.entries <= H_KV * (s.budget + 6) for s in ours.stats.layers)  # 6 decoded, prefill-only ones


def test_pyramid_schedule_sees_the_whole_prompt_only_through_prefill_chunk(model, ids):
    """transformers' chunking hides the prompt's length: the schedule is the first chunk's."""
    with evictkit.compress(model, "pyramidkv", budget=BUDGET, window=8, prefill_chunk=CHUNK) as run:
        model(ids)
    one_shot = evictkit.compress(model, "pyramidkv", budget=BUDGET, window=8).schedule(PROMPT)
    assert [s.budget for s in run.stats.layers] == one_shot


@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_a_chunk_as_long_as_the_prompt_is_the_one_shot_prefill(model, ids, name, params):
    with evictkit.compress(model, name, budget=BUDGET, **params) as one_shot:
        out = _generate(model, ids)
        kept = one_shot.kept_positions()
    with evictkit.compress(model, name, budget=BUDGET, prefill_chunk=PROMPT, **params) as chunked:
        out_chunked = _generate(model, ids)
        kept_chunked = chunked.kept_positions()
    assert torch.equal(out, out_chunked)
    assert all(torch.equal(kept[li], kept_chunked[li]) for li in kept)


@pytest.mark.parametrize("chunk", [1, 7, CHUNK])
@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_a_budget_above_the_prompt_changes_nothing_whatever_the_chunk(model, ids, name, params, chunk):
    full = _generate(model, ids)
    with evictkit.compress(model, name, budget=PROMPT + 10, prefill_chunk=chunk, **params):
        out = _generate(model, ids)
    assert torch.equal(out, full)


@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_positions_stay_true_across_chunks(model, ids, name, params):
    with evictkit.compress(model, name, budget=BUDGET, prefill_chunk=CHUNK, **params) as run:
        _generate(model, ids)
        kept = run.kept_positions()
    decoded = torch.arange(PROMPT, PROMPT + 5)  # the 6th generated token is not cached yet
    prefill_only = evictkit.policies()[name].phases == ("prefill",)
    for li, pos in kept.items():
        for row in pos.flatten(0, 1):
            real = row[row >= 0]  # -1 marks the padding of a ragged layer
            assert bool((real[1:] > real[:-1]).all()) and int(real.min()) >= 0 and int(real.max()) < PROMPT + 5, li
            if prefill_only:
                assert torch.equal(real[-5:], decoded), (li, real)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunked_eviction_equals_full_attention_masked_to_what_was_kept(attn, ids):
    """The reference: one full-attention forward over the whole prompt, each query masked to the
    entries the cache held when its chunk ran (the kept set after the previous chunk, plus its own
    chunk causally). StreamingLLM keeps the same set in every layer, so one mask serves them all."""
    model = tiny_model(layers=2, attn=attn)
    cache = DynamicCache(config=model.config)
    visible = torch.zeros(PROMPT, PROMPT, dtype=torch.bool)
    kept = torch.empty(0, dtype=torch.long)
    with evictkit.compress(model, "streaming_llm", budget=BUDGET) as run:
        for start in range(0, PROMPT, CHUNK):
            end = min(start + CHUNK, PROMPT)
            rows = torch.arange(start, end)
            visible[rows[:, None], kept[None, :]] = True
            visible[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            logits = model(ids[:, start:end], **cache_arg(model, cache), use_cache=True).logits
            layers = run.kept_positions()
            kept = layers[0][0, 0]
            assert all(torch.equal(p, layers[0].expand_as(p)) for p in layers.values())
    assert len(kept) == BUDGET
    if attn == "sdpa":
        mask = visible[None, None]
    else:
        mask = torch.where(visible, 0.0, torch.finfo(torch.float32).min)[None, None]
    reference = model(ids, attention_mask=mask).logits[:, -logits.shape[1]:]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)


def test_a_fractional_budget_needs_the_whole_prompt(model, ids):
    with pytest.raises(ValueError, match="fraction of the prompt.*prefill_chunk=N"):
        with evictkit.compress(model, "snapkv", budget=0.9, window=8):
            _generate(model, ids, prefill_chunk_size=CHUNK)
    with evictkit.compress(model, "snapkv", budget=0.25, window=8, prefill_chunk=CHUNK) as run:
        _generate(model, ids)
    assert {s.budget for s in run.stats.layers} == {PROMPT // 4}


def test_a_chunked_forward_returns_the_last_chunk(model, ids):
    """Chunks are cut from the end: the first takes the remainder, the last is whole."""
    with evictkit.compress(model, "snapkv", budget=BUDGET, window=8, prefill_chunk=CHUNK) as run:
        out = model(ids)
    assert out.logits.shape[1] == CHUNK
    assert run.stats.sizes() == [BUDGET, BUDGET]
    assert max(s.prompt_length for s in run.stats.layers) == PROMPT


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_prefill_chunk_is_checked(model, bad):
    with pytest.raises(ValueError, match=r"prefill_chunk=.*int >= 1"):
        evictkit.compress(model, "snapkv", budget=BUDGET, prefill_chunk=bad)
