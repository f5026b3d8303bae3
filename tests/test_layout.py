"""The repository root shadows no installed distribution.

Python puts the folder it starts in first on `sys.path` (`python -m pytest`, `python -c`, a REPL
in the checkout). A folder there with an `__init__.py`, or a `.py` file, is then imported instead
of any installed distribution of the same name: the checkout's `kernels/` hid Hugging Face's
`kernels`, which transformers imports from 5.25 on. evictkit's top-level folders are PEP 420
namespace portions (no `__init__.py`), which the import system uses only when no regular package
or module of that name exists anywhere on `sys.path` (docs/architecture.md, "Layout and imports").
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: the folders that pyproject.toml maps to evictkit.<name>
MAPPED = ("plugins", "kernels", "specs")


def _importable_names(root: Path) -> dict[str, Path]:
    """Names that the root itself would provide, taking precedence, when it is on sys.path:
    regular packages (folders with an __init__) and modules. Namespace folders are not listed."""
    names: dict[str, Path] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and any((entry / f"__init__{s}").exists() for s in (".py", ".pyc", ".pyi")):
            names[entry.name] = entry
        elif entry.is_file() and (entry.suffix in (".py", ".pyc") or entry.name.endswith(".so")):
            names[entry.name.split(".")[0]] = entry
    return names


def _run_in_root(code: str, extra_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -c code` started in the checkout, so the root is sys.path[0], as a user's is."""
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)  # it would keep the root off sys.path
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True, text=True
    )


def test_no_top_level_entry_shadows_an_installed_distribution() -> None:
    installed = importlib.metadata.packages_distributions()
    clashes = {
        name: (path.relative_to(ROOT), installed[name])
        for name, path in _importable_names(ROOT).items()
        if name in installed and installed[name] != ["evictkit"] * len(installed[name])
    }
    assert not clashes, (
        f"these entries of the repository root would be imported instead of installed distributions "
        f"when Python starts in the checkout: {clashes}. Remove the folder's __init__.py (see "
        f"docs/architecture.md, 'Layout and imports') or rename it."
    )


def test_the_check_sees_a_regular_package_and_a_module(tmp_path: Path) -> None:
    """The detector above, on a fake root: a folder with an __init__ and a module are names the root
    provides; a folder without one (a namespace portion) is not."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "laws.py").write_text("")
    (tmp_path / "tqdm.py").write_text("")
    assert set(_importable_names(tmp_path)) == {"kernels", "tqdm"}


@pytest.mark.parametrize("folder", MAPPED)
def test_mapped_folders_are_namespace_portions(folder: str) -> None:
    """Whatever is installed today: the mapped folders keep no __init__ (it lives in evictkit/<name>/)."""
    assert (ROOT / folder).is_dir()
    assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow a '{folder}' distribution"
    assert (ROOT / "evictkit" / folder / "__init__.py").is_file()
    assert sorted(p.name for p in (ROOT / "evictkit" / folder).iterdir() if p.suffix == ".py") == ["__init__.py"]


def test_a_distribution_named_like_a_top_level_folder_wins(tmp_path: Path) -> None:
    """For every top-level folder: a stand-in distribution of that name on sys.path (after the root)
    is what `import <name>` gets in a Python started in the checkout, and evictkit still imports."""
    names = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier() and p.name != "evictkit")
    assert set(MAPPED) <= set(names)
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("STAND_IN = True\n")
    r = _run_in_root(
        f"""
        import sys
        assert sys.path[0] in ("", {str(ROOT)!r}), sys.path[:2]
        import importlib
        for name in {names!r}:
            mod = importlib.import_module(name)
            where = mod.__spec__.submodule_search_locations or mod.__file__
            assert getattr(mod, "STAND_IN", False), f"{{name}} came from {{where}}"
        import evictkit, evictkit.kernels, evictkit.specs, evictkit.plugins.snapkv
        assert callable(evictkit.kernels.compact) and "snapkv" in evictkit.policies()
        from evictkit.specs import conformance_tests
        """,
        extra_path=tmp_path,
    )
    assert r.returncode == 0, r.stderr


def test_transformers_and_evictkit_import_from_the_checkout() -> None:
    """The break of transformers 5.25: its activations import Hugging Face's `kernels`. Started in the
    checkout, Python gets the installed `kernels` (where it is installed) and evictkit loads."""
    r = _run_in_root(
        """
        import importlib.metadata, importlib.util, pathlib, re
        import transformers.activations
        import evictkit
        needs = [re.split(r"[ ;<>=!~\\[]", d)[0] for d in importlib.metadata.requires("transformers") or []
                 if "extra ==" not in d]
        spec = importlib.util.find_spec("kernels")
        if "kernels" in needs:  # transformers >= 5.25: Hugging Face's kernels must be the one found
            assert spec is not None and spec.origin is not None, "Hugging Face's kernels is not installed"
            origin = pathlib.Path(spec.origin).resolve()
            assert not origin.is_relative_to(pathlib.Path("kernels").resolve()), spec.origin
            import kernels
            assert hasattr(kernels, "CUDAProperties"), kernels
        print(spec.origin if spec else None)
        """
    )
    assert r.returncode == 0, r.stderr
