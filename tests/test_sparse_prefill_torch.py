"""The sparse prefill executor (kernels/sparse_prefill_torch.py) against the masked-dense reference on
random patterns: one pattern for all heads, per-head patterns equal within a KV group (one call per
group) and different within it (one call per head), contiguous and scattered past slots, a causal
offset, a batch, and the matmul path used off the CPU."""

from __future__ import annotations

import pytest
import torch

from evictkit.kernels import sparse_prefill_torch as executor
from evictkit.kernels.sparse_prefill_ref import sparse_prefill_ref, token_mask


def _pattern(P: int, q: int, S: int, block: int, density: float, gen: torch.Generator) -> torch.Tensor:
    nq = -(-q // block)
    sel = torch.rand(P, nq, S, generator=gen) < density
    for i in range(nq):  # every row's own slot
        sel[:, i, S - q + i * block: S - q + min(q, (i + 1) * block)] = True
    return sel


CASES = [  # (H_q, H_kv, q, S, D, block, P, density)
    (4, 2, 150, 150, 16, 16, 1, 0.3),  # one pattern, GQA stacked
    (6, 2, 97, 161, 8, 16, 6, 0.3),  # per head, a later chunk (offset 64)
    (9, 3, 70, 70, 32, 64, 9, 1.0),  # per head, every slot: contiguous past (a view), groups share a call
    (4, 4, 33, 40, 8, 1, 1, 0.5),  # block 1: no diagonal part
    (6, 3, 50, 90, 16, 7, 1, 0.05),  # nearly empty past
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("flash", [True, False], ids=["cpu-kernel", "matmul"])
def test_executor_equals_reference_and_counts_the_pattern(case, flash, monkeypatch):
    Hq, Hkv, q, S, D, block, P, density = case
    if not flash:
        monkeypatch.setattr(executor, "_CPU_FLASH", None)
    gen = torch.Generator().manual_seed(sum(case[:6]))
    query, key, value = (torch.randn(2, h, n, D, generator=gen) for h, n in ((Hq, q), (Hkv, S), (Hkv, S)))
    sel = _pattern(P, q, S, block, density, gen)
    out, computed = executor.sparse_prefill_torch(query, key * 2, value, sel, block, D**-0.5)
    want, ref_pairs = sparse_prefill_ref(query, key * 2, value, sel, block, D**-0.5)
    assert torch.allclose(out, want, atol=2e-5, rtol=0)
    assert computed == ref_pairs == 2 * int(token_mask(sel, q, block).expand(Hq, -1, -1).sum())


def test_groups_with_equal_rows_share_one_call_and_others_run_per_head():
    """A KV group whose heads select the same slots gives the result of running its heads one by one."""
    gen = torch.Generator().manual_seed(3)
    Hq, Hkv, q, D, block = 6, 2, 40, 8, 8
    query, key, value = torch.randn(1, Hq, q, D, generator=gen), torch.randn(1, Hkv, q, D, generator=gen), \
        torch.randn(1, Hkv, q, D, generator=gen)
    per_group = _pattern(Hkv, q, q, block, 0.4, gen).repeat_interleave(Hq // Hkv, 0)  # equal within a group
    mixed = per_group.clone()
    mixed[3:] = _pattern(3, q, q, block, 0.4, gen)  # group 1's heads differ
    for sel in (per_group, mixed):
        out, _ = executor.sparse_prefill_torch(query, key, value, sel, block, 0.3)
        assert torch.allclose(out, sparse_prefill_ref(query, key, value, sel, block, 0.3)[0], atol=2e-5, rtol=0)


def test_unselected_slots_are_never_read():
    """NaN keys/values in slots that no block selects, and after each block's last row, stay out of the output."""
    gen = torch.Generator().manual_seed(5)
    q, S, D, block = 64, 96, 16, 16
    query, key, value = torch.randn(1, 4, q, D, generator=gen), torch.randn(1, 2, S, D, generator=gen), \
        torch.randn(1, 2, S, D, generator=gen)
    sel = _pattern(1, q, S, block, 0.2, gen)
    never = ~sel[0].any(0)
    assert never.any()
    key[:, :, never] = float("nan")
    value[:, :, never] = float("nan")
    out, _ = executor.sparse_prefill_torch(query, key, value, sel, block, 0.25)
    assert torch.isfinite(out).all()
