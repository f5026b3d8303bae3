"""The laws as plain checks on one example, at the direct level.

`drive` (specs/driver.py) runs a policy on one synthetic layer exactly the way
`evictkit.compress` does (observe every forward, select when over budget, compact K, V,
positions and side tensors with the same indices), and records every step. Each law is a
function `law(policy, case)` that drives and raises `LawViolation` (specs/subject.py) naming
the law, the policy and the example. `evictkit.specs.laws` turns
them into Hypothesis properties; they are also usable on a hand-written case.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
import torch

from evictkit import contract
from evictkit.contract import Policy
from evictkit.specs.cases import Case
from evictkit.specs.driver import Step, drive, kept_mask, layer_budgets  # noqa: F401  (re-exported)
from evictkit.specs.driver import bit_equal as _bit_equal
from evictkit.specs.padding import padding  # noqa: F401  (a direct law, listed in DIRECT)
from evictkit.specs.subject import (  # noqa: F401  (re-exported: the kit's names live in checks)
    MAX_PROBED_BUDGET,
    LawContext,
    LawViolation,
    Subject,
    as_subject,
    budget_ok,
    describe,
    min_schedule_budget,
    min_valid_budget,
)

# --- helpers for the laws ------------------------------------------------------------------------


def _row(t: torch.Tensor, n: int = 24) -> str:
    items = t.tolist()
    return str(items) if len(items) <= n else f"{items[:n // 2]} ... {items[-n // 2:]} ({len(items)} entries)"


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
    declared = required.clone()  # what protected() alone asks for
    if newest:
        required[..., T - 1] = True
    missing = required & real_before & ~kept_mask(idx, real, T)
    if bool(missing.any()):
        b, h = _first_bad_row(missing)
        why = f"sinks={sinks}, window={window}" + (", and the newest token at decode" if newest else "")
        problem = (f"protected slot(s) {missing[b, h].nonzero().flatten().tolist()} were evicted (batch {b}, "
                   f"head {h}; {why}); kept {_row(idx[b, h][real[b, h]])}")
        if newest and bool((missing & ~declared)[..., T - 1].any()):
            problem += (". At decode the newest token is protected even though protected() does not cover it: "
                        "keep it with a window >= 1 at decode (protected() returning window >= 1, or "
                        "select_topk(..., window=max(window, 1)) when obs.phase == 'decode'), or declare "
                        "declare may_evict_newest = True through needs() (return `Needs(may_evict_newest=True)`) if "
                        "the policy means to evict it (as TOVA does)")
        return problem
    return None


def compare_runs(first: list[Step], second: list[Step]) -> str | None:
    """The first difference between two drives of the same case, or None."""
    if len(first) != len(second):
        return f"{len(first)} steps vs {len(second)} steps"
    for s1, s2 in zip(first, second):
        if (s1.idx is None) != (s2.idx is None):
            return f"{s1.where}: one run evicted and the other did not"
        # s2's idx, counts are not None where s1's are not (checked just before)
        if s1.idx is not None and not torch.equal(s1.idx.long(), s2.idx.long()):  # type: ignore[union-attr]
            bad = (s1.idx.long() != s2.idx.long() if s1.idx.shape == s2.idx.shape  # type: ignore[union-attr]
                   else torch.ones(1, 1, 1, dtype=torch.bool))
            b, h = _first_bad_row(bad)
            return (f"{s1.where}: kept indices differ (batch {b}, head {h}): "
                    f"{_row(s1.idx[b, h])} vs {_row(s2.idx[b, h])}")  # type: ignore[index]
        if (s1.counts is None) != (s2.counts is None) or (
                s1.counts is not None and not torch.equal(s1.counts, s2.counts)):  # type: ignore[arg-type]
            return f"{s1.where}: the per-head counts differ"
        for name in s1.after:
            if name not in s2.after or not _bit_equal(s1.after[name], s2.after[name]):
                return f"{s1.where}: {name} after the step differs"
    return None


# --- the laws -------------------------------------------------------------------------------------


def budget(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """Exactly min(length, budget) entries per head after every eviction (ragged policies: the
    layer total; `Needs(exact_budget=False)`: at most that); the per-layer schedule averages to the
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
            problem = budget_problem(s.idx, s.counts, s.real, s.T, s.budget, contract.declared(policy).exact_budget)  # type: ignore[arg-type]
            if problem:
                raise ctx.fail(f"{s.where}: {problem}")
        if s.phase == "prefill" and "prefill" in policy.phases and s.entries_after() > H * s.budget:
            raise ctx.fail(f"{s.where}: {s.entries_after()} entries in the layer's {H} heads after a prefill "
                           f"{'chunk' if s.index else 'forward'}, above H_kv x budget = {H * s.budget}")
        if s.phase == "decode" and "decode" in policy.phases and s.entries_after() > H * (s.budget + case.slack):
            raise ctx.fail(f"{s.where}: {s.entries_after()} entries in the layer's {H} heads after a decode step, "
                           f"above H_kv x (budget + slack) = {H * (s.budget + case.slack)}")


