"""The laws as plain checks on one example, at the direct level.

`drive` runs a policy on one synthetic layer exactly the way `evictkit.compress` does (observe
every forward, select when over budget, compact K, V, positions and side tensors with the same
indices), and records every step. Each law is a function `law(policy, case)` that drives and
raises `LawViolation` naming the law, the policy and the example. `evictkit.specs.laws` turns
them into Hypothesis properties; they are also usable on a hand-written case.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from evictkit.kernels import compact_many
from evictkit.observation import Observation
from evictkit.policy import Policy, ScorePolicy, params_of
from evictkit.specs.cases import Case
from evictkit.specs.tiny import tiny_attention

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
            raise ValueError(f"policy {policy!r} is not registered; registered policies: {', '.join(table) or '(none)'}")
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
            raise ctx.fail(f"check_budget({b}) raised {type(exc).__name__} (invalid budgets must raise ValueError): {exc}") from exc
        return b
    raise ctx.fail(f"check_budget rejects every budget up to {MAX_PROBED_BUDGET}")


def budget_ok(policy: Policy, budget: int, n_layers: int | None = None, length: int = 1) -> bool:
    """Whether the policy accepts `budget` (and, given `n_layers`, a schedule for a prompt of
    `length`): a ValueError is a refusal; any other error is left for the laws to report."""
    try:
        policy.check_budget(budget)
        for li in range(n_layers or 0):
            policy.layer_budget(budget, li, n_layers, length)
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


# --- the driver -------------------------------------------------------------------------------


@attrs.define
class Step:
    """One forward of the driven layer: the cache before eviction, the selection, the cache after.

    A ragged selection (`select()` returned `(idx, counts)`, see evictkit.ragged) keeps head h's
    entries in the last `counts[b, h]` columns of `idx`; `real` marks them.
    """

    index: int
    phase: str
    q: int
    budget: int  # this layer's budget
    limit: int  # the size above which the core evicts in this step
    before: dict[str, torch.Tensor]  # "keys", "values", "positions", "state[<name>]"
    after: dict[str, torch.Tensor]
    idx: torch.Tensor | None = None  # [B, H_kv, K] as select() returned it, when the step evicted
    counts: torch.Tensor | None = None  # [B, H_kv] for a ragged selection
    real: torch.Tensor | None = None  # [B, H_kv, K] bool, the columns of idx that are kept entries
    gather: torch.Tensor | None = None  # [B, H_kv, K] the indices compaction used (0 on padding)
    valid_after: torch.Tensor | None = None  # [B, H_kv, K] bool, real entries after (None: all)
    scores: torch.Tensor | None = None  # ScorePolicy.score() when asked for

    @property
    def T(self) -> int:
        return self.before["keys"].shape[2]

    @property
    def where(self) -> str:
        return f"step {self.index} ({self.phase}, {self.T} slots, layer budget {self.budget})"

    def kept(self) -> torch.Tensor:
        """[B, H_kv, T] bool: the slots this eviction kept."""
        return kept_mask(self.idx, self.real, self.T)

    def entries_after(self) -> int:
        """Real entries summed over heads after the step (the largest over the batch)."""
        if self.valid_after is None:
            return self.after["keys"].shape[1] * self.after["keys"].shape[2]
        return int(self.valid_after.sum((1, 2)).max())


def layer_budgets(policy: Policy, case: Case, ctx: LawContext) -> list[int]:
    """The policy's per-layer budgets for `case`, each validated as an int >= 1."""
    out = []
    for li in range(case.n_layers):
        b = ctx.call(f"layer_budget({case.budget}, {li}, {case.n_layers}, {case.prompt})", policy.layer_budget,
                     case.budget, li, case.n_layers, case.prompt)
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ctx.fail(f"layer_budget({case.budget}, {li}, {case.n_layers}, {case.prompt}) returned {b!r}; "
                           "it must be an int >= 1")
        out.append(b)
    return out


def drive(policy: Policy, case: Case, ctx: LawContext, *, scores: bool = False) -> list[Step] | None:
    """Run `case` through `policy` as evictkit.compress would, on one synthetic layer.

    Returns the steps, or None when the policy refused non-finite input with ValueError.
    scores: also call `ScorePolicy.score` before each eviction and check it (shape, no NaN).
    """
    try:
        return _drive(policy, case, ctx, scores=scores)
    except _Refused:
        return None


