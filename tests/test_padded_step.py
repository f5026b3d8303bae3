"""A left-padded batch is stepped as one (evictkit.padded): no loop over rows, so the operations a
layer's step dispatches (on CUDA, its kernel launches) do not grow with the number of rows."""

import collections

import attrs
import pytest
import torch
from generation import left_padded
from torch.utils._python_dispatch import TorchDispatchMode

import evictkit
from evictkit import padded, rows
from evictkit.hf import cache_arg, new_cache
from evictkit.plugins.snapkv import SnapKV
from evictkit.specs.tiny import tiny_model

BUDGET = 16
_STEP, _ROWS_STEP = padded.padded_step, rows.rows_step


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


def _ops_per_step(model, monkeypatch, lengths, policy):
    """(ops dispatched by each padded step, whether the row-by-row path ran) for a padded prompt,
    a question of different lengths per row and two greedy steps."""
    g = torch.Generator().manual_seed(0)
    ids, mask = left_padded([torch.randint(3, 128, (n,), generator=g) for n in lengths])
    q_ids, q_mask = left_padded([torch.randint(3, 128, (1 + i % 3,), generator=g) for i in range(len(lengths))])
    counts, loops = [], []

    def counted(*args, **kwargs):
        with _CountOps() as mode:
            out = _STEP(*args, **kwargs)
        counts.append(sum(mode.ops.values()))
        return out

    def row_loop(*args, **kwargs):
        loops.append(1)
        return _ROWS_STEP(*args, **kwargs)

    monkeypatch.setattr(padded, "padded_step", counted)
    monkeypatch.setattr(rows, "rows_step", row_loop)
    with torch.no_grad(), evictkit.compress(model, policy[0], budget=BUDGET, **policy[1]) as c:
        cache = new_cache(model)
        out = model(ids, attention_mask=mask, **cache_arg(model, cache))
        mask = torch.cat([mask, q_mask], dim=1)
        out = model(q_ids, attention_mask=mask, **cache_arg(model, cache))
        for _ in range(2):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, **cache_arg(model, cache))
        assert c.stats.layers[0].evictions > 0
    return counts, bool(loops)


@pytest.mark.parametrize("policy", [("snapkv", {"window": 4}), ("knorm", {})], ids=["snapkv", "knorm"])
def test_a_padded_batch_steps_as_one_whatever_its_rows(model, monkeypatch, policy):
    small, loop_small = _ops_per_step(model, monkeypatch, [40, 30], policy)
    large, loop_large = _ops_per_step(model, monkeypatch, [40, 30, 35, 22, 40, 28], policy)
    assert not loop_small and not loop_large  # the row-by-row path never ran
    assert len(small) == len(large) == 2 * 4  # 2 layers x (prompt, question, 2 decode steps)
    assert small == large  # the same operations per layer step for 2 rows as for 6


def test_every_built_in_steps_a_padded_batch_as_one():
    """Every built-in honours padding (the kit's padding and batch laws check it), so no padded batch
    of a built-in takes the row-by-row path."""
    built_in = {n: c for n, c in evictkit.policies().items() if c.__module__.startswith("evictkit.plugins.")}
    assert [name for name, cls in built_in.items() if not evictkit.contract.declared(cls()).padding] == []


@attrs.define(frozen=True, kw_only=True)
class _RowByRowSnapKV(SnapKV):
    """SnapKV as a policy written before Needs.padding: its padded batches go row by row."""

    def needs(self):
        return attrs.evolve(super().needs(), padding=False)


def test_a_policy_without_padding_is_stepped_row_by_row_with_a_warning_and_the_same_result(model):
    g = torch.Generator().manual_seed(3)
    ids, mask = left_padded([torch.randint(3, 128, (n,), generator=g) for n in (40, 26, 33)])

    def kept(policy):
        with torch.no_grad(), evictkit.compress(model, policy, budget=BUDGET) as c:
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            return {li: [[h[h >= 0].tolist() for h in row] for row in pos] for li, pos in c.kept_positions().items()}

    with pytest.warns(DeprecationWarning, match="does not declare Needs.padding=True., so evictkit steps its padded"):
        by_rows = kept(_RowByRowSnapKV(window=4))
    assert by_rows == kept(SnapKV(window=4))
