"""Left-padded batches: a row of a batch gets exactly what its prompt gets alone (the batch law)."""

import contextlib

import pytest
import torch
from generation import TINY_POLICIES, left_padded
from hypothesis import given, settings
from hypothesis import strategies as st

import evictkit
from evictkit.specs.tiny import tiny_model

BUDGET, CHUNK, NEW = 24, 16, 6
POLICIES = TINY_POLICIES
IDS = [p for p, _ in POLICIES]


def test_every_registered_built_in_is_covered():
    built_in = {name for name, cls in evictkit.policies().items() if cls.__module__.startswith("evictkit.plugins.")}
    assert built_in == set(IDS)


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _run(model, ids, mask, name, params, **kw):
    with evictkit.compress(model, name, budget=kw.pop("budget", BUDGET), **params, **kw) as run:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        kept = run.kept_positions()
    return out, kept, run


def _kept_rows(kept, row):
    """Per layer, the real kept positions of one row, [H_kv] lists (padding, -1, dropped)."""
    return {li: [h[h >= 0].tolist() for h in pos[row]] for li, pos in kept.items()}


def _assert_batch_law(model, prompts, name, params, **kw):
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    out, kept, run = _run(model, ids, mask, name, params, **kw)
    for i, p in enumerate(prompts):
        alone, kept_alone, _ = _run(model, p[None], torch.ones(1, len(p), dtype=torch.long), name, params, **kw)
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, len(p):]), (name, i)
        assert _kept_rows(kept, i) == _kept_rows(kept_alone, 0), (name, i)
        for step, (b, a) in enumerate(zip(out.scores, alone.scores)):
            torch.testing.assert_close(b[i], a[0], atol=1e-4, rtol=0, msg=f"{name} row {i} step {step}")
    return run


@pytest.mark.parametrize("chunk", [None, CHUNK], ids=["one-shot", "chunked"])
@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_a_row_gets_what_it_gets_alone(model, name, params, chunk):
    run = _assert_batch_law(model, _prompts([60, 45, 30, 12]), name, params, prefill_chunk=chunk)
    if name != "full":
        # each row keeps min(its own prompt, budget) per head: the 12-token row loses nothing
        assert run.stats.layers[0].evictions >= 1


DECODE_TIME = [p for p in POLICIES if p[0] in ("snapkv", "restkv", "h2o", "tova")]


@pytest.mark.parametrize("name,params", DECODE_TIME, ids=[p for p, _ in DECODE_TIME])
def test_the_batch_law_holds_with_decode_time_eviction(model, name, params):
    _assert_batch_law(model, _prompts([40, 27, 33], seed=1), name, params, phase="both")


def test_a_fraction_budget_is_a_fraction_of_each_row(model):
    prompts = _prompts([80, 40])
    ids, mask = left_padded(prompts)
    _, kept, _ = _run(model, ids, mask, "snapkv", {"window": 4}, budget=0.25)
    assert [len(_kept_rows(kept, i)[0][0]) for i in range(2)] == [20 + NEW - 1, 10 + NEW - 1]


def test_padding_is_never_kept_or_scored(model):
    """A padding token's id changes nothing in any row: it is neither scored nor kept."""
    prompts = _prompts([50, 20])
    ids, mask = left_padded(prompts)
    first, kept, _ = _run(model, ids, mask, "h2o", {})
    ids[1, :30] = 7  # other padding ids
    second, kept2, _ = _run(model, ids, mask, "h2o", {})
    assert torch.equal(first.sequences[:, ids.shape[1]:], second.sequences[:, ids.shape[1]:])
    assert _kept_rows(kept, 1) == _kept_rows(kept2, 1)
    assert all(min(h) >= 0 and len(h) <= BUDGET + NEW for h in _kept_rows(kept, 1)[0])


def test_right_padding_is_refused_with_the_fix(model):
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with pytest.raises(ValueError, match="left-padded batches only.*padding_side = 'left'"):
        with evictkit.compress(model, "snapkv", budget=4, window=2):
            model.generate(ids, attention_mask=mask, max_new_tokens=2)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 50), min_size=2, max_size=3), seed=st.integers(0, 100))
def test_the_batch_law_over_random_lengths(lengths, seed):
    model = tiny_model(layers=2)
    _assert_batch_law(model, _prompts(lengths, seed), "snapkv", {"window": 4}, budget=16, prefill_chunk=8)


