"""Reading JSON Lines: the one loop behind every JSONL file evictkit reads (LongBench data,
long-generation tasks, `evictkit triattention-stats --prompts`), with errors that name the line."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def records(lines: Iterable[str], where: str, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; a line that is not JSON raises
    ValueError "`where`, line n: not JSON (...)" followed by `hint`."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}, line {n}: not JSON ({exc.msg}){hint}") from None


__all__ = ["records"]
