"""What a policy may use beyond `evictkit`'s top level: selection, attention and validation helpers.

Built-in policies import from `evictkit`, this module and other built-in policy modules
(`evictkit.plugins.*`: PyramidKV extends SnapKV, AdaKV reuses PyramidKV's schedule, ReST-KV keeps
its numerics in `_restkv_math`), as a third-party policy imports from `evictkit`, this module and
its own package; none imports the core's other modules (tests/test_contract.py checks it).

- selection: `select_topk` (scores -> sorted kept indices, protected slots forced in, ties to the
  newer slot), `reduce_gqa`, `pool1d`, `RaggedSelection` (per-head counts);
- attention: `attention_weights` (softmax of queries over cached keys, causal by true position),
  `attention_column_sums` (chunked column sums of a whole forward's attention), `project_queries`;
- validators: `int_at_least`, `one_of`, `odd_kernel`, `a_bool` (attrs validators with messages that
  name the parameter, the value and the valid range);
- wrappers: `windowed_scorer` (the score policy a wrapper such as adakv or cake scores with).
"""

from __future__ import annotations

from typing import Any, cast

from evictkit.attention import attention_column_sums, attention_weights, project_queries
from evictkit.contract import RaggedSelection, ScorePolicy
from evictkit.hf import rotary_class
from evictkit.positions import POSITION_MODES
from evictkit.selection import GQA_REDUCTIONS, POOLS, pool1d, reduce_gqa, select_topk
from evictkit.validators import a_bool, int_at_least, odd_kernel, one_of


def windowed_scorer(owner: type, scorer: str | ScorePolicy, window: int,
                    options: tuple[tuple[str, Any], ...]) -> ScorePolicy:
    """The score policy a wrapper (`owner`: AdaKV, CAKE) scores with: an instance as given (its
    `window` must equal the wrapper's, and `options` must be empty: nothing is looked up), or a
    registered score policy's name, built with `window` and `options`. ValueError names the
    parameter otherwise."""
    import evictkit  # the registry: only when a wrapper is built, never at import

    if isinstance(scorer, ScorePolicy):
        if isinstance(scorer, owner) or "window" not in evictkit.params_of(type(scorer)):
            raise ValueError(f"scorer={scorer!r}: must be a score policy with a `window` parameter "
                             f"(e.g. SnapKV(window=32)), not {owner.__name__} itself")
        if options:
            raise ValueError(f"scorer_options={dict(options)!r}: only for a scorer given by name; "
                             f"set them on the scorer instance {scorer!r}")
        if scorer.window != window:  # type: ignore[attr-defined]  # a field: checked just above
            raise ValueError(f"window={window}: must equal the window of the scorer instance ({scorer!r}); "
                             f"give window={scorer.window} or build the scorer with window={window}")  # type: ignore[attr-defined]
        return scorer
    table = evictkit.policies()

    def usable(c: type | None) -> bool:
        return c is not None and c is not owner and issubclass(c, ScorePolicy) and "window" in evictkit.params_of(c)

    if not usable(table.get(scorer) if isinstance(scorer, str) else None):
        raise ValueError(
            f"scorer={scorer!r}: must be a score policy instance or a registered score policy name with a "
            f"`window` parameter ({', '.join(n for n, c in table.items() if usable(c)) or 'none registered'})"
        )
    opts = dict(options)
    if "window" in opts:
        raise ValueError(f"scorer_options: give the window as {getattr(owner, 'name', owner.__name__)}'s own "
                         "`window` parameter")
    return cast(ScorePolicy, evictkit.policy(scorer, window=window, **opts))


__all__ = [
    "GQA_REDUCTIONS",
    "POOLS",
    "POSITION_MODES",
    "RaggedSelection",
    "a_bool",
    "attention_column_sums",
    "attention_weights",
    "int_at_least",
    "odd_kernel",
    "one_of",
    "pool1d",
    "project_queries",
    "reduce_gqa",
    "rotary_class",
    "select_topk",
    "windowed_scorer",
]
