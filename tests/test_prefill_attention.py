"""Prefill attention, the second plugin type (issue 25): laws, estimates against brute force, the
scoped attention function in real (tiny) models, composition with eviction, and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from models import tiny_model

import evictkit
from evictkit.hf import attn_implementation, cache_arg, cache_of, new_cache
from evictkit.kernels.sparse_prefill_ref import token_mask
from evictkit.registry import build_prefill_attention, get_registry
from evictkit.specs.prefill_laws import PrefillLawViolation, check_pattern_laws, check_prefill_laws

SMALL = {  # sparse on the tiny shapes below
    "a_shape": dict(n_init=4, n_local=20, block=16),
    "tri_shape": dict(n_init=4, n_local=20, n_last=10, block=16),
    "vertical_slash": dict(vertical_size=30, slash_size=50, last_q=16, block=16),
    "xattention": dict(threshold=0.5, block=32, stride=8),
}
FULL = {  # parameters that select every causal pair
    "a_shape": dict(n_local=10**6, block=16),
    "tri_shape": dict(n_local=10**6, block=16),
    "vertical_slash": dict(vertical_size=10**6, slash_size=10**6, block=16),
    "xattention": None,  # a threshold of 1 can still drop blocks whose mass underflows: no parameter implies it
}


def test_the_built_ins_are_registered_through_entry_points():
    assert {"dense", "a_shape", "tri_shape", "vertical_slash", "xattention"} <= set(evictkit.prefill_attentions())
    entry = get_registry().prefill_entries["vertical_slash"]
    assert entry.package == "evictkit"


def test_dense_equals_sdpa():
    check_prefill_laws(build_prefill_attention("dense"))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_laws_of_each_built_in(name):
    full = FULL[name]
    check_prefill_laws(build_prefill_attention(name, **SMALL[name]),
                       full=build_prefill_attention(name, **full) if full else None)


def test_the_laws_catch_a_pattern_without_the_diagonal_and_one_that_lies_about_its_density():
    import attrs

    @attrs.frozen
    class NoDiagonal(evictkit.PatternAttention):
        name = "no_diagonal"

        def pattern(self, query, key, scale):
            q, S = query.shape[2], key.shape[2]
            return torch.zeros(1, q, S, dtype=torch.bool).index_fill_(2, torch.tensor([0]), True), 1

    with pytest.raises(PrefillLawViolation, match="no empty row"):
        check_pattern_laws(NoDiagonal())

    @attrs.frozen
    class Lies(evictkit.PatternAttention):
        name = "lies"

        def pattern(self, query, key, scale):
            return torch.ones(1, key.shape[2], key.shape[2], dtype=torch.bool)[:, : query.shape[2]], 1

        def attend(self, query, key, value, *, scale, executor="torch"):
            res = super().attend(query, key, value, scale=scale)
            return evictkit.PrefillOutput(res.out, res.computed // 2, res.causal)

    with pytest.raises(PrefillLawViolation, match="density is what it reports"):
        check_pattern_laws(Lies())


def test_the_executor_computes_only_the_selected_pairs():
    """A_shape's density is its window's: sinks + window rows over the causal triangle, counted by hand."""
    q = S = 256
    method = build_prefill_attention("a_shape", n_init=0, n_local=32, block=32)
    query, key = torch.randn(1, 2, q, 8), torch.randn(1, 1, S, 8)
    res = method.attend(query, key, torch.randn(1, 1, S, 8), scale=0.3)
    # block i (rows 32i..32i+31) selects slots 32i-31 .. 32i+31, causal: the first block 1..32 per row,
    # later blocks 32 + (r - 32i) + 1 per row r
    per_head = sum(r + 1 for r in range(32)) + sum(31 + (r % 32) + 1 for r in range(32, q))
    assert res.computed == 2 * per_head
    assert math.isclose(res.density, per_head / (q * (q + 1) / 2))


# --- the estimates against brute force -----------------------------------------------------------------------
def test_vertical_slash_estimate_matches_a_loop_over_the_last_rows():
    torch.manual_seed(1)
    q, S, D, L = 40, 50, 8, 6
    method = build_prefill_attention("vertical_slash", vertical_size=33, slash_size=52, last_q=L)
    query, key = torch.randn(1, 2, q, D), torch.randn(1, 1, S, D) * 3
    columns, offsets = method.estimate(query, key, 0.5)
    for h in range(2):
        v = torch.zeros(S)
        s = torch.zeros(S)
        for r in range(q - L, q):
            slot = S - q + r
            w = torch.softmax(torch.stack([query[0, h, r] @ key[0, 0, j] * 0.5 for j in range(slot + 1)]), 0)
            for j in range(slot + 1):
                v[j] += w[j]
                s[slot - j] += w[j]
        v[:30], s[:100] = math.inf, math.inf
        assert set(columns[h].nonzero().flatten().tolist()) == set(v.topk(33).indices.tolist())
        # slash_size 52 >= S: every offset
        assert offsets[h].all() and s.isfinite().sum() == 0


def test_vertical_slash_bands_are_the_kept_offsets_of_each_block_row():
    torch.manual_seed(2)
    q, S, block = 48, 64, 16
    method = build_prefill_attention("vertical_slash", vertical_size=30, slash_size=50, last_q=8, block=block)
    query, key = torch.randn(1, 1, q, 8), torch.randn(1, 1, S, 8)
    columns, offsets = method.estimate(query, key, 0.3)
    selected, _ = method.pattern(query, key, 0.3)
    for i in range(q // block):
        want = set(columns[0].nonzero().flatten().tolist())
        for r in range(i * block, (i + 1) * block):
            want |= {S - q + r - o for o in offsets[0].nonzero().flatten().tolist() if 0 <= S - q + r - o}
        assert set(selected[0, i].nonzero().flatten().tolist()) == want


def test_xattention_block_scores_match_the_antidiagonal_sums():
    torch.manual_seed(3)
    q = S = 64
    D, st, blk = 4, 4, 16
    method = build_prefill_attention("xattention", threshold=0.9, stride=st, block=blk)
    query, key = torch.randn(1, 1, q, D), torch.randn(1, 1, S, D)
    W = method.block_scores(query, key)
    n = q // st
    r = torch.full((n, n), -math.inf)
    for i in range(n):
        for j in range(i + 1):
            r[i, j] = sum(query[0, 0, i * st + st - 1 - t] @ key[0, 0, j * st + t] for t in range(st)) / (D**0.5 * st)
    P = torch.softmax(r, -1)
    per = blk // st
    want = P.view(q // blk, per, S // blk, per).sum((1, 3))
    torch.testing.assert_close(W[0], want, atol=1e-5, rtol=0)


def test_xattention_keeps_blocks_up_to_the_threshold_and_more_with_a_higher_one():
    torch.manual_seed(4)
    query, key = torch.randn(1, 2, 256, 8) * 2, torch.randn(1, 2, 256, 8) * 2
    sets = [build_prefill_attention("xattention", threshold=t, block=32).pattern(query, key, 0.35)[0]
            for t in (0.3, 0.6, 0.95)]
    assert (sets[0] <= sets[1]).all() and (sets[1] <= sets[2]).all() and sets[0].sum() < sets[2].sum()
    assert sets[0][:, :, :32].all()  # block 0 forced


# --- in a model ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, attn="sdpa").requires_grad_(False)


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_dense_is_the_default_and_installs_nothing(model):
    ids = _ids(120)
    want = model(ids).logits
    with evictkit.compress(model, "snapkv", budget=10**4) as run:
        assert attn_implementation(model.config) == "sdpa" and run.prefill is None
        got = model(ids).logits
    with evictkit.use_prefill_attention(model, "dense"):
        assert attn_implementation(model.config) == "sdpa"
        got2 = model(ids).logits
    assert torch.equal(got, want) and torch.equal(got2, want)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["a_shape", "tri_shape", "vertical_slash"])
def test_full_density_generates_the_dense_tokens(name, attn):
    m = tiny_model("llama", layers=2, heads=4, kv_heads=2, head_dim=16, attn=attn)
    ids = _ids(150)
    want = m.generate(ids, max_new_tokens=6, do_sample=False)
    with evictkit.use_prefill_attention(m, name, **FULL[name]) as scope:
        assert attn_implementation(m.config) == f"evictkit_prefill_{attn}"
        got = m.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert attn_implementation(m.config) == attn
    assert scope.stats.forwards == 2 and scope.stats.density() == 1.0  # the prefill of both layers, no decode


@pytest.mark.parametrize("name", sorted(SMALL))
def test_sparse_prefill_changes_the_prefill_and_leaves_decode_to_the_model(model, name):
    import copy

    ids = _ids(200)
    with evictkit.use_prefill_attention(model, name, **SMALL[name]) as scope:
        out = model(ids, **cache_arg(model, new_cache(model)))
        nxt = out.logits[:, -1:].argmax(-1)
        cache = cache_of(out)
        step_inside = model(nxt, **cache_arg(model, copy.deepcopy(cache))).logits
    assert 0 < scope.stats.density() < 1 and scope.stats.forwards == 2  # the decode step was not served
    assert not torch.allclose(out.logits, model(ids).logits, atol=1e-4)
    step_outside = model(nxt, **cache_arg(model, copy.deepcopy(cache))).logits
    assert torch.equal(step_inside, step_outside)


def test_layer_0_policy_inputs_are_those_of_dense_prefill(model):
    """Layer 0's hidden states do not depend on attention, and SnapKV recomputes its window
    attention densely: layer 0 keeps the same entries under a sparse prefill."""
    ids = _ids(240)
    kept = {}
    for method in (None, "vertical_slash"):
        params = SMALL["vertical_slash"] if method else None
        with evictkit.compress(model, "snapkv", budget=40, prefill_attention=method, prefill_params=params) as run:
            model(ids)
            kept[method] = run.kept_positions()
        assert method is None or 0 < run.prefill.stats.density() < 1
    assert torch.equal(kept[None][0], kept["vertical_slash"][0])


def test_chunked_prefill_serves_every_chunk(model):
    ids = _ids(200)
    with evictkit.use_prefill_attention(model, "a_shape", **FULL["a_shape"]) as scope:
        full = model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=64)
    assert scope.stats.forwards >= 2 * 3  # several chunks per layer, each a prefill forward with an offset
    assert torch.equal(full, model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=64))
    with evictkit.compress(model, "snapkv", budget=48, prefill_chunk=64, prefill_attention="a_shape",
                           prefill_params=SMALL["a_shape"]) as run:
        model.generate(ids, max_new_tokens=2, do_sample=False)
    assert run.prefill.stats.forwards == 2 * 4 and run.prefill.stats.density() < 1  # 4 chunks (8 + 3 x 64)


def test_ragged_policies_are_refused_up_front(model):
    """Per-head counts (AdaKV, tag ragged_heads) need the model's own attention (per-head masks) or
    the varlen one; a sparse prefill attention replaces it, so the block refuses before any forward."""
    with pytest.raises(ValueError, match="policy 'adakv' keeps different counts per KV head .tag ragged_heads."):
        evictkit.compress(model, "adakv", budget=48, window=8, prefill_attention="tri_shape")
    with evictkit.compress(model, "adakv", budget=48, window=8, prefill_attention="dense") as run:
        assert run.prefill is not None and run.prefill.method.dense  # dense installs nothing: no conflict
        model.generate(_ids(160), max_new_tokens=2, do_sample=False)
    assert attn_implementation(model.config) == "sdpa"


def test_the_attention_is_restored_after_an_exception(model):
    with pytest.raises(KeyError), evictkit.use_prefill_attention(model, "a_shape"):
        raise KeyError("boom")
    assert attn_implementation(model.config) == "sdpa"
    with evictkit.use_prefill_attention(model, "a_shape"), pytest.raises(RuntimeError, match="cannot be nested"):
        evictkit.use_prefill_attention(model, "xattention").__enter__()


# --- errors and the registry ----------------------------------------------------------------------------------
def test_bad_names_and_parameters_are_clear_value_errors(model):
    with pytest.raises(ValueError, match="unknown prefill attention 'vertical_slsh'.*did you mean 'vertical_slash'"):
        evictkit.compress(model, "snapkv", budget=64, prefill_attention="vertical_slsh")
    with pytest.raises(ValueError, match=r"n_local=0: must be an int >= 1 \(default 3968\)"):
        evictkit.use_prefill_attention(model, "a_shape", n_local=0)
    with pytest.raises(ValueError, match="threshold=1.5: must be a number in"):
        evictkit.use_prefill_attention(model, "xattention", threshold=1.5)
    with pytest.raises(ValueError, match="has no parameter window"):
        evictkit.use_prefill_attention(model, "a_shape", window=3)
    with pytest.raises(ValueError, match="prefill_params .* without a prefill_attention"):
        evictkit.compress(model, "snapkv", budget=64, prefill_params={"n_local": 3})
    with pytest.raises(ValueError, match="prefill_attention must be"):
        evictkit.compress(model, "snapkv", budget=64, prefill_attention=3)


def test_an_unsupported_attention_implementation_is_refused():
    m = tiny_model("llama", layers=1, attn="sdpa")
    m.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation to be one of sdpa, eager, got 'flex_attention'"):
        evictkit.use_prefill_attention(m, "a_shape").__enter__()


def test_a_third_party_prefill_attention_registers_through_the_hook():
    import attrs

    @attrs.frozen
    class Sinks(evictkit.PatternAttention):
        name = "sinks_only"

        def pattern(self, query, key, scale):
            q, S = query.shape[2], key.shape[2]
            sel = token_mask(torch.ones(1, q, S, dtype=torch.bool), q, 1)  # diagonal below
            return sel & ((torch.arange(S) < 2) | (torch.arange(S)[None] == torch.arange(S - q, S)[:, None]))[None], 1

    class Module:
        @staticmethod
        @evictkit.hookimpl
        def evictkit_register_prefill_attention(register):
            register(Sinks)
            register(int)

    reg = get_registry()
    reg.ensure_loaded()
    reg.pm.register(Module, name="test:sinks")
    try:
        with pytest.warns(RuntimeWarning, match="not an evictkit.PrefillAttention subclass"):
            reg._register_prefill_from(Module, "sinks", "third-party")
        assert reg.prefill_entries["sinks_only"].package == "third-party"
        check_pattern_laws(build_prefill_attention("sinks_only"))
    finally:
        reg.pm.unregister(name="test:sinks")
        reg.prefill_entries.pop("sinks_only", None)
        reg.failures[:] = [f for f in reg.failures if f.plugin != "sinks"]


def test_evictkit_list_shows_the_prefill_attentions(capsys):
    import json

    from evictkit.cli import main

    assert main(["list"]) == 0
    text = capsys.readouterr().out
    section = text.split("prefill attention  ", 1)[1]
    assert "vertical_slash" in section and "slash_size=6096" in section and "xattention" in section
    assert main(["list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["prefill_attentions"]}
    assert rows["a_shape"]["params"]["n_local"] == "3968" and rows["dense"]["package"] == "evictkit"
