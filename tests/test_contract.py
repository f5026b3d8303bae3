"""The policy contract as a third-party author meets it: what the built-ins import, the members
of `Policy`, and the deprecated names that still work."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

import attrs
import pytest

import evictkit
from evictkit.contract import (
    CHUNKED_DEFAULT,
    EVAL_ONLY,
    MOVED,
    Needs,
    Policy,
    ScorePolicy,
    chunk_doc,
    declared,
)
from evictkit.eval.engine import can_share
from evictkit.plugins.h2o import H2O
from evictkit.plugins.lacache import LaCache
from evictkit.plugins.snapkv import SnapKV
from evictkit.plugins.streaming_llm import StreamingLLM
from evictkit.plugins.tova import TOVA

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


# --- the members a third-party author learns, and the ones that left ------------------------------

#: the contract: what a policy class may set or override (check_budget: for budgets protected() cannot judge)
CONTRACT = {"name", "phases", "summary", "needs", "protected", "observe", "select", "score", "layer_budget",
            "check_budget"}
#: what only a policy with Needs(cross_layer=True) writes (evictkit.cross_layer)
CROSS_LAYER = {"layer_signal", "allocate"}


def test_the_contract_is_nine_members():
    public = {n for n in vars(Policy) | vars(ScorePolicy) if not n.startswith("_")}
    assert public - set(MOVED) - set(EVAL_ONLY) - CROSS_LAYER == CONTRACT
    # the capability flags are Needs fields too, not members (tests/test_capabilities.py)
    assert set(attrs.fields_dict(Needs)) == {"window", "queries", "positions", "may_evict_newest", "exact_budget",
                                             "layer_weights", "attention_weights", "extra_passes", "ragged_heads",
                                             "cross_layer", "padding"}


#: the built-ins this contract was cut with (built-ins added since have their own tests)
BUILTINS = ("adakv", "full", "h2o", "h2o_prefill", "lacache", "pyramidkv", "random", "restkv", "snapkv",
            "streaming_llm", "tova")


@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_declare_through_needs_and_set_no_moved_member(name):
    cls = evictkit.policies()[name]
    own = [k for k in cls.__mro__ if k not in (Policy, ScorePolicy, object)]
    assert not [m for m in [*MOVED, *EVAL_ONLY] if any(m in vars(k) for k in own)]


def test_capability_tags():
    assert declared(TOVA()).may_evict_newest and declared(H2O(recent=0)).may_evict_newest
    assert not declared(H2O()).may_evict_newest and declared(H2O()).queries
    assert not declared(LaCache()).exact_budget and declared(StreamingLLM(positions="shift")).positions == "shift"


@attrs.define(frozen=True, kw_only=True)
class _Plain(ScorePolicy):
    """A policy that declares nothing: the defaults."""

    name: ClassVar[str] = "plain_for_contract_tests"

    def score(self, obs):
        return -obs.keys.float().norm(dim=-1)


def test_reading_a_moved_member_warns_and_answers():
    cases = [(lambda: TOVA().may_evict_newest, True), (lambda: TOVA.may_evict_newest, True),
             (lambda: LaCache().exact_budget, False), (lambda: _Plain().exact_budget, True),
             (lambda: StreamingLLM(positions="shift").position_mode(), "shift"),
             (lambda: SnapKV.chunked, chunk_doc(SnapKV)), (lambda: _Plain.chunked, CHUNKED_DEFAULT),
             (lambda: SnapKV().shared_prefill, True)]
    for read, want in cases:
        with pytest.warns(DeprecationWarning, match="deprecated"):
            assert read() == want


def test_a_legacy_subclass_warns_once_and_is_still_honoured():
    with pytest.warns(DeprecationWarning) as caught:
        @attrs.define(frozen=True, kw_only=True)
        class Legacy(_Plain):
            """Declares the old way."""

            name: ClassVar[str] = "legacy_for_contract_tests"
            may_evict_newest: ClassVar[bool] = True
            exact_budget: ClassVar[bool] = False
            chunked: ClassVar[str] = "scores each chunk"
            shared_prefill: ClassVar[bool] = False

            def position_mode(self) -> str:
                return "shift"

    moved = sorted(str(w.message).split("`")[1] for w in caught)
    # each once (not again for attrs' slotted copy); shared_prefill is eval's setting, not a moved member
    assert moved == ["chunked", "exact_budget", "may_evict_newest", "position_mode"]
    assert declared(Legacy()) == Needs(positions="shift", may_evict_newest=True, exact_budget=False)
    assert chunk_doc(Legacy) == "scores each chunk" and evictkit.describe(Legacy)["chunked"] == "scores each chunk"
    assert not can_share(Legacy()) and can_share(_Plain())


def test_chunk_doc_reads_the_docstring_paragraph():
    assert chunk_doc(StreamingLLM) == "sinks + the newest entries after each chunk: the same kept set as one shot"
    assert evictkit.describe(StreamingLLM)["chunked"] == chunk_doc(StreamingLLM)
    assert chunk_doc(_Plain) == CHUNKED_DEFAULT


@pytest.mark.parametrize("field, value, message", [
    ("window", -1, r"Needs.window=-1: must be an int >= 0"), ("queries", 1, r"Needs.queries=1: must be True or False"),
    ("positions", "pos_shift", r"Needs.positions='pos_shift': must be one of 'absolute', 'shift'"),
    ("exact_budget", None, r"Needs.exact_budget=None: must be True or False"),
])
def test_needs_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=message):
        Needs(**{field: value})


# --- docs/writing-a-policy.md is the example package ----------------------------------------------

EXAMPLE = ROOT / "examples" / "evictkit-example-policy"


def _code_blocks(text: str) -> list[str]:
    """The fenced code blocks of a markdown page, without the fences."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_the_guide_shows_the_example_package_file_for_file():
    """Each block that starts with `# <path>` is that file of examples/evictkit-example-policy/, and
    every source file of the package (its README aside) has such a block; the tree lists them all."""
    page = (ROOT / "docs" / "writing-a-policy.md").read_text()
    shown = {}
    for block in _code_blocks(page):
        first, _, rest = block.partition("\n")
        if first.startswith("# ") and (EXAMPLE / first[2:]).is_file():
            shown[first[2:]] = rest
    def packaged(p: Path) -> bool:
        parts = p.relative_to(EXAMPLE).parts
        return not any(part in ("build", "dist", "__pycache__") or part.endswith(".egg-info") for part in parts)

    files = sorted(str(p.relative_to(EXAMPLE)) for p in EXAMPLE.rglob("*")
                   if p.is_file() and p.suffix in (".py", ".toml") and packaged(p))
    assert sorted(shown) == files
    for path, text in shown.items():
        assert text == (EXAMPLE / path).read_text().rstrip("\n"), f"docs/writing-a-policy.md's {path} differs"
    tree = _code_blocks(page)[0]
    assert all(path in tree for path in [*files, "README.md"]), tree
