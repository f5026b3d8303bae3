"""The seam to transformers: the names evictkit reads from it, in one place.

transformers renames what evictkit touches from release to release (the forward's cache argument
became `cache` in 5.24; `past_key_values` is deprecated there and due to go in 5.40). Code that
needs such a name asks this module, so a new transformers release is answered here. The tested
range is pyproject.toml's (README, "Supported versions").
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

#: the cache argument's names, newest first
CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model.forward` takes the cache: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier 5.x). A name that is absent from the signature would be swallowed
    by `**kwargs` without error, so this reads the signature rather than the version."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` to pass to `model(...)` on any supported transformers: `model(ids, **cache_arg(model, c))`."""
    return {cache_kwarg(model): cache}


def cache_of(output: Any) -> Any:
    """A model output's cache, under whichever name this transformers gives it (`cache` from 5.24;
    reading `past_key_values` there logs a deprecation warning)."""
    for name in CACHE_KWARGS:
        if name in output:
            return output[name]
    return None
