"""docs/architecture.md's module table ("Where things live") names every module of evictkit/,
plugins/, kernels/ and specs/ (each `.py` file, package `__init__.py` files included), and no
module that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
FOLDERS = ("evictkit", "plugins", "kernels", "specs")


def modules() -> set[str]:
    """Every module file, as a path from the repository root."""
    return {p.relative_to(ROOT).as_posix() for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def table_modules(text: str) -> list[str]:
    """The `.py` paths named in the module column of the table under "## Where things live"."""
    section = text.split("\n## Where things live\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows[0].split("|")[2].strip() == "module", f"the table's second column is not 'module': {rows[0]}"
    return [path for row in rows[2:] for path in re.findall(r"`([^`]+\.py)`", row.split("|")[2])]


def test_every_module_is_in_the_table_and_every_entry_is_a_module() -> None:
    named = table_modules(DOC.read_text())
    here = modules()
    assert len(here) > 60 and "evictkit/step.py" in here and "plugins/snapkv.py" in here
    missing = sorted(here - set(named))
    assert not missing, f"modules missing from {DOC.relative_to(ROOT)}'s module table: add a row for each: {missing}"
    gone = sorted(set(named) - here)
    assert not gone, f"{DOC.relative_to(ROOT)}'s module table names modules that do not exist: {gone}"
    twice = sorted({p for p in named if named.count(p) > 1})
    assert not twice, f"named twice in the module table: {twice}"


def test_the_reader_sees_a_missing_module() -> None:
    """The check itself, on a small table: a module column is read, other columns are not."""
    text = (
        "# A\n\n## Where things live\n\n| part | module | what it does |\n|---|---|---|\n"
        "| core | `evictkit/a.py` | calls `evictkit/b.py` |\n| | `plugins/c.py` (`evictkit.plugins.c`) | c |\n\n"
        "## Next\n\n| x | `evictkit/d.py` | y |\n"
    )
    assert table_modules(text) == ["evictkit/a.py", "plugins/c.py"]
