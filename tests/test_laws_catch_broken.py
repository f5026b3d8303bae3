"""The laws must catch broken policies: each policy here breaks one law on purpose, and that law
must fail with a LawViolation whose message names the law, the policy and a falsifying example."""

from typing import ClassVar

import attrs
import pytest
import torch

import evictkit
from evictkit.contract import Policy, ScorePolicy
from evictkit.selection import select_topk
from evictkit.specs import LawViolation, check_law
from evictkit.specs.cases import Case
from evictkit.specs.driver import drive
from evictkit.specs.subject import LawContext, as_subject


def _recency(obs) -> torch.Tensor:
    """Scores that prefer old tokens: a policy that forgets its window evicts it."""
    return -obs.positions.float()


@attrs.define(frozen=True, kw_only=True)
class KeepsOneMore(Policy):
    name: ClassVar[str] = "broken_keeps_one_more"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")

    def select(self, obs, budget):
        B, H, T = obs.positions.shape
        return torch.arange(min(budget + 1, T)).expand(B, H, -1)


@attrs.define(frozen=True, kw_only=True)
class Unsorted(ScorePolicy):
    name: ClassVar[str] = "broken_unsorted"

    def score(self, obs):
        return _recency(obs)

    def select(self, obs, budget):
        return select_topk(self.score(obs), budget).flip(-1)


@attrs.define(frozen=True, kw_only=True)
class DropsWindow(ScorePolicy):
    name: ClassVar[str] = "broken_drops_window"
    window: int = 4

    def protected(self):
        return (0, self.window)

    def score(self, obs):
        return _recency(obs)

    def select(self, obs, budget):
        return select_topk(self.score(obs), budget)  # forgets window=self.window


@attrs.define(frozen=True, kw_only=True)
class Nondeterministic(ScorePolicy):
    name: ClassVar[str] = "broken_nondeterministic"

    def score(self, obs):
        return torch.rand(obs.positions.shape)  # the global RNG: a new draw every call


@attrs.define(frozen=True, kw_only=True)
class LeaksViaSetattr(ScorePolicy):
    """Counts sequences on the frozen instance and flips its preference on every other one."""

    name: ClassVar[str] = "broken_setattr_state"
    _sequences: int = attrs.field(default=0, init=False)

    def observe(self, obs):
        if obs.phase == "prefill" and obs.layer_idx == 0:
            object.__setattr__(self, "_sequences", self._sequences + 1)
        return {}

    def score(self, obs):
        return _recency(obs) * (-1) ** self._sequences


@attrs.define(frozen=True, kw_only=True)
class LeaksViaDict(ScorePolicy):
    """The same leak through a mutable field (attrs freezes the binding, not the dict)."""

    name: ClassVar[str] = "broken_dict_state"
    memory: dict = attrs.field(factory=dict)

    def observe(self, obs):
        if obs.phase == "prefill" and obs.layer_idx == 0:
            self.memory["sequences"] = self.memory.get("sequences", 0) + 1
        return {}

    def score(self, obs):
        return _recency(obs) * (-1) ** self.memory["sequences"]


#: what LeaksViaGlobal calibrates on the first call it gets in a process (module-level state)
_CALIBRATION: dict[str, float] = {}


@attrs.define(frozen=True, kw_only=True)
class LeaksViaGlobal(ScorePolicy):
    """Calibrates a module global on the first sequence the process gives it, and keeps it: every
    instance agrees with every other, so only a fresh copy of the module shows the leak."""

    name: ClassVar[str] = "broken_global_state"

    def score(self, obs):
        sign = _CALIBRATION.setdefault("sign", 1.0 if obs.length % 2 else -1.0)
        return _recency(obs) * sign


@attrs.define(frozen=True, kw_only=True)
class ReturnsNaN(ScorePolicy):
    name: ClassVar[str] = "broken_nan"

    def score(self, obs):
        return torch.full(obs.positions.shape, float("nan"))


