"""docs/policies.md's policy table is what `evictkit list --json` says (evictkit/_doctable.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evictkit import _doctable
from evictkit.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "policies.md"


def test_docs_policy_table_matches_evictkit_list() -> None:
    assert DOC.read_text() == _doctable.generate(DOC), (
        f"the policy table in {DOC.name} differs from `evictkit list --json`: run `{_doctable.COMMAND}` "
        "from the repository root and commit docs/policies.md"
    )


def test_rows_are_evictkit_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["policies"]
    rows = _doctable.policy_rows()
    assert rows == [r for r in listed if r["package"] == "evictkit"]
    assert {"full", "snapkv", "restkv"} <= {r["name"] for r in rows}


def _row(**extra: object) -> dict:
    return {"name": "snapkv", "package": "evictkit", "phases": ["prefill"], "needs": None,
            "params": {"window": "32", "pool": "'max'"}, "summary": "pooled | attention", **extra}


def test_render_shows_every_parameter_and_escapes_pipes() -> None:
    table = _doctable.render([_row(), _row(name="full", phases=[], params={}, summary="no eviction")], {"snapkv"})
    assert table.splitlines() == [
        "| name | package | phases | parameters (defaults) | summary | page |",
        "|---|---|---|---|---|---|",
        "| `snapkv` | evictkit | prefill | `window=32, pool='max'` | pooled \\| attention "
        "| [snapkv](policies/snapkv.md) |",
        "| `full` | evictkit | — | — | no eviction | — |",
    ]


def test_render_has_a_per_chunk_column_once_describe_gives_one() -> None:
    table = _doctable.render([_row(chunked="scores each chunk"), _row(name="full", params={}, chunked=None)])
    head, _, first, second = table.splitlines()
    assert head == "| name | package | phases | parameters (defaults) | per chunk | summary |"
    assert first.split(" | ")[4] == "scores each chunk"
    assert second.split(" | ")[4] == "—"


def test_render_has_a_tags_column_once_describe_gives_one() -> None:
    table = _doctable.render([_row(tags=["window_queries", "ragged_heads"]), _row(name="x", tags=None)])
    head, _, first, second = table.splitlines()
    assert head == "| name | package | phases | tags | parameters (defaults) | summary |"
    assert first.split(" | ")[3] == "window_queries, ragged_heads"
    assert second.split(" | ")[3] == "—"


def test_a_stale_table_is_reported_with_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "snapkv.md").write_text("# SnapKV\n")
    doc = tmp_path / "policies.md"
    stale = DOC.read_text().replace("beta=2000", "beta=1999")  # a default changed in code, not in the docs
    assert stale != DOC.read_text()
    doc.write_text(stale)
    assert _doctable.main([str(doc), "--check"]) == 1
    assert _doctable.COMMAND in capsys.readouterr().err
    assert doc.read_text() == stale  # --check writes nothing
    assert _doctable.main([str(doc)]) == 0
    assert _doctable.main([str(doc), "--check"]) == 0
    text = doc.read_text()
    assert "beta=2000" in text and "beta=1999" not in text
    # only the pages that exist are linked, and the hand-written text around the markers is kept
    assert "[snapkv](policies/snapkv.md)" in text and "[restkv](policies/restkv.md)" not in text
    assert text.split(_doctable.START)[0] == DOC.read_text().split(_doctable.START)[0]
    assert text.split(_doctable.END)[1] == DOC.read_text().split(_doctable.END)[1]


def test_markers_are_required() -> None:
    with pytest.raises(ValueError, match="policy-table:start"):
        _doctable.splice("# no table here\n", "| x |\n")
