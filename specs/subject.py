"""The policy under test, as the conformance kit sees it: `Subject` (a policy class with the
parameters to build it), `LawContext` (the label and example every failure names),
`LawViolation`, and the probes for the smallest budget a policy accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from evictkit.contract import Policy, params_of

#: largest budget probed when looking for the smallest budget a policy accepts
MAX_PROBED_BUDGET = 8192


class LawViolation(AssertionError):
    """A policy broke a law. `law`, `policy` (a label) and `example` are kept as attributes."""

    def __init__(self, law: str, policy: str, detail: str, example: object = None) -> None:
        self.law, self.policy, self.detail, self.example = law, policy, detail, example
        message = f"law {law!r} violated by policy {policy}: {detail}"
        if example is not None:
            message += f"\n  example: {example!r}"
        super().__init__(message)


# --- the policy under test ------------------------------------------------------------------


@attrs.frozen
class Subject:
    """A policy class and its parameters: each `make()` is a fresh instance."""

    cls: type[Policy]
    params: tuple[tuple[str, Any], ...] = ()

    def make(self) -> Policy:
        return self.cls(**copy.deepcopy(dict(self.params)))

    @property
    def label(self) -> str:
        return f"{self.cls.name!r} {self.make()!r}"

    @property
    def id(self) -> str:
        extra = ",".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.cls.name}({extra})" if extra else self.cls.name


def as_subject(policy: str | type[Policy] | Policy | Subject, params: Mapping[str, Any] | None = None) -> Subject:
    """A registered name, a Policy class or an instance (its field values are deep-copied now)."""
    if isinstance(policy, Subject):
        if params:
            raise ValueError("params cannot be combined with a Subject")
        return policy
    if isinstance(policy, str):
        import evictkit

        table = evictkit.policies()
        if policy not in table:
            raise ValueError(
                f"policy {policy!r} is not registered; registered policies: {', '.join(table) or '(none)'}")
        policy = table[policy]
    if isinstance(policy, Policy):
        if params:
            raise ValueError("params cannot be combined with a policy instance; pass the class or its name")
        fields = {name: copy.deepcopy(getattr(policy, name)) for name in params_of(type(policy))}
        policy, params = type(policy), fields
    if not (isinstance(policy, type) and issubclass(policy, Policy)):
        raise ValueError(f"expected a policy name, Policy subclass or instance, got {policy!r}")
    subject = Subject(cls=policy, params=tuple(sorted((params or {}).items())))
    subject.make()  # invalid parameters fail here, with the policy's own ValueError
    return subject


def describe(policy: Policy) -> str:
    return f"{getattr(policy, 'name', '?')!r} {policy!r}"


class LawContext:
    """Failure reporting for one law on one example."""

    def __init__(self, law: str, label: str, example: object) -> None:
        self.law, self.label, self.example = law, label, example

    def fail(self, detail: str) -> LawViolation:
        return LawViolation(self.law, self.label, detail, self.example)

    def call(self, what: str, fn: Callable[..., Any], *args: Any, value_error_ok: bool = False) -> Any:
        try:
            return fn(*args)
        except LawViolation:
            raise
        except ValueError as exc:
            if value_error_ok:
                raise _Refused(what, exc) from exc
            raise self.fail(f"{what} raised ValueError on valid input: {exc}") from exc
        except Exception as exc:
            raise self.fail(f"{what} raised {type(exc).__name__}: {exc}") from exc


class _Refused(Exception):
    """The policy raised ValueError on non-finite input: the clear error the law asks for."""


def min_valid_budget(policy: Policy, label: str | None = None) -> int:
    """The smallest budget `policy.check_budget` accepts; only ValueError may reject one."""
    ctx = LawContext("invalid budget", label or describe(policy), None)
    for b in range(1, MAX_PROBED_BUDGET + 1):
        try:
            policy.check_budget(b)
        except ValueError:
            continue
        except Exception as exc:
            raise ctx.fail(
                f"check_budget({b}) raised {type(exc).__name__} (invalid budgets must raise ValueError): {exc}"
            ) from exc
        return b
    raise ctx.fail(f"check_budget rejects every budget up to {MAX_PROBED_BUDGET}")


def budget_ok(policy: Policy, budget: int, n_layers: int | None = None, length: int = 1) -> bool:
    """Whether the policy accepts `budget` (and, given `n_layers`, a schedule for a prompt of
    `length`): a ValueError is a refusal; any other error is left for the laws to report."""
    try:
        policy.check_budget(budget)
        for li in range(n_layers or 0):
            policy.layer_budget(budget, li, n_layers, length)  # type: ignore[arg-type]  # not None in this loop
    except ValueError:
        return False
    except Exception:
        return True
    return True


def min_schedule_budget(policy: Policy, lo: int, n_layers: int, length: int, span: int = 512) -> int:
    """The smallest budget in [lo, lo + span] the policy accepts on `n_layers` layers (lo if none)."""
    for b in range(lo, lo + span + 1):
        if budget_ok(policy, b, n_layers, length):
            return b
    return lo
