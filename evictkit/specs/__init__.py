"""The contracts of evictkit: the pluggy hook specification (`hookspecs`) and the laws of eviction
as Hypothesis properties (`laws`, the conformance kit for third-party policies).

`from evictkit.specs import conformance_tests` imports the kit (and Hypothesis) on first use:
`import evictkit` itself needs neither Hypothesis nor pytest.
"""

from __future__ import annotations

from typing import Any

_KIT = {"LAWS", "PROFILES", "LawViolation", "check_all", "check_law", "conformance_tests", "profile"}


def __getattr__(name: str) -> Any:
    if name in _KIT:
        from evictkit.specs import laws

        return getattr(laws, name)
    raise AttributeError(f"module 'evictkit.specs' has no attribute {name!r}")
