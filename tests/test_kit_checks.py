"""What the conformance kit and the core's debug mode catch besides the laws of
test_laws_catch_broken.py, each with a broken policy that fails and a correct one that passes:
in-place writes (the core's debug mode), score and index dtypes, process-global state, batch
rows, and errors a policy author can act on."""

import re
from typing import ClassVar

import attrs
import pytest
import torch

from evictkit.contract import Needs, Policy, ScorePolicy
from evictkit.debug import SMALL, ChecksumGuard, guard_from_env
from evictkit.ragged import check_ragged
from evictkit.selection import check_indices, select_topk
from evictkit.specs import LawViolation, check_law
from evictkit.specs.cases import Case
from evictkit.specs.checks import fresh_process
from evictkit.specs.laws import LAWS, conformance_tests, profile
from evictkit.specs.subject import as_subject
from evictkit.specs.tiny import tiny_attention
from evictkit.step import CORE_GUARD, LayerState, StepConfig, evict_step


def _key_norm(obs) -> torch.Tensor:
    return -obs.keys.float().norm(dim=-1)


@attrs.define(frozen=True, kw_only=True)
class KeyNorm(ScorePolicy):
    """Correct: fp32 scores from each row alone, no state anywhere."""

    name: ClassVar[str] = "gaps_key_norm"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    window: int = 1

    def protected(self):
        return (0, self.window)

    def score(self, obs):
        return _key_norm(obs)


# --- 1. the core's debug mode: EVICTKIT_DEBUG_READONLY=1 ----------------------------------------------------


@attrs.define(frozen=True, kw_only=True)
class Writes(ScorePolicy):
    """Writes into `target` during `during` ("observe" or "select"); keeps a side tensor "acc"."""

    name: ClassVar[str] = "broken_writes_in_place"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    target: str = "keys"
    during: str = "observe"
    how: str = "scale"

    def _write(self, obs) -> None:
        t = obs.state["acc"] if self.target == "acc" else getattr(obs, self.target)
        if self.how == "scale":
            t.mul_(2)
        elif self.how == "one":  # one element of a large tensor
            t[0, 0, 1, 0] += 1
        else:  # a permutation: the sum is unchanged
            t.copy_(t.flip(-2))

    def observe(self, obs):
        if self.during == "observe" and (self.target != "acc" or "acc" in obs.state):
            self._write(obs)
        return {"acc": obs.keys.float().sum(-1)}

    def score(self, obs):
        if self.during == "select":
            self._write(obs)
        return _key_norm(obs)