def _context_then_question(model, contexts, questions, name, params, *, as_decode, chunk=None, steps=4):
    """Each row's context, then its question (a left-padded batch of both when several rows), then
    `steps` greedy tokens: per row, the greedy tokens, the logits and the kept positions."""
    from evictkit.hf import cache_arg, new_cache

    ids, mask = left_padded(contexts)
    q_ids, q_mask = left_padded(questions)
    with torch.no_grad(), evictkit.compress(model, name, budget=BUDGET, prefill_chunk=chunk, **params) as run:
        cache = new_cache(model)
        model(ids, attention_mask=mask, **cache_arg(model, cache))
        mask = torch.cat([mask, q_mask], dim=1)
        scope = run.as_decode() if as_decode else contextlib.nullcontext()
        with scope:
            logits = model(q_ids, attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
        tokens, all_logits = [], [logits]
        for _ in range(steps):
            nxt = logits.argmax(-1)
            tokens.append(nxt)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(nxt[:, None], attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
            all_logits.append(logits)
        kept = run.kept_positions()
    return torch.stack(tokens, 1), torch.stack(all_logits, 1), kept


@pytest.mark.parametrize("lengths", [(50, 50, 37), (44, 44, 44)], ids=["padded-contexts", "equal-contexts"])
@pytest.mark.parametrize("as_decode", [False, True], ids=["question-as-chunk", "question-as-decode"])
@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_questions_of_different_lengths_share_forwards(model, name, params, as_decode, lengths):
    """Interior padding: rows whose questions differ in length run them in one forward, left-padded
    among the new tokens, after a padded batch or one whose rows were all real so far (stepped as
    one until then); each row still gets what it gets alone."""
    _assert_questions_as_alone(model, _prompts(list(lengths)), _prompts([9, 3, 6], seed=2), name, params,
                               as_decode=as_decode)


def _assert_questions_as_alone(model, contexts, questions, name, params, *, as_decode):
    """Each row of the batched context-then-question run gets its tokens, kept positions and
    logits (within 1e-4) alone."""
    tokens, logits, kept = _context_then_question(model, contexts, questions, name, params, as_decode=as_decode)
    for i, (c, q) in enumerate(zip(contexts, questions)):
        t1, l1, k1 = _context_then_question(model, [c], [q], name, params, as_decode=as_decode)
        assert torch.equal(tokens[i], t1[0]), (name, i)
        assert _kept_rows(kept, i) == _kept_rows(k1, 0), (name, i)
        torch.testing.assert_close(logits[i], l1[0], atol=1e-4, rtol=0, msg=f"{name} row {i}")


@pytest.mark.parametrize("name,params", POLICIES, ids=IDS)
def test_rows_in_both_phases_in_one_forward_evicting_at_decode_too(model, name, params):
    """A one-token question (a decode step alone) beside longer ones (prefill chunks alone), with
    eviction in both phases: each row is stepped in its own phase, and gets what it gets alone."""
    _assert_questions_as_alone(model, _prompts([50, 37, 44]), _prompts([1, 6, 3], seed=4), name,
                               {**params, "phase": "both"}, as_decode=False)


def test_interior_padding_in_chunks_and_right_padding_of_new_tokens(model):
    """A padded question arrives in evictkit's own chunks too; right padding among new tokens is refused."""
    contexts, questions = _prompts([40, 40]), _prompts([20, 7], seed=3)
    tokens, logits, kept = _context_then_question(model, contexts, questions, "snapkv", {"window": 4}, as_decode=False,
                                                  chunk=8)
    for i, (c, q) in enumerate(zip(contexts, questions)):
        t1, l1, k1 = _context_then_question(model, [c], [q], "snapkv", {"window": 4}, as_decode=False, chunk=8)
        assert torch.equal(tokens[i], t1[0]) and _kept_rows(kept, i) == _kept_rows(k1, 0), i
    from evictkit.hf import cache_arg, new_cache

    ids = torch.randint(3, 128, (2, 10))
    with evictkit.compress(model, "snapkv", budget=4, window=2):
        cache = new_cache(model)
        model(ids, **cache_arg(model, cache))
        mask = torch.ones(2, 14, dtype=torch.long)
        mask[1, -1] = 0  # the new tokens of row 1 padded on the right
        with pytest.raises(ValueError, match="left-padded batches only.*padding_side = 'left'"):
            model(torch.randint(3, 128, (2, 4)), attention_mask=mask, **cache_arg(model, cache))


def test_the_full_cache_never_evicts_whatever_the_phase(model):
    """`full` has no phase of its own: phase="both" leaves it the full cache (it used to evict
    and then fail the selection check)."""
    ids, mask = left_padded(_prompts([40, 27]))
    out, kept, run = _run(model, ids, mask, "full", {}, phase="both", budget=8)
    assert run.stats.layers[0].evictions == 0
    assert all(int((pos[0] >= 0).sum(-1).min()) == 40 + NEW - 1 for pos in kept.values())