def _drive(policy: Policy, case: Case, ctx: LawContext, *, scores: bool) -> list[Step]:
    from evictkit import ragged

    B, H, D, layer = case.batch, case.kv_heads, case.head_dim, case.layer
    module, rope = tiny_attention(case.heads, H, D, layer, case.dtype)
    data = case.data()
    lenient = not case.finite  # ValueError is the right answer to NaN/inf input
    needs = ctx.call("needs()", policy.needs)
    budget = layer_budgets(policy, case, ctx)[layer]
    phases = tuple(policy.phases)
    true_pos = torch.arange(case.total).expand(B, case.total)

    keys = values = positions = None
    pad: torch.Tensor | None = None  # [B, H] leading padding slots of a ragged layer
    state: dict[str, torch.Tensor] = {}
    scratch: dict[str, Any] = {}
    window: tuple[torch.Tensor, torch.Tensor] | None = None
    seen = 0
    steps: list[Step] = []
    for i, q in enumerate(case.chunks):
        prefill = i == 0
        phase = "prefill" if prefill else "decode"
        span = slice(seen, seen + q)
        qpos = true_pos[:, span]
        new_pos = qpos.unsqueeze(1).expand(B, H, q)
        if prefill:
            keys, values, positions = data.keys[:, :, span], data.values[:, :, span], new_pos
        else:
            keys = torch.cat([keys, data.keys[:, :, span]], dim=2)
            values = torch.cat([values, data.values[:, :, span]], dim=2)
            positions = torch.cat([positions, new_pos], dim=-1)
        for name in list(state):
            state[name] = torch.cat([state[name], state[name].new_zeros(B, H, q, *state[name].shape[3:])], dim=2)
        seen += q
        hidden = data.hidden[:, span]
        cos, sin = rope(hidden, qpos)
        T = keys.shape[2]

        buffer = None
        if needs.window and not prefill:
            window = _roll_window(module, hidden, cos, sin, qpos, window, needs.window)
            buffer = window
        obs = Observation(
            module=module, layer_idx=layer, n_layers=case.n_layers, phase=phase, keys=keys, values=values,
            positions=positions, state=state, scratch=scratch, hidden_states=hidden, position_embeddings=(cos, sin),
            query_positions=qpos, window=needs.window, window_buffer=buffer, valid=ragged.valid_mask(pad, T),
            phases=phases,
        )
        if needs.window and prefill and "decode" in phases:
            window = (obs.window_queries, obs.window_positions)

        new_state = ctx.call(f"observe() at step {i}", policy.observe, obs, value_error_ok=lenient) or {}
        if not isinstance(new_state, Mapping):
            raise ctx.fail(f"observe() returned {type(new_state).__name__}; it must return a mapping of tensors")
        for name, t in new_state.items():
            if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or tuple(t.shape[:3]) != (B, H, T):
                raise ctx.fail(f"observe() at step {i} returned {name!r} with shape {tuple(getattr(t, 'shape', ()))}; "
                               f"side tensors must be [B, H_kv, T] or [B, H_kv, T, E] with [B, H_kv, T] = {(B, H, T)}")
            if case.finite and t.is_floating_point() and bool(torch.isnan(t).any()):
                raise ctx.fail(f"observe() at step {i} returned NaN in side tensor {name!r} on finite inputs")
            state[name] = t

        before = {"keys": keys, "values": values, "positions": positions, **{f"state[{n}]": t for n, t in state.items()}}
        limit = budget if prefill else budget + case.slack
        step = Step(index=i, phase=phase, q=q, budget=budget, limit=limit, before=before, after=before,
                    valid_after=ragged.valid_mask(pad, T))
        # the core's condition: more real entries than H_kv * limit (T > limit on rectangular layers)
        if phase in phases and ragged.real_entries(pad, H, T) > H * limit:
            if scores and isinstance(policy, ScorePolicy):
                step.scores = _checked_scores(policy, obs, ctx, i, (B, H, T), case.finite)
            selection = ctx.call(f"select() at step {i}", policy.select, obs, budget, value_error_ok=lenient)
            idx, counts, real, gidx, new_pad = _indexable(selection, pad, B, H, T, ctx, i)
            names = list(state)
            out = ctx.call("the compaction core", compact_many, [keys, values, positions, *state.values()], gidx)
            keys, values, positions = out[0], out[1], out[2]
            valid = ragged.valid_mask(new_pad, gidx.shape[-1])
            if valid is not None:
                positions = positions.masked_fill(~valid, -1)  # as the core marks padding
            pad = new_pad
            state = dict(zip(names, out[3:]))
            step.idx, step.counts, step.real, step.gather, step.valid_after = idx, counts, real, gidx, valid
            step.after = {"keys": keys, "values": values, "positions": positions,
                          **{f"state[{n}]": t for n, t in state.items()}}
        steps.append(step)
    return steps


