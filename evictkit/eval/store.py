"""The output folder of `evictkit eval`: its file names, results.jsonl and config.json.

Plain Python (no torch), so that both the runner, which writes a run, and the report, which
reads one, import it without importing each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

RESULTS = "results.jsonl"  # one line per sample x variant
CONFIG = "config.json"  # the configuration, seeds, versions and command line
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
PLOTS = "plots"  # folder of PNGs
#: the files a run writes (and a forced new run removes)
OUR_FILES = (RESULTS, CONFIG, SUMMARY_MD, SUMMARY_CSV)


def load_results(path: Path) -> list[dict]:
    """Read results.jsonl, dropping a torn last line (a run killed mid-write) and rewriting the file."""
    if not path.exists():
        return []
    rows, torn = [], False
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            torn = True
    if torn:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_result(sink: IO[str], row: dict[str, Any]) -> None:
    """One row to an open results.jsonl, flushed: an interrupted run loses at most the row in flight."""
    sink.write(json.dumps(row) + "\n")
    sink.flush()


def read_config(out: Path) -> dict[str, Any]:
    """config.json of the run in `out` ({} when there is none); raises on an unreadable one."""
    path = out / CONFIG
    return json.loads(path.read_text()) if path.exists() else {}


def write_config(out: Path, meta: dict[str, Any]) -> None:
    (out / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def clear(out: Path) -> None:
    """Remove what a run wrote in `out` (and nothing else)."""
    for name in OUR_FILES:
        (out / name).unlink(missing_ok=True)
    plots = out / PLOTS
    if plots.is_dir():
        for p in plots.glob("*.png"):
            p.unlink()
