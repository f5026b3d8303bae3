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
