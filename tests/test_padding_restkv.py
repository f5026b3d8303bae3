"""ReST-KV on left-padded batches stepped as one (evictkit.padded): the cases tests/test_batches.py
does not reach, and the padding-aware pieces of the scorer against hand-worked examples."""

from __future__ import annotations

import contextlib

import pytest
import torch
from generation import left_padded

import evictkit
from evictkit.plugins import _restkv_aws as AWS
from evictkit.plugins import _restkv_math as M
from evictkit.specs.tiny import tiny_model


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _run(model, ids, mask, budget, new, **kw):
    with evictkit.compress(model, "restkv", budget=budget, phase="both", **kw) as run:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        kept = run.kept_positions()
    return out, kept


def _kept(kept, row):
    return {li: [h[h >= 0].tolist() for h in pos[row]] for li, pos in kept.items()}


def _assert_batch_law(lengths, budget, new, **kw):
    model = tiny_model(layers=2)
    prompts = _prompts(lengths)
    ids, mask = left_padded(prompts)
    width = ids.shape[1]
    out, kept = _run(model, ids, mask, budget, new, **kw)
    for i, p in enumerate(prompts):
        alone, kept_alone = _run(model, p[None], torch.ones(1, len(p), dtype=torch.long), budget, new, **kw)
        assert torch.equal(out.sequences[i, width:], alone.sequences[0, len(p):]), i
        assert _kept(kept, i) == _kept(kept_alone, 0), i
        for step, (b, a) in enumerate(zip(out.scores, alone.scores)):
            torch.testing.assert_close(b[i], a[0], atol=1e-4, rtol=0, msg=f"row {i} step {step}")


def test_rows_shorter_than_the_window_carry_their_own_ema():
    """Rows of 5 and 3 tokens have fewer real window queries than the window (8): the carried EMA
    weighs only theirs (the oldest keeps (1 - alpha)^(n - 1)), so their decode evictions match."""
    _assert_batch_law([5, 30, 3], budget=12, new=12, window=8)


def test_rows_with_different_budgets_keep_their_own_aws_for_decode():
    """Fraction budgets give each row its own budget, so select() runs once per budget; a small
    beta makes AWS's kernel and shift differ between them. Each row's decode evictions reuse the
    parameters of its own prefill eviction, one-shot and in chunks."""
    _assert_batch_law([80, 60, 45], budget=0.3, new=8, window=4, beta=3.0)
    _assert_batch_law([80, 60, 45], budget=0.3, new=8, window=4, beta=3.0, prefill_chunk=16)


def _context_then_question(model, contexts, questions, as_decode, steps=6, **kw):
    """Each row's context (none: it starts at the question), then its question in one forward
    (under `as_decode()` if asked), then `steps` greedy tokens: (tokens [B, steps], kept)."""
    from evictkit.hf import cache_arg, new_cache

    ids, mask = left_padded(contexts) if max(map(len, contexts)) else (None, torch.zeros(len(contexts), 0).long())
    q_ids, q_mask = left_padded(questions)
    with torch.no_grad(), evictkit.compress(model, "restkv", budget=24, window=4, phase="both", **kw) as run:
        cache = new_cache(model)
        if ids is not None:
            model(ids, attention_mask=mask, **cache_arg(model, cache))
        mask = torch.cat([mask, q_mask], dim=1)
        with run.as_decode() if as_decode else contextlib.nullcontext():
            logits = model(q_ids, attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
        tokens = []
        for _ in range(steps):
            tokens.append(logits.argmax(-1))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = model(tokens[-1][:, None], attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
        return torch.stack(tokens, 1), run.kept_positions()


@pytest.mark.parametrize("kw", [{}, {"temporal": "mean"}, {"decode": "window"}], ids=repr)
@pytest.mark.parametrize("case", ["one-token-question", "row-starts-under-as-decode"])
def test_rows_of_both_phases_in_one_forward_each_keep_their_own(case, kw):
    """A padded forward can hold a row in its prefill beside one decoding (obs.phase is then
    "prefill"): a one-token question beside a 6-token one, or a row whose first tokens come in an
    `as_decode()` forward beside a running row. The decoding row updates and scores from its
    carried aggregate and keeps its norms, as alone (it was re-aggregated from the window)."""
    model = tiny_model(layers=2)
    if case == "one-token-question":
        contexts, questions, as_decode = _prompts([40, 40]), _prompts([6, 1], seed=1), False
    else:
        contexts, questions, as_decode = [*_prompts([40]), torch.zeros(0).long()], _prompts([4, 4], seed=1), True
    tokens, kept = _context_then_question(model, contexts, questions, as_decode, **kw)
    for i, (c, q) in enumerate(zip(contexts, questions)):
        t1, k1 = _context_then_question(model, [c], [q], as_decode, **kw)
        assert torch.equal(tokens[i], t1[0]), i
        assert _kept(kept, i) == _kept(k1, 0), i


def test_the_adaptive_pool_replicates_from_the_first_real_slot():
    scores = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 4.0]])  # two junk padding slots, then a row of 4
    kernel, shift = torch.tensor([3]), torch.tensor([-1])
    padded = AWS.shifted_avg_pool(scores, kernel, shift, first=torch.tensor([2]))
    alone = AWS.shifted_avg_pool(scores[:, 2:], kernel, shift)
    # by hand: window [i-2, i], the row's left edge 1.0 replicated
    torch.testing.assert_close(alone, torch.tensor([[1.0, 4 / 3, 2.0, 3.0]]))
    torch.testing.assert_close(padded[:, 2:], alone)
    no_padding = AWS.shifted_avg_pool(scores[:, 2:], kernel, shift, first=torch.tensor([0]))
    assert torch.equal(no_padding, alone)


def test_row_temporal_weights_skip_the_padding_queries():
    real = torch.tensor([[True, True, True, True], [False, False, True, True], [False, False, False, False]])
    w = M.row_temporal_weights(real, "ema", 0.3, dtype=torch.float64)
    torch.testing.assert_close(w[0], M.temporal_weights(4, "ema", 0.3, dtype=torch.float64))
    torch.testing.assert_close(w[1], torch.tensor([0.0, 0.0, 0.7, 0.3], dtype=torch.float64))  # n = 2 by hand
    assert not w[2].any()
    rows = torch.rand(3, 2, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(M.aggregate(rows, w)[1], M.aggregate(rows[1:2, :, 2:], w[1, 2:])[0])
