"""evictkit: KV-cache eviction policies for Hugging Face transformers, as pluggy plugins.

    import evictkit
    model, tok = evictkit.load_model("smollm2")
    with evictkit.compress(model, "streaming_llm", budget=128) as run:
        out = model.generate(ids, max_new_tokens=32)
    print(run.stats.summary())

Importing evictkit has no side effects: plugins are loaded on first use, and transformers is
never patched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from evictkit.compress import Compression, compress
from evictkit.contract import Needs, Policy, ScorePolicy, chunk_doc, declared, params_of
from evictkit.models import load_model
from evictkit.observation import Observation
from evictkit.prefill_attention import PrefillScope, use_prefill_attention
from evictkit.prefill_contract import PatternAttention, PrefillAttention, PrefillOutput
from evictkit.registry import PluginFailure, build_policy, get_registry
from evictkit.specs.hookspecs import hookimpl
from evictkit.stats import CompressionStats, EvictEvent, LayerStats

__version__ = "0.1.0"

__all__ = [
    "Compression",
    "CompressionStats",
    "EvictEvent",
    "LayerStats",
    "Needs",
    "Observation",
    "PatternAttention",
    "PluginFailure",
    "Policy",
    "PrefillAttention",
    "PrefillOutput",
    "PrefillScope",
    "ScorePolicy",
    "compress",
    "hookimpl",
    "load_model",
    "plugin_failures",
    "policies",
    "policy",
    "prefill_attentions",
    "use_prefill_attention",
]


def policies() -> Mapping[str, type[Policy]]:
    """Every registered policy class by name: built-ins and installed plugins."""
    return get_registry().policies()


def prefill_attentions() -> Mapping[str, type[PrefillAttention]]:
    """Every registered prefill attention class by name (`dense`, the built-in sparse ones, plugins')."""
    return get_registry().prefill_attentions()


def plugin_failures() -> list[PluginFailure]:
    """Plugins that failed to import or register (they are also warned about)."""
    get_registry().ensure_loaded()
    return list(get_registry().failures)


def policy(name: str, **params: Any) -> Policy:
    """Build the policy registered as `name` with hyper-parameters `params`.

    Unknown names (with the close ones suggested), unknown parameters and invalid values raise
    ValueError naming the parameter, the value given and what is valid.
    """
    return build_policy(name, **params)


def describe(cls: type[Policy]) -> dict[str, Any]:
    """Name, phases, parameters, needs and capability tags (`Needs.tags()`, None when the class
    has no default instance) of a policy class (for `evictkit list`)."""
    entry = get_registry().entries.get(cls.name)
    needs = declared(cls()) if all(a.default is not attrs.NOTHING for a in params_of(cls).values()) else None
    return {
        "name": cls.name,
        "package": entry.package if entry else "?",
        "phases": list(cls.phases),
        "params": {f: repr(a.default) for f, a in params_of(cls).items()},
        "needs": attrs.asdict(needs) if needs is not None else None,
        "tags": list(needs.tags()) if needs is not None else None,
        "summary": cls.summary,
        "chunked": chunk_doc(cls),
    }


def _deprecated_policy_module() -> None:
    """`evictkit.policy` is the function above; the module of that name became evictkit.contract.
    `from evictkit.policy import Policy` keeps working, with a DeprecationWarning, through an
    alias in sys.modules (which does not replace the function, as a real submodule would)."""
    import sys
    import types
    import warnings

    from evictkit import contract

    alias = types.ModuleType("evictkit.policy", "Deprecated alias of evictkit.contract: import from evictkit.")

    def __getattr__(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        warnings.warn(f"evictkit.policy.{attr}: the module evictkit.policy is now evictkit.contract; "
                      f"import {attr} from evictkit", DeprecationWarning, stacklevel=2)
        return getattr(contract, attr)

    alias.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules.setdefault("evictkit.policy", alias)


_deprecated_policy_module()
