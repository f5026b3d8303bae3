"""Suite 1: the compaction core against the plain torch ways of doing the same gather.

`evictkit.kernels.compact` (the dispatcher: torch fallback on CPU, Triton on CUDA) vs
`torch.gather`, advanced indexing and `index_select` on a flattened view, for [B, H_kv, T, D]
caches in fp32/fp16/bf16, keeping 1/8..1/2 of T. Each case records its time and the bytes moved
per second; the session summary prints evictkit / fastest plain way per case (min over rounds;
the target on CPU is <= 1.2x). One torch thread by default (--bench-threads). Every method's
output is checked against gather once, so a fast wrong answer cannot win.
"""

from __future__ import annotations

import pytest
import torch

from benchutil import gather_rows, index_rows, index_select_rows, kept_indices, moved_bytes, run_timed
from evictkit.kernels import compact

METHODS = {
    "evictkit": compact,
    "gather": gather_rows,
    "index": index_rows,
    "index_select": index_select_rows,
}

_inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _case(sizes, dtype: str, T: int, keep: int):
    """x [B, H, T, D] and sorted idx [B, H, T // keep], built once per case and reused by every method."""
    key = (dtype, T, keep)
    if key not in _inputs:
        _inputs.clear()  # keep one case alive: the largest fp32 one is 128 MiB
        B, H, D = sizes.comp_shape
        gen = torch.Generator().manual_seed(T)
        x = torch.randn(B, H, T, D, generator=gen).to(getattr(torch, dtype))
        _inputs[key] = (x, kept_indices(B, H, T, T // keep, seed=T + keep))
    return _inputs[key]


@pytest.mark.benchmark(group="compaction", max_time=0.5, min_rounds=5)
def test_compaction(benchmark, bench_threads, sizes, report, comp_case, comp_method):
    dtype, T, keep = comp_case
    x, idx = _case(sizes, dtype, T, keep)
    fn = METHODS[comp_method]
    out = fn(x, idx)
    assert torch.equal(out, gather_rows(x, idx)), f"{comp_method} disagrees with torch.gather"
    benchmark.group = f"compaction {dtype} T={T} keep=1/{keep}"
    t = run_timed(benchmark, lambda: fn(x, idx))
    gbps = moved_bytes(x, idx) / t["min"] / 1e9
    benchmark.extra_info.update(bytes=moved_bytes(x, idx), gbps=gbps)
    report.add("compaction", method=comp_method, dtype=dtype, T=T, keep=keep, gbps=gbps, **t)
