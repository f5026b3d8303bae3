"""Suite 5: ReST-KV's scoring against SnapKV's on one layer of synthetic tensors, piece by piece.

The pieces of benchmarks/profile_scoring.py (window attention, SnapKV's pooling, ReST-KV's
`restkv_scores`, the selection, the indicator's `(o - v) G` matmul alone, the AWS drift both
ways) on the same synthetic window attention and values, so the table isolates the scoring from
any model. Each shape records: ReST-KV / SnapKV scoring (the ratio the ReST-KV issue targets:
1.5x), and its floor, (SnapKV + the indicator's matmul alone) / SnapKV, below which no
implementation of the reconstruction indicator can go. On CUDA (`--device cuda`) this is the
check of whether the indicator's matmul or the launches dominate on the device; the exact top-k
and the bounds-only drift tell whether the CPU's bound-then-verify path would pay there.
pytest-benchmark times `restkv_scores` whole; the pieces are timed in turns
(`profile_scoring.timed_round_robin`, median of `scoring_reps` calls, device syncs around each).
"""

from __future__ import annotations

import math

import pytest
import torch
from benchutil import run_timed
from conftest import synced
from profile_scoring import FLOOR, GQA, SELECT, SNAP_REST, WHOLE, ratios, scoring_pieces, timed_round_robin

#: the report's short name for each piece of profile_scoring.scoring_pieces
PIECES = {
    "window": "window attention (both)",
    "snapkv": SNAP_REST,
    "select": SELECT,
    "restkv": WHOLE,
    "gqa": GQA,
    "floor": FLOOR,
    "drift_exact": "restkv: AWS drift, exact top-k",
    "drift_bounds": "restkv: AWS drift, bounds only",
}


@pytest.mark.benchmark(group="scoring", max_time=1.0, min_rounds=3)
def test_restkv_scoring_vs_snapkv(benchmark, sizes, report, device, scoring_shape):
    Hq, Hkv, d, hidden, T = scoring_shape
    pieces, _ = scoring_pieces(T, Hq, Hkv, d, hidden, 32, device, torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ms = {name: s * 1e3 for name, s in timed_round_robin(pieces, device, sizes.scoring_reps).items()}
        benchmark.group = f"scoring Hq={Hq} Hkv={Hkv} d={d} T={T}"
        t = run_timed(benchmark, synced(pieces[WHOLE], device))
    ratio, floor = ratios(ms)
    assert math.isfinite(ratio) and math.isfinite(floor), ms
    benchmark.extra_info.update(ratio=ratio, floor=floor)
    report.add("scoring", Hq=Hq, Hkv=Hkv, d=d, hidden=hidden, T=T, ratio=ratio, floor=floor,
               ms={short: ms[name] for short, name in PIECES.items()}, **t)
