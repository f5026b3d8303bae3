"""LaCache in a left-padded batch stepped as one: each row runs its own ladder, from its first
real slot, with its own cursor; rows of one budget keep different counts (a ragged selection)."""

from types import SimpleNamespace

import pytest
import torch
from generation import left_padded

import evictkit
import evictkit.padded
import evictkit.rows
from evictkit.padded import Rows
from evictkit.plugins.lacache import SCRATCH, LaCache, LadderState
from evictkit.specs.tiny import tiny_model

# 4 layers, span 1: block 4, keep 1, free 3; budget 24 -> capacity 23, 24 after the compensation
LAYERS, BUDGET = 4, 24
POLICY = LaCache(span=1)


def _obs(real, selecting, layer=0, scratch=None, H=2):
    """A padded batch's Observation as select() reads it: rows of `real` entries, left-padded."""
    T = max(real)
    pad = torch.tensor([T - n for n in real])
    valid = (torch.arange(T) >= pad[:, None])[:, None, :].expand(len(real), H, T)
    rows = Rows(prefill=torch.ones(len(real), dtype=torch.bool), active=torch.ones(len(real), dtype=torch.bool),
                selecting=torch.tensor(selecting))
    return SimpleNamespace(positions=torch.where(valid, 0, -1), valid=valid, rows=rows, keys=torch.zeros(1),
                           scratch={} if scratch is None else scratch, layer_idx=layer, n_layers=LAYERS)


def _kept(sel, b):
    idx, counts = sel
    assert torch.equal(idx[b, 0], idx[b, 1]) and counts[b, 0] == counts[b, 1]  # every head the same
    n = int(counts[b, 0])
    return idx[b, 0, idx.shape[-1] - n:].tolist() if n else []


def test_rows_of_different_lengths_keep_different_counts_from_their_first_real_slot():
    obs = _obs([60, 45, 25, 12], [True, False, True, False])
    sel = POLICY.select(obs, BUDGET)
    # 60 real: need 60 - 24 = 36 -> 12 blocks of 4 from the sinks keep one each, slots 4, 8, ..., 48
    assert _kept(sel, 0) == [0, 1, 2, 3, *range(4, 52, 4), *range(52, 60)]
    # 25 real after 35 padding slots: need 1 -> one block (slot 4 of the row), the rest from slot 8
    assert _kept(sel, 2) == [35 + s for s in [0, 1, 2, 3, 4, *range(8, 25)]]
    assert _kept(sel, 1) == [] and _kept(sel, 3) == []  # not decided by this call
    # cursors advance only for the rows this call decided
    assert obs.scratch[SCRATCH] == [LadderState(16, 24, True), None, LadderState(5, 24, True), None]

    # next step: row 0 holds 25 after 20 padding slots (its cursor 16: one block at 16), row 1
    # evicts for the first time
    obs = _obs([25, 45, 23, 13], [True, True, False, False], scratch=obs.scratch)
    sel = POLICY.select(obs, BUDGET)
    assert _kept(sel, 0) == [20 + s for s in [*range(16), 16, *range(20, 25)]]
    assert _kept(sel, 1) == [0, 1, 2, 3, *range(4, 32, 4), *range(32, 45)]
    assert obs.scratch[SCRATCH] == [LadderState(17, 24, True), LadderState(11, 24, True),
                                    LadderState(5, 24, True), None]


def test_the_staircase_offset_is_counted_from_the_first_real_slot():
    sel = POLICY.select(_obs([40, 25], [False, True], layer=1), BUDGET)
    assert _kept(sel, 1) == [15 + s for s in [0, 1, 2, 3, 5, *range(8, 25)]]  # layer 1 keeps block offset 1


def test_a_batch_stepped_as_one_so_far_gives_every_row_its_shared_state():
    shared = LadderState(16, 24, True)
    obs = _obs([25, 25], [True, False], scratch={SCRATCH: shared})
    POLICY.select(obs, BUDGET)
    assert obs.scratch[SCRATCH] == [LadderState(17, 24, True), shared]


def test_outside_padded_batches_one_state_and_a_rectangular_selection():
    obs = _obs([25, 25], [True, True])
    obs.rows, obs.valid = None, None
    idx = POLICY.select(obs, BUDGET)
    assert idx.shape == (2, 2, 22) and idx[0, 0].tolist() == [0, 1, 2, 3, 4, *range(8, 25)]
    assert obs.scratch[SCRATCH] == LadderState(5, 24, True)


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=LAYERS)


def test_a_padded_batch_is_stepped_as_one_and_each_row_keeps_what_it_keeps_alone(model, monkeypatch):
    calls = {"padded": 0, "rows": 0}
    for mod, fn, key in ((evictkit.padded, "padded_step", "padded"), (evictkit.rows, "rows_step", "rows")):
        original = getattr(mod, fn)

        def counted(*a, _original=original, _key=key, **k):
            calls[_key] += 1
            return _original(*a, **k)

        monkeypatch.setattr(mod, fn, counted)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (60, 45, 25, 12)]

    def kept(ids, mask):
        with evictkit.compress(model, "lacache", budget=BUDGET, span=1, phase="both") as run:
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            return run.kept_positions()

    batch = kept(*left_padded(prompts))
    assert calls == {"padded": LAYERS * 4, "rows": 0}
    sizes = set()
    for i, p in enumerate(prompts):
        alone = kept(p[None], torch.ones(1, len(p), dtype=torch.long))
        for li in batch:
            assert [h[h >= 0].tolist() for h in batch[li][i]] == [h.tolist() for h in alone[li][0]], (i, li)
        sizes.add(int((batch[0][i][0] >= 0).sum()))
    assert len(sizes) > 1  # rows of one budget kept different counts