def _roll_window(module, hidden, cos, sin, qpos, window, w):
    """The rolling buffer of the newest `w` post-RoPE queries, as the core keeps it while decoding."""
    from evictkit.attention import project_queries

    new_q = project_queries(module, hidden[:, -w:], cos[:, -w:], sin[:, -w:])
    new_p = qpos[:, -w:]
    if window is not None:
        new_q = torch.cat([window[0], new_q], dim=2)[:, :, -w:]
        new_p = torch.cat([window[1], new_p], dim=1)[:, -w:]
    return new_q, new_p


def _checked_scores(policy: ScorePolicy, obs: Observation, ctx: LawContext, i: int, shape, finite: bool) -> torch.Tensor:
    s = ctx.call(f"score() at step {i}", policy.score, obs, value_error_ok=not finite)
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape or not s.is_floating_point():
        raise ctx.fail(f"score() at step {i} returned {type(s).__name__} {tuple(getattr(s, 'shape', ()))} "
                       f"{getattr(s, 'dtype', '')}; it must be floating point [B, H_kv, T] = {shape}")
    if finite and bool(torch.isnan(s).any()):
        n = int(torch.isnan(s).sum())
        raise ctx.fail(f"score() at step {i} returned NaN scores ({n} of {s.numel()}) on finite inputs; "
                       "eviction needs a total order (compute in fp32 and clamp)")
    if bool(torch.isnan(s).any()):
        # the shared selection must refuse NaN with a clear ValueError
        try:
            from evictkit.selection import select_topk

            select_topk(s, 1, policy=policy.name)
        except ValueError:
            pass
        else:
            raise ctx.fail("select_topk accepted NaN scores; it must raise ValueError")
    return s


def _indexable(selection: object, pad: torch.Tensor | None, B: int, H: int, T: int, ctx: LawContext, i: int):
    """Just enough to compact with a selection; every law checks the rest itself.

    returns (idx, counts or None, real [B, H, K] bool, gather indices, new padding [B, H] or None).
    """
    counts = None
    if isinstance(selection, tuple):
        if len(selection) != 2:
            raise ctx.fail(f"select() at step {i} returned a tuple of {len(selection)}; a ragged selection is (idx, counts)")
        selection, counts = selection
    idx = selection
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise ctx.fail(f"select() at step {i} returned {type(idx).__name__} "
                       f"{getattr(idx, 'dtype', '')}; it must return an int64 tensor [B, H_kv, K]")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (B, H):
        raise ctx.fail(f"select() at step {i} returned shape {tuple(idx.shape)}; expected [B, H_kv, K] with "
                       f"B, H_kv = {B}, {H}")
    idx = idx.long()
    K = idx.shape[-1]
    new_pad = None
    if counts is None:
        real = torch.ones_like(idx, dtype=torch.bool)
    else:
        if (not isinstance(counts, torch.Tensor) or counts.dtype not in (torch.int64, torch.int32)
                or tuple(counts.shape) != (B, H)):
            raise ctx.fail(f"select() at step {i} returned counts {type(counts).__name__} "
                           f"{tuple(getattr(counts, 'shape', ()))}; a ragged selection needs int counts [B, H_kv]")
        counts = counts.long().to(idx.device)
        if int(counts.min()) < 0 or int(counts.max()) != K:
            raise ctx.fail(f"select() at step {i} returned counts {counts.tolist()}; they must lie in [0, K] with "
                           f"max(counts) == K = {K}")
        real = torch.arange(K, device=idx.device) >= (K - counts)[..., None]
        new_pad = K - counts if bool((K - counts).any()) else None
    kept = idx[real]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= T):
        raise ctx.fail(f"select() at step {i} returned indices outside [0, {T}): "
                       f"min {int(kept.min())}, max {int(kept.max())}")
    if pad is not None and bool((idx < pad.to(idx.device)[..., None])[real].any()):
        raise ctx.fail(f"select() at step {i} kept a padding slot of the ragged layer")
    return idx, counts, real, torch.where(real, idx, 0), new_pad


