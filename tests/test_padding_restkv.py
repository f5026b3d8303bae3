"""ReST-KV on left-padded batches stepped as one (evictkit.padded): the cases tests/test_batches.py
does not reach, and the padding-aware pieces of the scorer against hand-worked examples."""

from __future__ import annotations

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
