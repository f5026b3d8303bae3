"""The policy table of docs/policies.md, generated from `evictkit list --json`.

    python -m evictkit._doctable            # rewrite the table in docs/policies.md
    python -m evictkit._doctable --check    # exit 1 when the file's table is out of date

The table sits between the START and END marker comments; the rest of the page is written by
hand. Only the built-in policies (package "evictkit") are listed, so that a third-party plugin
installed next to evictkit does not change the page.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

START = "<!-- policy-table:start -->"
END = "<!-- policy-table:end -->"
DOC = Path("docs") / "policies.md"
COMMAND = "python -m evictkit._doctable"
NONE = "—"


def policy_rows() -> list[dict[str, Any]]:
    """The rows `evictkit list --json` prints, built-in policies only."""
    from evictkit.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["list", "--json"])
    if rc:
        raise RuntimeError(f"evictkit list --json exited with {rc}")
    listing = json.loads(out.getvalue())
    if listing["failures"]:
        raise RuntimeError("plugins failed to load: " + "; ".join(listing["failures"]))
    return [r for r in listing["policies"] if r["package"] == "evictkit"]


def _cell(value: Any) -> str:
    if value is None or value == [] or value == {} or value == "":
        return NONE
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return str(value).replace("|", "\\|").replace("\n", " ")  # a pipe would split the cell


def render(rows: Sequence[dict[str, Any]], pages: Collection[str] = ()) -> str:
    """The markdown table of `rows` (as `evictkit list --json` gives them): name, package,
    phases, the capability tags when the rows carry a `tags` entry, parameters with their
    defaults, the per-chunk behaviour when the rows carry a `chunked` entry, the summary, and a
    link to docs/policies/<name>.md for names in `pages`."""
    chunked = any("chunked" in r for r in rows)
    tagged = any("tags" in r for r in rows)
    head = ["name", "package", "phases", *(["tags"] if tagged else []), "parameters (defaults)",
            *(["per chunk"] if chunked else []), "summary"]
    if pages:
        head.append("page")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = _cell(", ".join(f"{k}={v}" for k, v in r["params"].items()))
        cells = [f"`{r['name']}`", _cell(r["package"]), _cell(r["phases"])]
        if tagged:
            cells.append(_cell(r.get("tags")))
        cells.append(NONE if params == NONE else f"`{params}`")
        if chunked:
            cells.append(_cell(r.get("chunked")))
        cells.append(_cell(r["summary"]))
        if pages:
            cells.append(f"[{r['name']}](policies/{r['name']}.md)" if r["name"] in pages else NONE)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def splice(text: str, table: str) -> str:
    """`text` with what lies between the markers replaced by `table`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one {START} line followed by one {END} line")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{table}{END}{tail}"


def generate(doc: Path) -> str:
    """The page `doc` with its policy table regenerated (the file is not written)."""
    pages = {p.stem for p in (doc.parent / doc.stem).glob("*.md")}  # docs/policies/<name>.md
    return splice(doc.read_text(), render(policy_rows(), pages))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("doc", nargs="?", type=Path, default=DOC, help=f"the page (default {DOC})")
    parser.add_argument("--check", action="store_true", help="exit 1 when the table is out of date")
    args = parser.parse_args(argv)
    new = generate(args.doc)
    if new == args.doc.read_text():
        return 0
    if args.check:
        print(f"{args.doc}: the policy table differs from `evictkit list --json`; run {COMMAND}", file=sys.stderr)
        return 1
    args.doc.write_text(new)
    print(f"{args.doc}: policy table regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
