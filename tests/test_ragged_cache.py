"""Ragged cache layers: AdaKV's heads stored with exactly their own lengths, read by varlen attention."""

import pytest
import torch

import evictkit
from evictkit.hf import cache_arg, cache_of
from evictkit.ragged_cache import RaggedLayer
from evictkit.specs.tiny import tiny_model

PROMPT, BUDGET, NEW, H_KV, D = 120, 32, 8, 2, 16


def _run(model, ids, layout, **kw):
    with evictkit.compress(model, "adakv", budget=BUDGET, window=8, ragged_layout=layout, **kw) as run:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        kept = run.kept_positions()
        layers = list(cache_of(out).layers)
    return out, kept, layers, run


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kw", [{}, {"phase": "both"}, {"prefill_chunk": 48}], ids=["prefill", "decode", "chunked"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_varlen_equals_attention_over_the_same_entries_laid_out_dense(ids, attn, kw):
    """The padded layout is the dense reference: the same kept entries, padding hidden by masks."""
    model = tiny_model(layers=2, attn=attn, kv_heads=H_KV, heads=4)
    dense, kept_dense, _, _ = _run(model, ids, "padded", **kw)
    varlen, kept, layers, _ = _run(model, ids, "varlen", **kw)
    assert any(isinstance(layer, RaggedLayer) for layer in layers)
    assert torch.equal(varlen.sequences, dense.sequences)
    for a, b in zip(varlen.scores, dense.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert all(torch.equal(kept[li], kept_dense[li]) for li in kept)
    assert model.config._attn_implementation == attn  # restored on exit


def test_each_head_holds_exactly_its_entries_and_the_layer_its_budget(ids):
    model = tiny_model(layers=2, kv_heads=H_KV, heads=4)
    with evictkit.compress(model, "adakv", budget=BUDGET, window=8) as run:
        out = model(ids, use_cache=True)
        layers = list(cache_of(out).layers)
        kept = run.kept_positions()
    for li, layer in enumerate(layers):
        assert isinstance(layer, RaggedLayer)
        assert int(layer.counts.sum()) == H_KV * BUDGET  # the layer total: H_kv x budget
        assert layer.counts.tolist() == (kept[li] >= 0).sum(-1).tolist()  # each head its own allocation
        held = layer.keys.nbytes + layer.values.nbytes
        ideal = H_KV * BUDGET * D * 2 * layer.keys.element_size()
        assert held == ideal  # the offsets are computed from counts [B, H_kv]: no padding stored


def test_the_cache_gets_its_padded_layout_back_on_exit(ids):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model(layers=2, kv_heads=H_KV, heads=4)
    with evictkit.compress(model, "adakv", budget=BUDGET, window=8):
        out = model(ids, use_cache=True)
        assert model.config._attn_implementation == "evictkit_varlen_sdpa"
        assert "evictkit_varlen_sdpa" in ALL_ATTENTION_FUNCTIONS
    assert model.config._attn_implementation == "sdpa"
    assert "evictkit_varlen_sdpa" not in ALL_ATTENTION_FUNCTIONS
    assert not any(isinstance(layer, RaggedLayer) for layer in cache_of(out).layers)
    assert all(layer.keys.dim() == 4 for layer in cache_of(out).layers)


def test_beam_search_over_ragged_layers(ids):
    model = tiny_model(layers=2, kv_heads=H_KV, heads=4)
    with evictkit.compress(model, "adakv", budget=BUDGET, window=8, ragged_layout="padded"):
        dense = model.generate(ids, num_beams=3, max_new_tokens=6, do_sample=False)
    with evictkit.compress(model, "adakv", budget=BUDGET, window=8):
        varlen = model.generate(ids, num_beams=3, max_new_tokens=6, do_sample=False)
    assert torch.equal(dense, varlen)


def test_a_bad_layout_is_refused(ids):
    with pytest.raises(ValueError, match="ragged_layout='flat': must be one of varlen, padded"):
        evictkit.compress(tiny_model(layers=1), "adakv", budget=BUDGET, ragged_layout="flat")


@pytest.mark.slow
@pytest.mark.parametrize("budget", [64, 256, 1024])
def test_smollm2_generates_the_same_tokens_in_both_layouts(budget):
    model, tok = evictkit.load_model("smollm2")
    from evictkit.eval.tokenizer import ByteTokenizer  # noqa: F401  (the prompts below are model tokens)

    g = torch.Generator().manual_seed(budget)
    for _ in range(10):
        ids = torch.randint(100, 20000, (1, 1100), generator=g)  # over the largest budget
        outs = []
        for layout in ("padded", "varlen"):
            with evictkit.compress(model, "adakv", budget=budget, ragged_layout=layout):
                outs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                           do_sample=False))
        assert torch.equal(outs[0], outs[1]), budget


def test_the_varlen_layout_comes_back_when_a_block_is_entered_again(ids):
    """A block's exit gives the cache its padded layout; decoding in the block again (no eviction)
    stores each head-padded layer ragged again, one length per head."""
    model = tiny_model(layers=2)
    comp = evictkit.compress(model, "adakv", budget=12, window=4)
    with comp, torch.no_grad():
        out = model(ids, use_cache=True)
    cache = cache_of(out)
    assert not any(isinstance(layer, RaggedLayer) for layer in cache.layers)  # padded outside the block
    with comp, torch.no_grad():
        model(out.logits[:, -1:].argmax(-1), use_cache=True, **cache_arg(model, cache))
        assert all(isinstance(layer, RaggedLayer) for layer in cache.layers)
