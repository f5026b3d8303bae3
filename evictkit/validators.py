"""attrs validators for policy parameters: each raises ValueError naming the parameter, the value
and the valid range. Public through `evictkit.helpers`, for third-party policies too.

    window: int = attrs.field(default=32, validator=int_at_least(1))
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

Validator = Callable[[object, "attrs.Attribute", object], None]


def int_at_least(lo: int) -> Validator:
    """attrs validator: an int (not bool) >= lo, else ValueError naming the parameter."""

    def check(_inst: object, attr: attrs.Attribute, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{attr.name}={value!r}: must be an int >= {lo}")

    return check


def a_bool(_inst: object, attr: attrs.Attribute, value: object) -> None:
    """attrs validator: True or False only (not 0/1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{attr.name}={value!r}: must be True or False")


def odd_kernel(_inst: object, attr: attrs.Attribute, value: object) -> None:
    """attrs validator: a positive odd int (a pooling kernel centred on its key)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(
            f"{attr.name}={value!r}: must be a positive odd int (an even kernel shifts the pooled scores by one key)"
        )


def one_of(choices: tuple[str, ...]) -> Validator:
    """attrs validator: one of `choices`, else ValueError listing them."""
    def check(_inst: object, attr: attrs.Attribute, value: object) -> None:
        if value not in choices:
            raise ValueError(f"{attr.name}={value!r}: must be one of {', '.join(map(repr, choices))}")

    return check
