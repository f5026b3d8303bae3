"""Budget semantics: entries kept per layer per KV head, window and sinks included."""

from __future__ import annotations

import numbers


def check_budget(budget: object) -> int | float:
    """Validate a budget: an int >= 1 (entries), or a float in (0, 1] (fraction of the prompt)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise ValueError(
            f"budget={budget!r}: must be an int >= 1 (entries kept per layer per KV head) "
            "or a float in (0, 1] (fraction of the prompt)"
        )
    if isinstance(budget, numbers.Integral):
        if budget < 1:
            raise ValueError(f"budget={budget}: an int budget must be >= 1 (entries kept per layer per KV head)")
        return int(budget)
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget}: a float budget is a fraction of the prompt and must be in (0, 1]")
    return budget


def resolve_budget(budget: int | float, prompt_length: int) -> int:
    """Entries per head for a prompt of `prompt_length` tokens (a fraction rounds down, min 1)."""
    if isinstance(budget, float):
        return max(1, int(budget * prompt_length))
    return budget


def resolve_checked(policy: object, budget: int | float, prompt_length: int) -> int:
    """`resolve_budget`, then the policy's own check; a fraction too small for the policy's
    protected tokens is reported as the fraction given and the count it resolved to."""
    base = resolve_budget(budget, prompt_length)
    if isinstance(budget, float):
        try:
            policy.check_budget(base)  # type: ignore[attr-defined]
        except ValueError as exc:
            raise ValueError(
                f"budget={budget} of a {prompt_length}-token prompt resolves to {base} entries per layer per "
                f"KV head, too few for policy {getattr(policy, 'name', '?')!r}: {exc} (or give a larger fraction)"
            ) from None
    return base