def _run_steps(policy: Policy, guard, *, T: int = 10, D: int = 8, decode: int = 2):
    """A prefill of T tokens (budget T // 2) and `decode` decode steps on one synthetic layer."""
    module, rope = tiny_attention(2, 1, D, 0, "float32")
    g = torch.Generator().manual_seed(0)
    N = T + decode
    keys, values, hidden = (torch.randn(1, 1, N, D, generator=g), torch.randn(1, 1, N, D, generator=g),
                            torch.randn(1, N, 2 * D, generator=g))
    cfg = StepConfig(policy=policy, needs=policy.needs(), phases=policy.phases)
    st = LayerState(budget=T // 2)
    k = v = None
    for start, q in [(0, T)] + [(T + i, 1) for i in range(decode)]:
        span = slice(start, start + q)
        k = keys[:, :, span] if k is None else torch.cat([k, keys[:, :, span]], 2)
        v = values[:, :, span] if v is None else torch.cat([v, values[:, :, span]], 2)
        pos = torch.arange(start, start + q)[None]
        out = evict_step(cfg, st, module=module, layer_idx=0, n_layers=1, keys=k, values=v,
                         hidden_states=hidden[:, span], position_embeddings=rope(hidden[:, span], pos),
                         position_ids=pos, guard=guard)
        k, v = out.keys, out.values
    return k, v, st.positions


@pytest.mark.parametrize("target, during, name", [
    ("keys", "observe", "keys"), ("values", "select", "values"), ("positions", "observe", "positions"),
    ("acc", "observe", "state[acc]"), ("acc", "select", "state[acc]"),
])
def test_the_checksum_guard_names_the_policy_the_call_and_the_tensor(target, during, name):
    with pytest.raises(RuntimeError, match=rf"policy 'broken_writes_in_place' wrote into {re.escape(name)}.* in place "
                                           rf"during {during}\(\).*EVICTKIT_DEBUG_READONLY=1.*read-only"):
        _run_steps(Writes(target=target, during=during), ChecksumGuard())


@pytest.mark.parametrize("how", ["one", "flip"])
def test_the_checksum_guard_sees_small_writes_into_large_tensors(how):
    """Over SMALL elements the guard keeps sums and a sample: one element, or a permutation, is seen."""
    D = 64
    T = SMALL // D + 8
    with pytest.raises(RuntimeError, match="wrote into keys in place during observe"):
        _run_steps(Writes(target="keys", during="observe", how=how), ChecksumGuard(), T=T, D=D, decode=0)


def test_the_checksum_guard_changes_nothing_for_a_correct_policy():
    checked = _run_steps(KeyNorm(), ChecksumGuard())
    plain = _run_steps(KeyNorm(), CORE_GUARD)
    assert all(torch.equal(a, b) for a, b in zip(checked, plain))
    assert checked[0].shape[2] == 5  # evicted back to the budget after the prefill and each decode step


def test_without_the_guard_the_write_goes_unnoticed():
    """What the debug mode is for: the core's own guard does not pay for checksums."""
    _run_steps(Writes(target="keys", during="observe"), CORE_GUARD)


def test_guard_from_env(monkeypatch):
    monkeypatch.delenv("EVICTKIT_DEBUG_READONLY", raising=False)
    assert guard_from_env() is CORE_GUARD
    monkeypatch.setenv("EVICTKIT_DEBUG_READONLY", "0")
    assert guard_from_env() is CORE_GUARD
    monkeypatch.setenv("EVICTKIT_DEBUG_READONLY", "1")
    first, second = guard_from_env(), guard_from_env()
    assert isinstance(first, ChecksumGuard) and first is not second  # each holds one run's fingerprints
    monkeypatch.setenv("EVICTKIT_DEBUG_READONLY", "verbose")
    with pytest.raises(ValueError, match="EVICTKIT_DEBUG_READONLY='verbose': must be 1 .* or 0"):
        guard_from_env()


# --- 2. score and index dtypes --------------------------------------------------------------------------------


@attrs.define(frozen=True, kw_only=True)
class CacheDtypeScores(ScorePolicy):
    """Scores in the cache's dtype: bf16 rounds distinct norms to ties."""

    name: ClassVar[str] = "broken_bf16_scores"

    def score(self, obs):
        return -obs.keys.norm(dim=-1)


@attrs.define(frozen=True, kw_only=True)
class Int32Indices(Policy):
    name: ClassVar[str] = "broken_int32_indices"

    def select(self, obs, budget):
        B, H, T = obs.positions.shape
        return torch.arange(T - min(budget, T), T, dtype=torch.int32).expand(B, H, -1)


def test_integrity_catches_scores_that_are_not_fp32():
    with pytest.raises(LawViolation, match=r"returned torch.(bfloat16|float16) scores .* must be float32.*\.float\(\)"):
        check_law("integrity", CacheDtypeScores)


def test_the_kit_and_the_core_refuse_int32_indices():
    with pytest.raises(LawViolation, match=r"int64 tensor .*\.long\(\)"):
        check_law("budget", Int32Indices)
    with pytest.raises(TypeError, match=r"'p': select\(\) must return an int64 tensor .*torch.int32.*\.long\(\)"):
        check_indices(torch.tensor([[[0, 2]]], dtype=torch.int32), 1, 1, 3, 2, "p")
    idx = torch.tensor([[[0, 1, 2], [0, 4, 5]]])
    with pytest.raises(TypeError, match=r"int64 counts, got a torch.int32 tensor.*\.long\(\)"):
        check_ragged(idx, torch.tensor([[3, 3]], dtype=torch.int32), None, 1, 2, 6, 3, "p", "sdpa")
    with pytest.raises(TypeError, match=r"int64 idx, got a torch.int32 tensor"):
        check_ragged(idx.int(), torch.tensor([[3, 3]]), None, 1, 2, 6, 3, "p", "sdpa")


def test_select_topk_returns_int64_whatever_the_score_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert select_topk(torch.rand(2, 3, 9).to(dtype), 4).dtype == torch.int64


def test_a_correct_policy_passes_the_dtype_rules():
    check_law("integrity", KeyNorm)


# --- 3. process-global state ----------------------------------------------------------------------------------

_CALIBRATION: list[float] = []  # module-level: set once per process, by whatever sequence comes first


@attrs.define(frozen=True, kw_only=True)
class CalibratesOnce(ScorePolicy):
    """Keeps the keys whose norm is closest to the typical norm of the first sequence it ever saw."""

    name: ClassVar[str] = "broken_global_calibration"

    def score(self, obs):
        norms = obs.keys.float().norm(dim=-1)
        if not _CALIBRATION:
            _CALIBRATION.append(float(norms.mean()))
        return -(norms - _CALIBRATION[0]).abs()


def _case(seed: int, **kw) -> Case:
    args = dict(batch=1, kv_heads=2, group=1, head_dim=8, dtype="float32", prompt=24, decode=(1, 1), budget=8,
                slack=0, layer=0, n_layers=1, style="normal", seed=seed)
    return Case(**{**args, **kw})


def test_fresh_process_catches_a_module_level_calibration():
    first = _case(1, head_dim=4, style="large")  # norms 30x the second's: the calibration cannot agree
    with pytest.raises(LawViolation, match=r"law 'fresh process' violated by policy 'broken_global_calibration'.*"
                                           r"differs from the same sequence run first in a fresh process.*"
                                           r"module-level global"):
        fresh_process(CalibratesOnce, first, _case(2))


def test_fresh_process_passes_a_policy_without_global_state():
    fresh_process(KeyNorm, _case(1, style="large"), _case(2))


def test_fresh_process_needs_an_importable_class():
    @attrs.define(frozen=True, kw_only=True)
    class Local(ScorePolicy):
        name: ClassVar[str] = "local"

        def score(self, obs):
            return _key_norm(obs)

    with pytest.raises(ValueError, match="imports its class by module path"):
        fresh_process(Local, _case(1), _case(2))


def test_fresh_process_runs_in_the_thorough_profile(monkeypatch):
    law = LAWS["fresh_process"]
    assert law.runs_in(profile("thorough")) and not law.runs_in(profile("ci"))
    assert profile("thorough").process_examples >= 10
    monkeypatch.delenv("EVICTKIT_HYPOTHESIS_PROFILE", raising=False)
    tests = conformance_tests(CalibratesOnce, laws=["fresh_process"])
    with pytest.raises(pytest.skip.Exception, match="runs in the thorough profile"):
        tests().test_fresh_process(as_subject(CalibratesOnce))


# --- 4. batch rows --------------------------------------------------------------------------------------------


@attrs.define(frozen=True, kw_only=True)
class BatchNormalized(ScorePolicy):
    """Subtracts the batch mean: each row's scores depend on the other rows."""

    name: ClassVar[str] = "broken_batch_normalized"

    def score(self, obs):
        s = _key_norm(obs)
        return s - s.mean(0, keepdim=True)


@attrs.define(frozen=True, kw_only=True)
class RowIndexBias(ScorePolicy):
    """A recency bias that grows with the row index: identical rows keep different sets."""

    name: ClassVar[str] = "broken_row_bias"

    def score(self, obs):
        rows = torch.arange(obs.positions.shape[0], device=obs.keys.device).float()[:, None, None]
        return _key_norm(obs) + rows * obs.positions.float()


def test_batch_rows_catches_normalization_across_the_batch():
    with pytest.raises(LawViolation, match=r"law 'batch rows' violated by policy 'broken_batch_normalized'.*"
                       r"batch row 0 keeps positions .* when it is run alone .*depends on the other rows"):
        check_law("batch_rows", BatchNormalized)


def test_batch_rows_catches_identical_rows_that_keep_different_sets():
    with pytest.raises(LawViolation, match="batch rows 0 and 1 hold identical tokens but keep different positions"):
        check_law("batch_rows", RowIndexBias)


def test_batch_rows_passes_a_correct_policy_and_copies_rows():
    check_law("batch_rows", KeyNorm)
    copied = _case(5, batch=3, rows=(7, 7, 9)).data()
    alone = _case(7).data()
    assert torch.equal(copied.keys[0], copied.keys[1]) and torch.equal(copied.keys[:1], alone.keys)
    assert not torch.equal(copied.keys[2], copied.keys[0])
    with pytest.raises(ValueError, match="one seed per batch row"):
        _case(5, batch=2, rows=(1,)).data()


# --- 5. errors a policy author can act on ---------------------------------------------------------------------


@attrs.define(frozen=True, kw_only=True)
class RefusesLargeBudgets(ScorePolicy):
    name: ClassVar[str] = "broken_refuses_large_budgets"

    def score(self, obs):
        return _key_norm(obs)

    def layer_budget(self, budget, layer_idx, n_layers, length):
        if budget >= length:
            raise ValueError("nothing to evict")
        return budget


@attrs.define(frozen=True, kw_only=True)
class DecodeScorerWithoutWindow(ScorePolicy):
    """Evicts at decode and prefers old tokens, with window=0: the newest token goes."""

    name: ClassVar[str] = "broken_decode_no_window"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")

    def score(self, obs):
        return -obs.positions.float()


def test_a_refused_noop_budget_names_the_law_the_cause_and_the_fix():
    with pytest.raises(LawViolation) as info:
        check_law("noop", RefusesLargeBudgets)
    message = str(info.value)
    assert message.startswith("law 'noop' violated by policy 'broken_refuses_large_budgets'"), message
    assert "every budget drawn for this law was refused by check_budget() or layer_budget()" in message
    assert "raised ValueError: nothing to evict" in message
    assert "budget >= length (nothing to evict: return a layer budget >= length, a no-op)" in message


def test_protection_at_decode_suggests_a_window_or_may_evict_newest():
    with pytest.raises(LawViolation, match=r"protected slot.*newest token at decode.*window >= 1 at decode.*"
                                           r"may_evict_newest = True"):
        check_law("protection", DecodeScorerWithoutWindow)
    check_law("protection", KeyNorm)  # window=1: the newest token is kept


# --- padding: a padded row scores and keeps what the row alone does ---------------------------------


@attrs.define(frozen=True, kw_only=True)
class PaddedKeyNorm(KeyNorm):
    """Correct: a per-entry score, and select_topk skips padding (ScorePolicy.select passes obs.valid)."""

    name: ClassVar[str] = "padded_key_norm"

    def needs(self):
        return Needs(window=1, padding=True)


@attrs.define(frozen=True, kw_only=True)
class CentredOverPadding(PaddedKeyNorm):
    """Declares padding but centres its scores on the mean over every slot, padding included."""

    name: ClassVar[str] = "broken_centred_over_padding"

    def score(self, obs):
        s = _key_norm(obs)
        return s - s.mean(-1, keepdim=True)


@attrs.define(frozen=True, kw_only=True)
class SinksFromSlotZero(PaddedKeyNorm):
    """Declares padding but protects its sinks from slot 0, padding or not."""

    name: ClassVar[str] = "broken_sinks_from_slot_zero"

    def protected(self):
        return (2, 1)

    def select(self, obs, budget):
        return select_topk(self.score(obs), budget, sinks=2, window=1, policy=self.name)


def test_padding_law_passes_a_policy_that_honours_padding():
    check_law("padding", PaddedKeyNorm)


def test_padding_law_catches_a_score_that_reads_padding():
    with pytest.raises(LawViolation, match=r"law 'padding' violated .*padding changed the score of a real entry"):
        check_law("padding", CentredOverPadding)


def test_padding_law_catches_sinks_counted_from_slot_zero():
    with pytest.raises(LawViolation, match=r"law 'padding' violated .*(kept a padding slot|keeps positions)"):
        check_law("padding", SinksFromSlotZero)
