"""Suite 1: the compaction core against the plain torch ways of doing the same gather.

`evictkit.kernels.compact` (the dispatcher: torch fallback on CPU; on CUDA Triton for large
compactions, torch below) vs `torch.gather`, advanced indexing and `index_select` on a flattened
view, for [B, H_kv, T, D] caches in fp32/fp16/bf16, keeping 1/8..1/2 of T. Each case records its
time and the bytes moved per second; the session summary prints evictkit / fastest plain way per
case (min over rounds; the target on CPU is <= 1.2x). One torch thread by default
(--bench-threads). Every method's output is checked against gather once, so a fast wrong answer
cannot win.

With --device cuda the tensors live on the GPU, every timed call ends with a device sync, and
three more methods run: the Triton kernel and the torch fallback alone (the dispatcher picks
between them by kept bytes, `kernels/compact.py`), and a device-to-device copy of the same bytes,
the bandwidth ceiling the kernel is held to ("evictkit / copy GB/s").
"""

from __future__ import annotations

import pytest
import torch
from benchutil import gather_rows, index_rows, index_select_rows, kept_indices, moved_bytes, run_timed
from conftest import synced

from evictkit.kernels import compact, compact_torch


def _triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    from evictkit.kernels.compact_triton import compact_triton  # imported late: needs a GPU here

    return compact_triton(x, idx)


METHODS = {
    "evictkit": compact,
    "gather": gather_rows,
    "index": index_rows,
    "index_select": index_select_rows,
    "triton": _triton,
    "torch": compact_torch,
}

_inputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _case(sizes, dtype: str, T: int, keep: int, device: torch.device):
    """x [B, H, T, D] and sorted idx [B, H, T // keep] on `device`, built once per case and reused
    by every method."""
    key = (dtype, T, keep)
    if key not in _inputs:
        _inputs.clear()  # keep one case alive: the largest fp32 one is 128 MiB (512 MiB on the GPU preset)
        B, H, D = sizes.comp_shape
        gen = torch.Generator().manual_seed(T)
        x = torch.randn(B, H, T, D, generator=gen).to(getattr(torch, dtype)).to(device)
        _inputs[key] = (x, kept_indices(B, H, T, T // keep, seed=T + keep, device=device))
    return _inputs[key]


@pytest.mark.benchmark(group="compaction", max_time=0.5, min_rounds=5)
def test_compaction(benchmark, bench_threads, sizes, report, device, comp_case, comp_method):
    dtype, T, keep = comp_case
    x, idx = _case(sizes, dtype, T, keep, device)
    if comp_method == "copy":
        # the same bytes (K rows and the indices' worth) copied contiguously: no gather at all
        src = x[:, :, : idx.shape[-1]].contiguous()
        dst = torch.empty_like(src)

        def fn() -> torch.Tensor:
            return dst.copy_(src)
    else:
        method = METHODS[comp_method]
        out = method(x, idx)
        assert out.device == x.device, f"{comp_method} returned a tensor on {out.device}"
        assert torch.equal(out, gather_rows(x, idx)), f"{comp_method} disagrees with torch.gather"

        def fn() -> torch.Tensor:
            return method(x, idx)
    benchmark.group = f"compaction {dtype} T={T} keep=1/{keep}"
    t = run_timed(benchmark, synced(fn, device))
    gbps = moved_bytes(x, idx) / t["min"] / 1e9
    benchmark.extra_info.update(bytes=moved_bytes(x, idx), gbps=gbps)
    report.add("compaction", method=comp_method, dtype=dtype, T=T, keep=keep, gbps=gbps, **t)