# --- helpers for the laws ------------------------------------------------------------------------


def _row(t: torch.Tensor, n: int = 24) -> str:
    items = t.tolist()
    return str(items) if len(items) <= n else f"{items[:n // 2]} ... {items[-n // 2:]} ({len(items)} entries)"


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point():
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        return bool(same.all())
    return torch.equal(a, b)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The plain reference of compaction: x[b, h, idx[b, h, k]]."""
    idx = idx.to(device=x.device, dtype=torch.long)
    b = torch.arange(x.shape[0], device=x.device)[:, None, None]
    h = torch.arange(x.shape[1], device=x.device)[None, :, None]
    return x[b, h, idx]


def _first_bad_row(bad: torch.Tensor) -> tuple[int, int]:
    """(batch, head) of the first True in a [B, H, ...] mask."""
    b, h = (int(v) for v in bad.reshape(bad.shape[0], bad.shape[1], -1).any(-1).nonzero()[0])
    return b, h


def kept_mask(idx: torch.Tensor, real: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H_kv, T] bool: the slots a selection keeps (`real` marks its non-padding columns)."""
    mask = torch.zeros(*idx.shape[:2], T + 1, dtype=torch.bool)
    cols = torch.where(real, idx.long(), T).cpu()  # padding columns land in a spare slot
    return mask.scatter_(-1, cols, True)[..., :T]


def budget_problem(idx: torch.Tensor, counts: torch.Tensor | None, real: torch.Tensor, T: int, budget: int,
                   exact: bool) -> str | None:
    """Why a selection breaks the budget law, or None."""
    H = idx.shape[1]
    want = min(T, budget)
    if counts is None:
        got = idx.shape[-1]
        if got != want if exact else not 1 <= got <= want:
            rule = f"exactly min(length, budget) = {want}" if exact else f"between 1 and min(length, budget) = {want}"
            return f"select() kept {got} entries per head; an eviction must leave {rule}"
        return None
    total = real.sum((1, 2))
    bad = total != H * want if exact else (total > H * want) | (total < 1)
    if bool(bad.any()):
        return (f"the ragged selection keeps {total.tolist()} entries per batch row (per head "
                f"{real.sum(-1).tolist()}); the layer total must be H_kv x min(length, budget) = {H} x {want}")
    return None


def order_problem(idx: torch.Tensor, real: torch.Tensor) -> str | None:
    if idx.shape[-1] > 1:
        bad = (idx[..., 1:] <= idx[..., :-1]) & real[..., :-1]
        if bool(bad.any()):
            b, h = _first_bad_row(bad)
            return (f"select() returned indices that are not strictly increasing (batch {b}, head {h}): "
                    f"{_row(idx[b, h][real[b, h]])}")
    return None


def protection_problem(idx: torch.Tensor, real: torch.Tensor, positions: torch.Tensor, sinks: int, window: int,
                       newest: bool) -> str | None:
    """Which protected slot a selection evicted, or None. `positions` [B, H_kv, T] are the cache's
    true positions before the eviction (-1 on the padding of a ragged layer, whose oldest real
    entry sits after its padding)."""
    T = positions.shape[-1]
    real_before = (positions >= 0).cpu()
    first_real = real_before.float().argmax(-1)
    slots = torch.arange(T)
    required = (slots >= max(T - window, 0)).expand_as(real_before).clone()
    required |= (slots >= first_real[..., None]) & (slots < first_real[..., None] + sinks)
    if newest:
        required[..., T - 1] = True
    missing = required & real_before & ~kept_mask(idx, real, T)
    if bool(missing.any()):
        b, h = _first_bad_row(missing)
        why = f"sinks={sinks}, window={window}" + (", and the newest token at decode" if newest else "")
        return (f"protected slot(s) {missing[b, h].nonzero().flatten().tolist()} were evicted (batch {b}, head {h}; "
                f"{why}); kept {_row(idx[b, h][real[b, h]])}")
    return None


