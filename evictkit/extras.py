"""The optional extras of pyproject.toml, checked before work starts instead of failing after it.

`missing("plots")` lists the modules of an extra that cannot be imported here, without importing
them; `hint("plots")` is the line that says how to get them.
"""

from __future__ import annotations

import importlib.util

#: extra -> the top-level modules it provides (pyproject's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "plots": ("matplotlib",),
    "models": ("gguf", "accelerate"),
    "lm-eval": ("lm_eval",),
}


def missing(extra: str) -> list[str]:
    """The modules of `extra` that are not installed (or are blocked) in this environment."""
    out = []
    for module in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-removed install
            found = False
        if not found:
            out.append(module)
    return out


def hint(extra: str) -> str:
    """How to install `extra`: pip install 'evictkit[plots]'."""
    return f"pip install 'evictkit[{extra}]'"
