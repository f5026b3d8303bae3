"""The laws of eviction as Hypothesis properties: the conformance kit for every policy.

In a third-party package's tests (pytest collects the returned class)::

    from evictkit.specs import conformance_tests

    TestMyPolicy = conformance_tests("my_policy")                    # a registered name, or
    TestMyPolicySmall = conformance_tests(MyPolicy, params={"window": 2})   # a class + params

Or directly: `check_law("budget", "my_policy")`, `check_all(MyPolicy)`. A broken law raises
`LawViolation` (an AssertionError) naming the law, the policy and the minimal falsifying example
that Hypothesis shrank to.

Profiles: `ci` (default; small sizes, few examples, derandomized so every run draws the same
examples) and `thorough` (prompts up to thousands of tokens, many examples), chosen with the
environment variable EVICTKIT_HYPOTHESIS_PROFILE or the `profile` argument. A law may run in some
profiles only (`Law.profiles`: `fresh_process`, which starts processes, runs in `thorough`; its cheap
in-process counterpart `independence` runs in every profile):
`conformance_tests` skips it elsewhere and `check_all` leaves it out, while `check_law` runs it
whenever it is named.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import FlakyFailure, Unsatisfiable

from evictkit.specs import checks, endtoend
from evictkit.specs.cases import FINITE_STYLES, STYLES
from evictkit.specs.strategies import Limits, cases, edge_cases, edge_model_cases, model_cases
from evictkit.specs.subject import LawViolation, Subject, as_subject, min_valid_budget

PROFILE_ENV = "EVICTKIT_HYPOTHESIS_PROFILE"


@attrs.frozen
class Profile:
    name: str
    direct_examples: int
    model_examples: int
    limits: Limits
    derandomize: bool
    process_examples: int = 3  # examples of the fresh-process law (each drive runs in a new process)

    def settings(self, *, model: bool = False, process: bool = False) -> settings:
        return settings(
            max_examples=(self.process_examples if process else self.model_examples if model
                          else self.direct_examples),
            derandomize=self.derandomize,
            database=None,  # nothing written next to the caller's tests
            deadline=None,  # shared CI machines: no timing
            report_multiple_bugs=False,  # one LawViolation, the minimal one
            print_blob=False,
            # no explain phase: it replays many variations of the failing example, each a model run;
            # no shrinking for the fresh-process law: each attempt would start a process
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.target, *(() if process else (Phase.shrink,))),
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        )


PROFILES = {
    "ci": Profile(name="ci", direct_examples=20, model_examples=4, limits=Limits(), derandomize=True),
    "thorough": Profile(
        name="thorough",
        direct_examples=300,
        model_examples=40,
        limits=Limits(prompt=2048, decode_steps=16, decode_chunk=4, batch=3, kv_heads=4, group=4,
                      head_dims=(2, 4, 8, 16, 32, 64), layers=64, slack=8, model_prompt=256, model_new=16,
                      model_layers=(1, 2, 3, 18, 32), model_head_dims=(8, 16, 32), archs=("llama", "qwen2", "mistral")),
        derandomize=False,
        process_examples=20,
    ),
}


def profile(name: str | None = None) -> Profile:
    """The named profile, else the one in $EVICTKIT_HYPOTHESIS_PROFILE, else `ci`."""
    name = name or os.environ.get(PROFILE_ENV, "").strip() or "ci"
    if name not in PROFILES:
        raise ValueError(f"{PROFILE_ENV}={name!r}: must be one of {', '.join(PROFILES)}")
    return PROFILES[name]


# --- the laws as properties ----------------------------------------------------------------------


@attrs.frozen
class Law:
    name: str
    doc: str | None  # the check's docstring
    run: Callable[[Subject, Profile], None]
    profiles: tuple[str, ...] | None = None  # the profiles whose conformance tests run it; None: all

    def runs_in(self, prof: Profile) -> bool:
        return self.profiles is None or prof.name in self.profiles

    def check(self, subject: Subject, prof: Profile) -> None:
        """Run the law; a law that found no example to run is reported as a violation with its cause."""
        try:
            self.run(subject, prof)
        except Unsatisfiable as exc:
            raise LawViolation(self.name, subject.label, _unsatisfiable(subject, prof)) from exc


def _unsatisfiable(subject: Subject, prof: Profile) -> str:
    """Why no drawn example had a budget the policy accepts, and what to change."""
    policy = subject.make()
    lo = min_valid_budget(policy, subject.label)
    refusal = ""
    probes = [(lo + length, li, n, length) for length in (1, 2, lo, lo + 1, lo + prof.limits.prompt)
              for n in (1, 2, 18) for li in range(n)]  # budget >= length: what a no-op needs
    for args in probes:
        try:
            policy.layer_budget(*args)
        except ValueError as exc:
            refusal = f"; for example layer_budget{args} raised ValueError: {exc}"
            break
        except Exception:  # not a refusal: the laws report other errors themselves
            continue
    return ("every budget drawn for this law was refused by check_budget() or layer_budget() (a ValueError), so "
            f"not one example could run{refusal}. The smallest budget check_budget() accepts is {lo}; a policy "
            "must then accept every larger budget, including budget >= length (nothing to evict: return a layer "
            "budget >= length, a no-op), and layer_budget() must accept every layer count and length")


def _violations(exc: BaseException):
    if isinstance(exc, LawViolation):
        yield exc
    for inner in getattr(exc, "exceptions", ()):
        yield from _violations(inner)


@contextlib.contextmanager
def _kit_storage() -> Iterator[None]:
    """Keep Hypothesis' files out of the caller's package while a law runs.

    With `database=None` the one thing Hypothesis still writes is its cache of the constants found
    in local modules, under `./.hypothesis/constants`. During the kit's runs that goes to evictkit's
    cache directory ($EVICTKIT_CACHE, default ~/.cache/evictkit) instead, and the caller's own
    setting is restored afterwards. An explicit HYPOTHESIS_STORAGE_DIRECTORY is left alone.
    """
    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        yield
        return
    from hypothesis import configuration

    from evictkit.models import cache_dir

    previous = vars(configuration).get("__hypothesis_home_directory")  # None: not resolved yet
    configuration.set_hypothesis_home_dir(cache_dir() / "hypothesis")
    try:
        yield
    finally:
        configuration.set_hypothesis_home_dir(previous)


def _run(prop: Callable[[], None]) -> None:
    """Run a property; a failure that did not reproduce on replay is itself nondeterminism."""
    try:
        with _kit_storage():
            prop()
    except FlakyFailure as exc:
        found = next(_violations(exc), None)
        if found is None:
            raise
        raise LawViolation(found.law, found.policy, f"{found.detail} (this failure did not reproduce when the same "
                           "example was replayed: the policy is not deterministic)", found.example) from exc


def _direct(check: Callable[..., None], *, noop: bool = False, styles: Sequence[str] = FINITE_STYLES):
    def run(subject: Subject, prof: Profile) -> None:
        policy = subject.make()
        label = subject.label
        lo = min_valid_budget(policy, label)

        @prof.settings()
        @given(case=cases(lo=lo, limits=prof.limits, noop=noop, styles=tuple(styles), policy=policy))
        def law(case):
            check(subject.make(), case, label=label)

        _run(law)  # first: what it finds is shrunk to a minimal example
        for case in edge_cases(policy, lo, noop=noop):
            check(subject.make(), case, label=label)

    return run


def _two_sequences(check: Callable[..., None], *, with_subject: bool = False):
    """A law over two sequences run one after the other (reset, independence): Hypothesis pairs,
    then the edge cases paired first with last. `check` takes the subject itself when
    `with_subject`, else its factory."""

    def run(subject: Subject, prof: Profile) -> None:
        policy = subject.make()
        lo = min_valid_budget(policy, subject.label)
        strategy = cases(lo=lo, limits=prof.limits, policy=policy)
        target = subject if with_subject else subject.make

        @prof.settings()
        @given(first=strategy, second=strategy)
        def law(first, second):
            check(target, first, second, label=subject.label)

        _run(law)
        edges = edge_cases(policy, lo)
        for first, second in zip(edges, edges[::-1]):
            check(target, first, second, label=subject.label)

    return run


def _model(check: Callable[..., None], *, noop: bool = False, second: bool = False):
    def run(subject: Subject, prof: Profile) -> None:
        policy = subject.make()
        lo = min_valid_budget(policy, subject.label)

        @prof.settings(model=True)
        @given(case=model_cases(lo=lo, limits=prof.limits, noop=noop, second=second, policy=policy))
        def law(case):
            check(subject.make, case, label=subject.label)

        _run(law)
        for case in edge_model_cases(policy, lo, noop=noop, second=second):
            check(subject.make, case, label=subject.label)

    return run


def _fresh_process(subject: Subject, prof: Profile) -> None:
    policy = subject.make()
    lo = min_valid_budget(policy, subject.label)
    strategy = cases(lo=lo, limits=prof.limits, policy=policy)

    @prof.settings(process=True)
    @given(first=strategy, second=strategy)
    def law(first, second):
        checks.fresh_process(subject, first, second, label=subject.label)

    _run(law)
    edges = edge_cases(policy, lo)
    if len(edges) >= 2:  # the smallest budget after exact ties under GQA
        checks.fresh_process(subject, edges[1], edges[0], label=subject.label)


def _invalid_budgets(subject: Subject, prof: Profile) -> None:
    endtoend.invalid_budgets(subject.make, label=subject.label)


LAWS: dict[str, Law] = {
    law.name: law
    for law in (
        Law("budget", checks.budget.__doc__, _direct(checks.budget)),
        Law("order", checks.order.__doc__, _direct(checks.order)),
        Law("protection", checks.protection.__doc__, _direct(checks.protection)),
        Law("determinism", checks.determinism.__doc__, _direct(checks.determinism)),
        Law("noop", checks.noop.__doc__, _direct(checks.noop, noop=True)),
        Law("integrity", checks.integrity.__doc__, _direct(checks.integrity, styles=STYLES)),
        Law("batch_rows", checks.batch_rows.__doc__, _direct(checks.batch_rows)),
        Law("padding", checks.padding.__doc__, _direct(checks.padding)),
        Law("reset", checks.reset.__doc__, _two_sequences(checks.reset)),
        Law("independence", checks.independence.__doc__, _two_sequences(checks.independence, with_subject=True)),
        Law("fresh_process", checks.fresh_process.__doc__, _fresh_process, profiles=("thorough",)),
        Law("invalid_budget", endtoend.invalid_budgets.__doc__, _invalid_budgets),
        Law("compress", endtoend.compress_run.__doc__, _model(endtoend.compress_run)),
        Law("generation", endtoend.generation.__doc__, _model(endtoend.generation, noop=True)),
        Law("reset_compress", endtoend.sequences.__doc__, _model(endtoend.sequences, second=True)),
        Law("batch", endtoend.batched.__doc__, _model(endtoend.batched, second=True)),
        Law("chunked", endtoend.chunked.__doc__, _model(endtoend.chunked)),
    )
}


def check_law(
    law: str,
    policy: str | type | Any,
    params: Mapping[str, Any] | None = None,
    *,
    profile_name: str | None = None,
) -> None:
    """Run one law (a name from `LAWS`) as a Hypothesis property; raises LawViolation. A law named
    here runs whatever its `profiles`."""
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; laws: {', '.join(LAWS)}")
    LAWS[law].check(as_subject(policy, params), profile(profile_name))


def check_all(policy: str | type | Any, params: Mapping[str, Any] | None = None, *,
              profile_name: str | None = None) -> None:
    """Run every law of the profile; the first violation is raised."""
    prof = profile(profile_name)
    for law in LAWS:
        if LAWS[law].runs_in(prof):
            check_law(law, policy, params, profile_name=prof.name)


def conformance_tests(
    policy: str | type | Any,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    laws: Sequence[str] | None = None,
    skip: Sequence[str] = (),
) -> type:
    """A pytest test class with one test per law (parametrised over each parameter set).

    Assign it to a module-level name starting with `Test` so pytest collects it::

        TestKeyNorm = conformance_tests("key_norm", params=[{}, {"window": 4}])
    """
    import pytest

    param_sets = [params or {}] if params is None or isinstance(params, Mapping) else list(params)
    subjects = [as_subject(policy, p) for p in param_sets]
    chosen = list(laws) if laws is not None else list(LAWS)
    unknown = [name for name in [*chosen, *skip] if name not in LAWS]
    if unknown:
        raise ValueError(f"unknown law(s) {', '.join(unknown)}; laws: {', '.join(LAWS)}")

    def make_test(name: str):
        def test(self, subject: Subject) -> None:
            prof = profile()
            if not LAWS[name].runs_in(prof):
                pytest.skip(f"law {name!r} runs in the {' and '.join(LAWS[name].profiles or ())} profile "
                            f"({PROFILE_ENV}=thorough), not in {prof.name!r}")
            LAWS[name].check(subject, prof)

        test.__name__ = f"test_{name}"
        test.__doc__ = LAWS[name].doc
        return pytest.mark.parametrize("subject", subjects, ids=[s.id for s in subjects])(test)

    namespace: dict[str, Any] = {f"test_{n}": make_test(n) for n in chosen if n not in skip}
    slug = re.sub(r"\W", "_", subjects[0].cls.name or subjects[0].cls.__name__)
    namespace["__doc__"] = f"The laws of eviction for {subjects[0].cls.name!r}."
    return type(f"TestLaws_{slug}", (), namespace)


__all__ = [
    "LAWS", "PROFILES", "Law", "LawViolation", "Profile", "check_all", "check_law", "conformance_tests", "profile",
]
