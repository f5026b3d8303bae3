"""The output folder of `evictkit eval`: its file names, results.jsonl and config.json.

Plain Python (no torch), so that both the runner, which writes a run, and the report, which
reads one, import it without importing each other.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

RESULTS = "results.jsonl"  # one line per sample x variant
CONFIG = "config.json"  # the configuration, seeds, versions and command line
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
PLOTS = "plots"  # folder of PNGs
#: the files a run writes (and a forced new run removes), besides the shards
OUR_FILES = (RESULTS, CONFIG, SUMMARY_MD, SUMMARY_CSV)
_SHARD = re.compile(r"results\.rank(\d+)\.jsonl")


def shard_name(rank: int) -> str:
    """The results shard rank `rank` of a torchrun run appends to (rank 0 merges them into results.jsonl)."""
    return f"results.rank{rank}.jsonl"


def shards(out: Path) -> list[Path]:
    """The results shards in `out`, by rank."""
    found = [(int(m.group(1)), p) for p in out.glob("results.rank*.jsonl") if (m := _SHARD.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def row_key(row: dict[str, Any]) -> tuple[str, int, str]:
    """What identifies a row: (task, sample index, variant key)."""
    return row["task"], row["index"], row["variant"]


def load_results(path: Path, repair: bool = True) -> list[dict]:
    """Read results.jsonl, dropping a torn last line (a run killed mid-write) and, with `repair`,
    rewriting the file without it (only a process that owns the file may)."""
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
    if torn and repair:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def append_result(sink: IO[str], row: dict[str, Any]) -> None:
    """One row to an open results.jsonl, flushed: an interrupted run loses at most the row in flight."""
    sink.write(json.dumps(row) + "\n")
    sink.flush()


def merge_shards(out: Path, order: Callable[[tuple[str, int, str]], float]) -> list[dict]:
    """Fold the shards of `out` into its results.jsonl and remove them; returns every row.

    The rows already in results.jsonl keep their place; the shards' new rows follow, sorted by
    `order(row_key)` (the position in the one-process run order), so a run split over ranks
    writes the same file as one process. A key met twice keeps its first row."""
    rows = load_results(out / RESULTS)
    seen = {row_key(r) for r in rows}
    parts = shards(out)
    new: list[dict] = []
    for path in parts:
        for r in load_results(path, repair=False):
            if row_key(r) not in seen:
                seen.add(row_key(r))
                new.append(r)
    if not parts:
        return rows
    # stable: rows an unknown order puts last keep the order of the shards
    rows += sorted(new, key=lambda r: order(row_key(r)))
    _write_rows(out / RESULTS, rows)
    for path in parts:
        path.unlink(missing_ok=True)
    return rows


def _write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Replace `path` by `rows` atomically: a merge killed halfway leaves the old file and the shards."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


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
    for path in shards(out):
        path.unlink()
    plots = out / PLOTS
    if plots.is_dir():
        for p in plots.glob("*.png"):
            p.unlink()