def compare_runs(first: list[Step], second: list[Step]) -> str | None:
    """The first difference between two drives of the same case, or None."""
    if len(first) != len(second):
        return f"{len(first)} steps vs {len(second)} steps"
    for s1, s2 in zip(first, second):
        if (s1.idx is None) != (s2.idx is None):
            return f"{s1.where}: one run evicted and the other did not"
        if s1.idx is not None and not torch.equal(s1.idx.long(), s2.idx.long()):
            bad = s1.idx.long() != s2.idx.long() if s1.idx.shape == s2.idx.shape else torch.ones(1, 1, 1, dtype=torch.bool)
            b, h = _first_bad_row(bad)
            return (f"{s1.where}: kept indices differ (batch {b}, head {h}): "
                    f"{_row(s1.idx[b, h])} vs {_row(s2.idx[b, h])}")
        if (s1.counts is None) != (s2.counts is None) or (
                s1.counts is not None and not torch.equal(s1.counts, s2.counts)):
            return f"{s1.where}: the per-head counts differ"
        for name in s1.after:
            if name not in s2.after or not _bit_equal(s1.after[name], s2.after[name]):
                return f"{s1.where}: {name} after the step differs"
    return None


# --- the laws -------------------------------------------------------------------------------------


def budget(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """Exactly min(length, budget) entries per head after every eviction (ragged policies: the
    layer total; `exact_budget = False`: at most that); the per-layer schedule averages to the
    declared budget (within rounding); never above budget + slack while decoding."""
    ctx = LawContext("budget", label or describe(policy), case)
    budgets = layer_budgets(policy, case, ctx)
    if case.budget < case.prompt:
        mean = sum(budgets) / len(budgets)
        if abs(mean - case.budget) > 1:
            raise ctx.fail(f"the per-layer budgets {budgets} average {mean:.2f} entries, not the declared budget "
                           f"{case.budget} (a schedule may redistribute the total, not change it)")
    for s in drive(policy, case, ctx) or ():
        H = s.before["keys"].shape[1]
        if s.idx is not None:
            problem = budget_problem(s.idx, s.counts, s.real, s.T, s.budget, policy.exact_budget)
            if problem:
                raise ctx.fail(f"{s.where}: {problem}")
        if s.phase == "decode" and "decode" in policy.phases and s.entries_after() > H * (s.budget + case.slack):
            raise ctx.fail(f"{s.where}: {s.entries_after()} entries in the layer's {H} heads after a decode step, "
                           f"above H_kv x (budget + slack) = {H * (s.budget + case.slack)}")


def _reference_after(s: Step) -> dict[str, torch.Tensor]:
    """What compaction must produce: a plain gather of every tensor, padding positions -1."""
    out = {name: _gather(t, s.gather) for name, t in s.before.items()}
    if s.valid_after is not None:
        out["positions"] = out["positions"].masked_fill(~s.valid_after, -1)
    return out


def order(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """Kept entries keep their original order: strictly increasing indices and positions, and every
    side tensor compacted with the same indices."""
    ctx = LawContext("order", label or describe(policy), case)
    for s in drive(policy, case, ctx) or ():
        problem = order_problem(s.idx, s.real) if s.idx is not None else None
        if problem:
            raise ctx.fail(f"{s.where}: {problem}")
        pos = s.after["positions"]
        if pos.shape[-1] > 1:
            real = s.valid_after if s.valid_after is not None else torch.ones_like(pos, dtype=torch.bool)
            bad = (pos[..., 1:] <= pos[..., :-1]) & real[..., :-1]
            if bool(bad.any()):
                b, h = _first_bad_row(bad)
                raise ctx.fail(f"{s.where}: the cached entries' original positions are out of order "
                               f"(batch {b}, head {h}): {_row(pos[b, h])}")
        if s.idx is not None:
            for name, ref in _reference_after(s).items():
                if not _bit_equal(s.after[name], ref):
                    raise ctx.fail(f"{s.where}: {name} was not compacted in the order of the kept indices")


def protection(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """The sinks and window of `protected()` are always kept, and the newest token survives every
    decode-time eviction unless the policy declares `may_evict_newest`."""
    ctx = LawContext("protection", label or describe(policy), case)
    prot = ctx.call("protected()", policy.protected)
    if (not isinstance(prot, tuple) or len(prot) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in prot)):
        raise ctx.fail(f"protected() returned {prot!r}; it must be a tuple (sinks, window) of ints >= 0")
    sinks, window = prot
    for s in drive(policy, case, ctx) or ():
        if s.idx is None:
            continue
        newest = s.phase == "decode" and not policy.may_evict_newest
        problem = protection_problem(s.idx, s.real, s.before["positions"], sinks, window, newest)
        if problem:
            raise ctx.fail(f"{s.where}: {problem}")


def determinism(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """The same inputs give the same selection and the same cache."""
    ctx = LawContext("determinism", label or describe(policy), case)
    first = drive(policy, case, ctx)
    second = drive(policy, case, ctx)
    if (first is None) != (second is None):
        raise ctx.fail("the policy refused the input once and accepted it once")
    diff = compare_runs(first or [], second or [])
    if diff:
        raise ctx.fail(f"two runs on identical inputs differ: {diff}")


def noop(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """With budget >= length nothing changes: K, V and positions stay bit-identical."""
    ctx = LawContext("no-op", label or describe(policy), case)
    if case.budget < case.total:
        raise ValueError(f"the no-op law needs budget >= length, got {case.budget} < {case.total}")
    pristine = case.data()  # rebuilt: a policy that writes into the cache changes the driver's copy too
    for s in drive(policy, case, ctx) or ():
        T = s.T
        want = {"keys": pristine.keys[:, :, :T], "values": pristine.values[:, :, :T],
                "positions": torch.arange(T).expand(case.batch, case.kv_heads, T)}
        for name, ref in want.items():
            if not _bit_equal(s.after[name], ref):
                raise ctx.fail(f"{s.where}: budget {case.budget} >= length {case.total}, yet {name} changed "
                               f"(the layer budget is {s.budget}; nothing may be evicted or written when "
                               "everything fits)")


def integrity(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """K, V and side tensors keep shape, dtype and device; compaction equals a plain gather; no NaN
    is introduced; non-finite input is either refused with ValueError or handled."""
    ctx = LawContext("integrity", label or describe(policy), case)
    steps = drive(policy, case, ctx, scores=True)
    for s in steps or ():
        if s.idx is None:
            continue
        K = s.idx.shape[-1]
        reference = _reference_after(s)
        for name, t in s.before.items():
            out = s.after[name]
            want = (*t.shape[:2], K, *t.shape[3:])
            if tuple(out.shape) != want or out.dtype != t.dtype or out.device != t.device:
                raise ctx.fail(f"{s.where}: {name} became {tuple(out.shape)} {out.dtype} on {out.device}; "
                               f"expected {want} {t.dtype} on {t.device}")
            if not _bit_equal(out, reference[name]):
                raise ctx.fail(f"{s.where}: compacting {name} does not equal a plain gather of the kept rows")
            if case.finite and out.is_floating_point() and bool(torch.isnan(out).any()):
                raise ctx.fail(f"{s.where}: NaN appeared in {name}")


def reset(make: Callable[[], Policy], first: Case, second: Case, *, label: str | None = None) -> None:
    """A second sequence through the same instance gives what a fresh instance gives."""
    used = make()
    ctx = LawContext("reset", label or describe(used), (first, second))
    drive(used, first, ctx)
    again = drive(used, second, ctx)
    fresh = drive(make(), second, ctx)
    if (again is None) != (fresh is None):
        raise ctx.fail("after a first sequence the policy refuses an input that a fresh instance accepts")
    diff = compare_runs(again or [], fresh or [])
    if diff:
        raise ctx.fail(f"the second sequence differs from the same sequence on a fresh instance (state leaked "
                       f"from the first sequence): {diff}")


#: direct laws taking (policy, case)
DIRECT = {
    "budget": budget,
    "order": order,
    "protection": protection,
    "determinism": determinism,
    "noop": noop,
    "integrity": integrity,
}
