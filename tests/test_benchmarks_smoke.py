"""The benchmark suites still run: `pytest benchmarks/ --quick` (tiny sizes, every benchmark
once, timing off) in a subprocess, so a change that breaks a suite fails here and not only in a
15-minute `make bench`. No timing is asserted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_benchmark_runs_at_quick_sizes(tmp_path):
    report = tmp_path / "quick.md"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "--quick", "-q", "-p", "no:cacheprovider",
         "--bench-report", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    text = report.read_text()
    for section in ("Compaction core", "Prefill + eviction", "Policy scoring alone", "Decoding after eviction"):
        assert section in text, f"{section!r} missing from the quick report"
    assert "restkv / snapkv" in text and "restkv decode=carried" in text


@pytest.mark.slow
def test_throughput_suite_runs_at_quick_sizes(tmp_path):
    """benchmarks/throughput.py --quick (suite 10) writes its records, and what does not depend on
    timing holds: eviction keeps less K/V per row than the full cache, so more rows fit the cap
    and the bytes-moved limit favours it; the limit of batch 2 over batch 1 lies in (1, 2]."""
    import json

    out = tmp_path / "tput"
    proc = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    recs = json.loads(out.with_suffix(".json").read_text())["records"]
    by = {(r["name"], r["batch"]): r for r in recs}
    assert {name for name, _ in by} == {"full", "snapkv-b48", "snapkv-b48-both", "restkv-b48-c64"}
    for b in (1, 2):
        full = by["full", b]
        assert full["entries_end"] == 128 + 4 - 1  # the prompt and every new token but the last
        for name in ("snapkv-b48", "snapkv-b48-both", "restkv-b48-c64"):
            r = by[name, b]
            assert r["entries_end"] <= 48 + 4 and r["kv_row"] < full["kv_row"] / 2
            assert r["max_batch_at_cap"] > full["max_batch_at_cap"]
            assert r["vs_full_limit"] > 1.0
            assert r["decode_tps"] > 0 and r["prefill_tps"] > 0
    assert 1.0 < by["full", 2]["vs_batch1_limit"] <= 2.0
    assert "| 128 | snapkv-b48-both | 2 |" in out.with_suffix(".md").read_text()


def test_padded_batch_suite_runs_at_quick_sizes(tmp_path):
    """benchmarks/padded_batch.py --quick (suite 11) times the three ways and writes its table."""
    import json

    out = tmp_path / "padded"
    proc = subprocess.run([sys.executable, "benchmarks/padded_batch.py", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    med = json.loads(out.with_suffix(".json").read_text())["medians"]
    assert set(med) == {"unpadded", "padded", "padded, row by row"}
    assert all(m["evictkit_s"] > 0 and m["wall_s"] >= m["evictkit_s"] for m in med.values())
    assert "| padded, row by row |" in out.with_suffix(".md").read_text()