@attrs.define(frozen=True, kw_only=True)
class ShrinksEverySchedule(ScorePolicy):
    """A per-layer schedule that keeps half the budget in every layer (not a redistribution)."""

    name: ClassVar[str] = "broken_schedule"

    def score(self, obs):
        return _recency(obs)

    def layer_budget(self, budget, layer_idx, n_layers, length):
        return max(1, budget // 2)


@attrs.define(frozen=True, kw_only=True)
class CorruptsKeys(Policy):
    """Writes into the cache it only observes."""

    name: ClassVar[str] = "broken_corrupts_keys"

    def observe(self, obs):
        obs.keys.mul_(0.5)
        return {}


@attrs.define(frozen=True, kw_only=True)
class BadBudgetCheck(ScorePolicy):
    name: ClassVar[str] = "broken_budget_check"

    def score(self, obs):
        return _recency(obs)

    def check_budget(self, budget):
        if budget < 3:
            raise TypeError("budget too small")  # must be ValueError


LAW_NAMES = {"noop": "no-op", "invalid_budget": "invalid budget", "compress": "budget (through evictkit.compress)",
             "chunked": "chunked prefill (through evictkit.compress)",
             "reset_compress": "reset (through evictkit.compress)"}


def _violation(law: str, policy, match: str) -> LawViolation:
    """Run `law` on `policy`, assert it fails with `match`, and that the message names the law,
    the policy and (Hypothesis laws) the falsifying example."""
    with pytest.raises(LawViolation, match=match) as info:
        check_law(law, policy)
    err = info.value
    message = str(err)
    assert err.law == LAW_NAMES.get(law, law), message
    assert message.startswith(f"law {err.law!r} violated by policy {policy.name!r}"), message
    if law != "invalid_budget":
        assert f"example: {err.example!r}" in message
    return err


def test_budget_catches_one_entry_too_many():
    err = _violation("budget", KeepsOneMore, "kept .* entries per head; an eviction must leave exactly")
    assert err.example.budget < err.example.prompt + sum(err.example.decode)


def test_order_catches_unsorted_indices():
    _violation("order", Unsorted, "not strictly increasing")


def test_protection_catches_a_dropped_window():
    err = _violation("protection", DropsWindow, r"protected slot\(s\) .* were evicted .*window=4")
    assert err.example is not None


def test_determinism_catches_a_global_rng():
    _violation("determinism", Nondeterministic, "two runs on identical inputs differ")


@pytest.mark.parametrize("policy", [LeaksViaSetattr, LeaksViaDict], ids=["object_setattr", "mutable_field"])
def test_reset_catches_state_on_the_instance(policy):
    _violation("reset", policy, "state leaked")


@pytest.mark.parametrize("policy", [LeaksViaSetattr, LeaksViaDict], ids=["object_setattr", "mutable_field"])
def test_independence_catches_state_on_the_instance(policy):
    _violation("independence", policy, "differs from the same sequence on a fresh instance of the class from a "
               "fresh copy of its module")


def test_independence_catches_a_global_that_the_reset_law_cannot_see():
    check_law("reset", LeaksViaGlobal)  # every instance in this process shares the calibration
    _violation("independence", LeaksViaGlobal, "a module global")


def test_reset_catches_state_on_the_instance_end_to_end():
    _violation("reset_compress", LeaksViaSetattr, "second sequence generates differently")


def test_integrity_catches_nan_scores():
    _violation("integrity", ReturnsNaN, "NaN scores .* on finite inputs")


def test_nan_scores_are_a_clear_error_in_compress():
    from evictkit.specs.tiny import tiny_model

    model = tiny_model(layers=1)
    ids = torch.randint(3, 128, (1, 12))
    with pytest.raises(ValueError, match="broken_nan.*NaN"):
        with evictkit.compress(model, ReturnsNaN(), budget=4):
            model(ids)


def test_budget_catches_a_schedule_that_does_not_average_the_budget():
    _violation("budget", ShrinksEverySchedule, "average .* not the declared budget")


def test_noop_catches_a_schedule_that_evicts_when_everything_fits():
    _violation("noop", ShrinksEverySchedule, "changed")


def test_noop_and_generation_catch_a_policy_that_writes_into_the_cache():
    _violation("noop", CorruptsKeys, "keys changed|modified keys in place")
    _violation("generation", CorruptsKeys, "differ|not bit-identical")


def test_compress_law_catches_one_entry_too_many_end_to_end():
    err = _violation("compress", KeepsOneMore, "kept .* entries per head")
    assert (err.example.prompt, err.example.new, err.example.budget) == (1, 2, 1)  # the first decode step


def test_invalid_budget_catches_a_check_that_raises_the_wrong_type():
    _violation("invalid_budget", BadBudgetCheck, "TypeError")


def test_a_failure_names_the_minimal_example():
    """Hypothesis shrinks to the smallest case: one batch row, one head, float32, no decode."""
    err = _violation("order", Unsorted, "not strictly increasing")
    case = err.example
    assert (case.batch, case.kv_heads, case.group, case.dtype, case.decode) == (1, 1, 1, "float32", ())
    assert case.prompt == case.budget + 1 == 3  # the fewest entries with two kept to misorder


def test_a_correct_policy_passes_the_laws_the_broken_ones_fail():
    """The reference for the broken ones: the same scores through the shared selection."""

    @attrs.define(frozen=True, kw_only=True)
    class Fine(ScorePolicy):
        name: ClassVar[str] = "fine_recency"
        window: int = 4

        def protected(self):
            return (0, self.window)

        def score(self, obs):
            return _recency(obs)

    for law in ("budget", "order", "protection", "determinism", "reset", "independence", "integrity", "noop"):
        check_law(law, Fine)


def test_the_driver_reports_a_hand_written_case():
    """The checks are usable without Hypothesis, on a case written by hand."""
    case = Case(batch=1, kv_heads=1, group=1, head_dim=4, dtype="float32", prompt=6, decode=(1,), budget=3, slack=0,
                layer=0, n_layers=1, style="normal", seed=0)
    steps = drive(KeepsOneMore(), case, LawContext("budget", "keeps_one_more", case))
    assert [s.idx.shape[-1] for s in steps] == [4, 4]  # budget + 1 at prefill and at the decode step
    assert steps[0].after["positions"].tolist() == [[[0, 1, 2, 3]]]
    assert as_subject(KeepsOneMore).id == "broken_keeps_one_more"


def test_the_generated_cases_evict_in_most_examples():
    """The laws are not vacuous: most drawn cases run an eviction (prefill or decode)."""
    from hypothesis import given, settings

    from evictkit.specs.laws import profile
    from evictkit.specs.strategies import cases

    policy = evictkit.policy("streaming_llm")
    evicted = []

    @settings(max_examples=40, derandomize=True, database=None, deadline=None)
    @given(case=cases(lo=5, limits=profile("ci").limits, policy=policy))
    def run(case):
        steps = drive(policy, case, LawContext("budget", "streaming_llm", case))
        evicted.append(any(s.idx is not None for s in steps))

    run()
    assert sum(evicted) >= 0.6 * len(evicted), evicted


def test_profiles_come_from_the_environment(monkeypatch):
    from evictkit.specs.laws import PROFILE_ENV, profile

    monkeypatch.delenv(PROFILE_ENV, raising=False)
    assert profile().name == "ci" and profile().derandomize
    monkeypatch.setenv(PROFILE_ENV, "thorough")
    assert profile().name == "thorough" and profile().limits.prompt >= 2048
    monkeypatch.setenv(PROFILE_ENV, "fast")
    with pytest.raises(ValueError, match="EVICTKIT_HYPOTHESIS_PROFILE='fast': must be one of ci, thorough"):
        profile()


@attrs.define(frozen=True, kw_only=True)
class OneShotOnly(ScorePolicy):
    """Evicts in the forward that starts a sequence only: later prefill chunks pile up."""

    name: ClassVar[str] = "broken_one_shot_only"

    def score(self, obs):
        return _recency(obs)

    def select(self, obs, budget):
        if obs.q_len != obs.length:  # a chunk: keeps everything (more than the budget)
            B, H, T = obs.positions.shape
            return torch.arange(T).expand(B, H, T)
        return super().select(obs, budget)


def test_chunked_law_catches_a_policy_that_ignores_chunks():
    _violation("chunked", OneShotOnly, "entries in .* KV heads after the chunk|raised ValueError")