def _reference_after(s: Step) -> dict[str, torch.Tensor]:
    """What compaction must produce: a plain gather of every tensor, padding positions -1."""
    out = {name: _gather(t, s.gather) for name, t in s.before.items()}  # type: ignore[arg-type]  # set with idx
    if s.valid_after is not None:
        out["positions"] = out["positions"].masked_fill(~s.valid_after, -1)
    return out


def order(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """Kept entries keep their original order: strictly increasing indices and positions, and every
    side tensor compacted with the same indices."""
    ctx = LawContext("order", label or describe(policy), case)
    for s in drive(policy, case, ctx) or ():
        problem = order_problem(s.idx, s.real) if s.idx is not None else None  # type: ignore[arg-type]  # real: with idx
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
    decode-time eviction unless the policy declares `Needs(may_evict_newest=True)`."""
    ctx = LawContext("protection", label or describe(policy), case)
    prot = ctx.call("protected()", policy.protected)
    if (not isinstance(prot, tuple) or len(prot) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in prot)):
        raise ctx.fail(f"protected() returned {prot!r}; it must be a tuple (sinks, window) of ints >= 0")
    sinks, window = prot
    for s in drive(policy, case, ctx) or ():
        if s.idx is None:
            continue
        newest = s.phase == "decode" and not contract.declared(policy).may_evict_newest
        problem = protection_problem(s.idx, s.real, s.before["positions"], sinks, window, newest)  # type: ignore[arg-type]
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


def fresh_class(cls: type) -> type | None:
    """`cls` as a new copy of its module defines it, executed now: class attributes and the module's
    globals as they are at import, whatever this process ran before. None when the class cannot be
    found that way (defined inside a function, or a module without a source file)."""
    module = sys.modules.get(cls.__module__)
    path = getattr(module, "__file__", None)
    if module is None or not path or "<locals>" in cls.__qualname__:
        return None
    name = f"{cls.__module__}.__evictkit_fresh_copy__"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    copy = importlib.util.module_from_spec(spec)
    copy.__package__ = module.__package__  # relative imports resolve as in the original
    sys.modules[name] = copy  # only while it runs (dataclasses and typing look a class's module up)
    try:
        spec.loader.exec_module(copy)
    finally:
        sys.modules.pop(name, None)
    found: Any = copy
    for part in cls.__qualname__.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, Policy) else None


def independence(policy: Policy | type[Policy] | Subject, first: Case, second: Case, *,
                 label: str | None = None) -> None:
    """A sequence gives the same result whatever ran before it in this process: `second`, run after
    `first` on the same instance, equals `second` on a fresh instance of the class from a fresh copy
    of its module (so state on the instance, on the class or in the module's globals, a global
    calibrated by the first call included, shows up). Cheap and in-process; state held in other
    modules is left to the `fresh_process` law (thorough profile)."""
    subject = as_subject(policy)
    label = label or subject.label
    ctx = LawContext("independence", label, (first, second))
    used = subject.make()
    drive(used, first, ctx)
    after = drive(used, second, ctx)
    cls = fresh_class(subject.cls)
    fresh_subject = subject if cls is None else attrs.evolve(subject, cls=cls)
    fresh = drive(fresh_subject.make(), second, ctx)
    where = "a fresh instance" + ("" if cls is None else " of the class from a fresh copy of its module")
    if (after is None) != (fresh is None):
        raise ctx.fail(f"after a first sequence the policy refuses an input that {where} accepts, or the reverse")
    diff = compare_runs(after or [], fresh or [])
    if diff:
        raise ctx.fail(f"the second sequence, run after the first on the same instance, differs from the same "
                       f"sequence on {where}: {diff}. State carries from one sequence to the next: on the instance "
                       "(object.__setattr__, a mutable field), on the class or in a module global (a value calibrated "
                       "by the first call, a cache); keep per-sequence state in observe()'s side tensors or "
                       "obs.scratch, and compute constants from the parameters")


def _kept_positions(s: Step, b: int) -> list[list[int]]:
    """Per KV head, the true positions batch row `b` kept in step `s` (a ragged layer's padding width
    depends on the whole batch, so slots are not comparable between batches; positions are)."""
    kept, pos = s.kept()[b], s.before["positions"][b]
    return [pos[h][kept[h]].tolist() for h in range(kept.shape[0])]


def batch_rows(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """Batch rows are independent: identical rows keep identical sets, and a row keeps what it keeps
    alone, whatever the other rows of its batch hold (unpadded batches of at least two rows)."""
    B = max(case.batch, 2)
    same = attrs.evolve(case, batch=B, rows=(case.seed,) * B)
    ctx = LawContext("batch rows", label or describe(policy), same)
    fix = ("score and select each row from that row alone: no statistics, normalization or tie-breaks across the "
           "batch dimension, and no draws that depend on the row index")
    for s in drive(policy, same, ctx) or ():
        if s.idx is None:
            continue
        first = _kept_positions(s, 0)
        for r in range(1, B):
            other = _kept_positions(s, r)
            if other != first:
                h = next(h for h in range(len(first)) if first[h] != other[h])
                raise ctx.fail(f"{s.where}: batch rows 0 and {r} hold identical tokens but keep different positions "
                               f"(head {h}: {_row(torch.tensor(first[h]))} vs {_row(torch.tensor(other[h]))}); {fix}")
    mixed = attrs.evolve(case, batch=B, rows=tuple(case.seed + r for r in range(B)))
    alone = attrs.evolve(case, batch=1, rows=(case.seed,))  # row 0 of `mixed`, in a batch of one
    ctx = LawContext("batch rows", label or describe(policy), mixed)
    together, by_itself = drive(policy, mixed, ctx), drive(policy, alone, ctx)
    if (together is None) != (by_itself is None):
        raise ctx.fail("the policy refused the batch and accepted its row 0 alone, or the reverse")
    for s, a in zip(together or (), by_itself or ()):
        if (s.idx is None) != (a.idx is None):
            raise ctx.fail(f"{s.where}: the batch evicted and its row 0 alone did not, or the reverse")
        if s.idx is None:
            continue
        kept, ref = _kept_positions(s, 0), _kept_positions(a, 0)
        if kept != ref:
            h = next(h for h in range(len(kept)) if kept[h] != ref[h])
            raise ctx.fail(f"{s.where}: batch row 0 keeps positions {_row(torch.tensor(kept[h]))} in head {h}, but "
                           f"{_row(torch.tensor(ref[h]))} when it is run alone ({alone!r}): what a row keeps "
                           f"depends on the other rows of its batch; {fix}")


# --- process-global state: a sequence run after another one vs. the same sequence in a fresh process ----------

#: imported once by the process that forks the fresh ones, so each starts in milliseconds
_FRESH_PRELOAD = ["torch", "transformers.models.llama.modeling_llama", "evictkit.specs.driver"]
#: seconds one fresh-process drive may take
FRESH_TIMEOUT = 600.0


def _fresh_context() -> Any:
    """A multiprocessing context whose processes have run no policy code.

    forkserver (POSIX): a server process, started once, imports torch, transformers and the kit and
    forks one child per drive; it never calls a policy, so each child holds the policy module's
    globals as they are at import. spawn elsewhere (a new interpreter per drive: slower, as fresh).
    """
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_FRESH_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _drive_fresh(payload: bytes, out: str) -> None:
    """In the fresh process: unpickle (imports the policy's module here), drive, write the steps."""
    try:
        threads, cls, params, case, label = pickle.loads(payload)
        torch.set_num_threads(threads)  # the same reductions as the parent's, so results compare bit for bit
        result: tuple[str, Any] = ("ok", drive(Subject(cls, params).make(), case,
                                               LawContext("fresh process", label, case)))
    except BaseException as exc:  # reported by the parent, with the law's name
        result = ("error", f"{type(exc).__name__}: {exc}")
    with open(out, "wb") as f:
        pickle.dump(result, f)


def drive_in_fresh_process(subject: Subject, case: Case, label: str) -> list[Step] | None:
    """`drive(subject.make(), case)` in a new process that has run no policy code."""
    try:
        payload = pickle.dumps((torch.get_num_threads(), subject.cls, subject.params, case, label))
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ValueError(
            f"the fresh-process law runs {label} in a new Python process, which imports its class by module path: "
            f"{subject.cls.__module__}.{subject.cls.__qualname__} cannot be imported that way (define the class at "
            f"the top level of a module) and its parameters must pickle ({exc})") from exc
    with tempfile.TemporaryDirectory(prefix="evictkit-fresh-") as tmp:
        out = os.path.join(tmp, "steps.pkl")
        proc = _fresh_context().Process(target=_drive_fresh, args=(payload, out), daemon=True)
        proc.start()
        proc.join(FRESH_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()
            raise RuntimeError(f"the fresh-process drive of {label} took over {FRESH_TIMEOUT:.0f} s")
        if not os.path.exists(out):
            raise RuntimeError(f"the fresh process driving {label} exited with code {proc.exitcode} and no result")
        with open(out, "rb") as f:
            status, result = pickle.load(f)
    if status != "ok":
        raise LawViolation("fresh process", label, f"in a fresh process: {result}", case)
    return result


def fresh_process(policy: Policy | type[Policy] | Subject, first: Case, second: Case, *,
                  label: str | None = None) -> None:
    """A sequence run after another one in the same process gives what it gives when run first in a
    fresh process: no state at module level (a global, a class attribute, a cache) that a first
    call calibrates or later calls accumulate."""
    subject = as_subject(policy)
    label = label or subject.label
    ctx = LawContext("fresh process", label, (first, second))
    drive(subject.make(), first, ctx)
    after = drive(subject.make(), second, ctx)
    fresh = drive_in_fresh_process(subject, second, label)
    if (after is None) != (fresh is None):
        raise ctx.fail("after a first sequence the policy refuses an input that it accepts when it runs first in a "
                       "fresh process, or the reverse")
    diff = compare_runs(after or [], fresh or [])
    if diff:
        raise ctx.fail(f"the second sequence, run after the first in this process, differs from the same sequence run "
                       f"first in a fresh process, on a fresh instance both times: {diff}. State outside the instance "
                       "(a module-level global, a class attribute, a cache) carries from one sequence to the next; "
                       "keep per-sequence state in observe()'s side tensors or obs.scratch, and compute constants "
                       "from the parameters, not from the first call")


#: direct laws taking (policy, case)
DIRECT = {
    "budget": budget,
    "order": order,
    "protection": protection,
    "determinism": determinism,
    "noop": noop,
    "integrity": integrity,
    "batch_rows": batch_rows,
    "padding": padding,
}
