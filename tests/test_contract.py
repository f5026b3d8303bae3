"""The policy contract as a third-party author meets it: what the built-ins import, the members
of `Policy`, and the deprecated names that still work."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: what a built-in policy module may import from evictkit: the facade, the helpers and other built-ins
ALLOWED = ("evictkit", "evictkit.helpers")


def _evictkit_imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [(node.lineno, n) for n in names if n == "evictkit" or n.startswith("evictkit.")]
    return out


def test_builtins_import_the_facade_the_helpers_and_each_other_only():
    bad = [f"plugins/{p.name}:{line}: {name}" for p in sorted((ROOT / "plugins").glob("*.py"))
           for line, name in _evictkit_imports(p) if name not in ALLOWED and not name.startswith("evictkit.plugins.")]
    assert not bad, "built-in policies import core modules a third-party policy cannot rely on:\n" + "\n".join(bad)
