"""The laws end to end: `evictkit.compress` and `generate()` on tiny random models.

A recording wrapper sees every `observe` and `select` the core makes, so the budget, order and
protection laws are checked on what really happened inside the hooks, and the run's stats are
checked against the budgets. The generation and reset laws compare token ids with a reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from evictkit.budget import resolve_budget
from evictkit.contract import Policy, declared
from evictkit.hf import cache_arg, cache_of, new_cache
from evictkit.specs.cases import ModelCase, left_padded
from evictkit.specs.checks import _first_bad_row, _gather, _row, budget_problem, order_problem, protection_problem
from evictkit.specs.subject import LawContext, LawViolation, describe, min_valid_budget


class _Recorder(Policy):
    """Delegates to `inner` and logs what the core asked and got (a test harness, not a policy)."""

    inner: Policy
    log: list[dict[str, Any]]

    def __init__(self, inner: Policy, log: list[dict[str, Any]]) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "log", log)

    def __repr__(self) -> str:
        return repr(self.inner)

    def needs(self):
        return declared(self.inner)  # with a legacy subclass's old declarations folded in

    def protected(self):
        return self.inner.protected()

    def check_budget(self, budget):
        return self.inner.check_budget(budget)

    def layer_budget(self, budget, layer_idx, n_layers, length):
        return self.inner.layer_budget(budget, layer_idx, n_layers, length)

    def observe(self, obs):
        H, T = obs.n_kv_heads, obs.length
        entries = H * T if obs.valid is None else int(obs.valid.sum((1, 2)).max())
        self.log.append({"op": "observe", "layer": obs.layer_idx, "phase": obs.phase, "T": T, "q": obs.q_len,
                         "entries": entries, "positions": obs.positions.clone()})
        return self.inner.observe(obs)

    def select(self, obs, budget):
        selection = self.inner.select(obs, budget)
        self.log.append({"op": "select", "layer": obs.layer_idx, "phase": obs.phase, "T": obs.length,
                         "budget": budget, "positions": obs.positions.clone(), "selection": selection})
        return selection

    def layer_signal(self, obs):
        return self.inner.layer_signal(obs)

    def allocate(self, signals, totals, available):
        return self.inner.allocate(signals, totals, available)


def recording(policy: Policy, log: list[dict[str, Any]]) -> Policy:
    """`policy` wrapped so that `log` receives every observe/select call of a compress run."""
    cls = type(f"Recorded_{type(policy).__name__}", (_Recorder,), {
        "name": policy.name, "phases": tuple(policy.phases),
    })
    return cls(policy, log)


def _generate(model, ids: torch.Tensor, new: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)


def _generate_logits(model, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens [B, prompt + new] and the logits of every step [new, B, V] (a leak that does
    not flip a greedy token still shows in the logits)."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences, torch.stack(out.logits)


def _parts(selection: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(idx, counts, real) of a logged selection; None when it is not even shaped like one."""
    counts = None
    if isinstance(selection, tuple) and len(selection) == 2:
        selection, counts = selection
    if not isinstance(selection, torch.Tensor) or selection.dim() != 3:
        return None
    idx = selection.long()
    if counts is None:
        return idx, None, torch.ones_like(idx, dtype=torch.bool)
    if not isinstance(counts, torch.Tensor) or tuple(counts.shape) != tuple(idx.shape[:2]):
        return None
    counts = counts.long().to(idx.device)
    return idx, counts, torch.arange(idx.shape[-1], device=idx.device) >= (idx.shape[-1] - counts)[..., None]


def _check_log(
    policy: Policy, log: list[dict[str, Any]], case: ModelCase, ctx_for: Callable[[str], LawContext]
) -> None:
    sinks, window = policy.protected()
    last_select: dict[int, torch.Tensor] = {}  # layer -> expected positions (-1 where not real)
    for i, e in enumerate(log):
        where = f"call {i} ({e['phase']}, layer {e['layer']}, {e['T']} slots)"
        pos = e["positions"]
        real_pos = pos >= 0  # padding of a ragged layer is marked -1
        if pos.shape[-1] > 1 and bool(((pos[..., 1:] <= pos[..., :-1]) & real_pos[..., :-1]).any()):
            b, h = _first_bad_row((pos[..., 1:] <= pos[..., :-1]) & real_pos[..., :-1])
            raise ctx_for("order").fail(
                f"{where}: cached positions out of order (batch {b}, head {h}): {_row(pos[b, h])}")
        if e["op"] == "observe":
            expected = last_select.pop(e["layer"], None)
            if expected is not None and e["phase"] == "decode":
                k = expected.shape[-1]
                if pos.shape[-1] < k or not torch.equal(pos[..., :k], expected):
                    raise ctx_for("order").fail(f"{where}: the cache does not hold the kept entries of the last "
                                                "eviction in their original order")
            continue
        parts = _parts(e["selection"])
        if parts is None:
            raise ctx_for("integrity").fail(f"{where}: select() returned {e['selection']!r}")
        idx, counts, real = parts
        T = e["T"]
        kept = idx[real]
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= T):
            raise ctx_for("integrity").fail(f"{where}: select() returned indices outside [0, {T})")
        problem = budget_problem(idx, counts, real, T, e["budget"], declared(policy).exact_budget)
        if problem:
            raise ctx_for("budget").fail(f"{where}: {problem}")
        problem = order_problem(idx, real)
        if problem:
            raise ctx_for("order").fail(f"{where}: {problem}")
        newest = e["phase"] == "decode" and not declared(policy).may_evict_newest
        problem = protection_problem(idx, real, pos, sinks, window, newest)
        if problem:
            raise ctx_for("protection").fail(f"{where}: {problem}")
        last_select[e["layer"]] = _gather(pos, torch.where(real, idx, 0)).masked_fill(~real, -1)


def _check_sizes(policy: Policy, log: list[dict[str, Any]], run, case: ModelCase, ctx: LawContext) -> None:
    """Real entries (summed over KV heads) after each forward: H_kv x min(prompt, budget) after
    prefill for prefill policies (at most that with `Needs(exact_budget=False)`), at most H_kv x (budget +
    slack) after each decode forward for decode policies; the reported stats agree."""
    phases = tuple(policy.phases)
    after: dict[int, list[tuple[str, int]]] = {}  # layer -> [(phase, real entries after the forward)]
    for e in log:
        if e["op"] == "observe":
            after.setdefault(e["layer"], []).append((e["phase"], e["entries"]))
        else:
            idx, counts, real = _parts(e["selection"])  # type: ignore[misc]  # _check_log checked its shape
            after[e["layer"]][-1] = (e["phase"], int(real.sum((1, 2)).max()))
    H = case.kv_heads
    for s in run.stats.layers:
        b = s.budget
        seq = after.get(s.layer, [])
        if not seq:
            continue
        if "prefill" in phases:
            got, want = seq[0][1], H * min(s.prompt_length, b)
            exact = declared(policy).exact_budget
            if got != want if exact else got > want:
                raise ctx.fail(f"layer {s.layer}: {got} entries in {H} KV heads after prefill, expected "
                               f"{'' if exact else 'at most '}H_kv x min(prompt {s.prompt_length}, "
                               f"layer budget {b}) = {want}")
        if "decode" in phases:
            for k, (phase, got) in enumerate(seq):
                if phase == "decode" and got > H * (b + case.slack):
                    raise ctx.fail(f"layer {s.layer}: {got} entries in {H} KV heads after decode forward {k}, above "
                                   f"H_kv x (budget + slack) = {H * (b + case.slack)}")
        reported = getattr(s, "entries", None)
        if reported is not None and reported != seq[-1][1]:
            raise ctx.fail(f"layer {s.layer}: stats report {reported} entries, the cache holds {seq[-1][1]}")


def compress_run(make: Callable[[], Policy], case: ModelCase, *, label: str | None = None) -> None:
    """Budget, order and protection hold inside evictkit.compress during generate()."""
    import evictkit

    policy = make()
    label = label or describe(policy)

    def ctx_for(law: str) -> LawContext:
        return LawContext(f"{law} (through evictkit.compress)", label, case)

    log: list[dict[str, Any]]
    model, ids, log = case.model(), case.ids(), []
    try:
        with evictkit.compress(model, recording(policy, log), budget=case.budget, slack=case.slack) as run:
            out = _generate(model, ids, case.new)
    except Exception as exc:
        _check_log(policy, log, case, ctx_for)  # a specific law first, if one explains the failure
        raise ctx_for("integrity").fail(
            f"generate() under evictkit.compress raised {type(exc).__name__}: {exc}") from exc
    _check_log(policy, log, case, ctx_for)
    _check_sizes(policy, log, run, case, ctx_for("budget"))
    if tuple(out.shape) != (case.batch, case.prompt + case.new):
        raise ctx_for("integrity").fail(f"generate() returned shape {tuple(out.shape)}")


def generation(make: Callable[[], Policy], case: ModelCase, *, label: str | None = None) -> None:
    """With budget >= length, generate() equals the full cache token for token, and the prefill
    cache and logits are bit-identical."""
    import evictkit

    policy = make()
    ctx = LawContext("generation", label or describe(policy), case)
    if not isinstance(case.budget, int) or case.budget < case.prompt + case.new:
        raise ValueError(f"the generation law needs an int budget >= prompt + new, got {case.budget}")
    model, ids = case.model(), case.ids()
    full, full_logits = _generate_logits(model, ids, case.new)
    try:
        with evictkit.compress(model, policy, budget=case.budget, slack=case.slack):
            got, got_logits = _generate_logits(model, ids, case.new)
    except Exception as exc:
        raise ctx.fail(f"generate() under evictkit.compress raised {type(exc).__name__}: {exc}") from exc
    if not torch.equal(got, full):
        b, t = (int(v) for v in (got != full).nonzero()[0])
        raise ctx.fail(f"with budget {case.budget} >= length {case.prompt + case.new} the generated tokens differ "
                       f"from the full cache at batch {b}, position {t} (token {int(got[b, t])} vs {int(full[b, t])})")
    if not torch.equal(got_logits, full_logits):
        step = int((got_logits != full_logits).flatten(1).any(-1).nonzero()[0])
        raise ctx.fail(f"with budget {case.budget} >= length {case.prompt + case.new} the logits of generated token "
                       f"{step} differ from the full cache")
    with torch.no_grad():
        ref = model(ids, use_cache=True)
        with evictkit.compress(model, make(), budget=case.budget, slack=case.slack):
            out = model(ids, use_cache=True)
    if not torch.equal(out.logits, ref.logits):
        raise ctx.fail("prefill logits under evictkit.compress differ from the full cache")
    for li, (a, b) in enumerate(zip(cache_of(out).layers, cache_of(ref).layers)):
        if not (torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)):
            raise ctx.fail(f"layer {li}: the cache after prefill is not bit-identical to the full cache "
                           f"({tuple(a.keys.shape)} vs {tuple(b.keys.shape)})")


def sequences(make: Callable[[], Policy], case: ModelCase, *, label: str | None = None) -> None:
    """Reset end to end: a second sequence in the same compress context, through the same policy
    instance, generates what it generates in a fresh context with a fresh instance."""
    import evictkit

    policy = make()
    ctx = LawContext("reset (through evictkit.compress)", label or describe(policy), case)
    model = case.model()
    first, second = case.ids(), case.ids(case.prompt_b, seed_offset=1)
    try:
        with evictkit.compress(model, policy, budget=case.budget, slack=case.slack):
            _generate(model, first, case.new)
            again, again_logits = _generate_logits(model, second, case.new)
        with evictkit.compress(model, make(), budget=case.budget, slack=case.slack):
            fresh, fresh_logits = _generate_logits(model, second, case.new)
    except Exception as exc:
        raise ctx.fail(f"generate() under evictkit.compress raised {type(exc).__name__}: {exc}") from exc
    if not (torch.equal(again, fresh) and torch.equal(again_logits, fresh_logits)):
        step = (int((again_logits != fresh_logits).flatten(1).any(-1).nonzero()[0])
                if again_logits.shape == fresh_logits.shape else 0)
        raise ctx.fail(f"the second sequence generates differently after a first one (state leaked); the logits "
                       f"first differ at generated token {step}")


def batched(make: Callable[[], Policy], case: ModelCase, *, label: str | None = None) -> None:
    """The batch law: a left-padded batch of two prompts of different lengths gives each row what
    its prompt gives alone (kept positions, greedy tokens, logits within 1e-4 in fp32), in one
    forward and in prefill chunks; and so do questions of different lengths after them, padded
    among a forward's new tokens (as a prefill chunk and under `as_decode()`)."""
    import evictkit

    ctx = LawContext("batch (through evictkit.compress)", label or describe(make()), case)
    if case.dtype != "float32" or not case.prompt_b:
        return  # padding changes reduced-precision rounding; the law is stated in fp32
    model = case.model()
    prompts = [case.ids(case.prompt, seed_offset=0)[0], case.ids(case.prompt_b, seed_offset=1)[0]]
    width = max(len(p) for p in prompts)
    ids, mask = left_padded(prompts)

    def run(x: torch.Tensor, m: torch.Tensor, chunk: int | None):
        with evictkit.compress(model, make(), budget=case.budget, slack=case.slack, prefill_chunk=chunk) as c:
            out = model.generate(x, attention_mask=m, max_new_tokens=case.new, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
            kept = c.kept_positions()
        return out, kept

    for chunk in (None, max(1, min(len(p) for p in prompts) // 2)):
        try:
            out, kept = run(ids, mask, chunk)
        except Exception as exc:
            raise ctx.fail(f"generate() on a left-padded batch raised {type(exc).__name__}: {exc}") from exc
        for i, p in enumerate(prompts):
            alone, kept_alone = run(p[None], torch.ones(1, len(p), dtype=torch.long), chunk)
            how = f"row {i} ({len(p)} tokens, chunk {chunk})"
            if not torch.equal(out.sequences[i, width:], alone.sequences[0, len(p):]):
                raise ctx.fail(f"{how} generates differently in the batch than alone")
            for li, pos in kept.items():
                got = [h[h >= 0].tolist() for h in pos[i]]
                want = [h[h >= 0].tolist() for h in kept_alone[li][0]]
                if got != want:
                    raise ctx.fail(f"{how}, layer {li}: keeps {got} in the batch, {want} alone")
            for step, (b, a) in enumerate(zip(out.scores, alone.scores)):
                err = float((b[i] - a[0]).abs().max())
                if err > 1e-4:
                    raise ctx.fail(f"{how}: the logits of generated token {step} differ by {err:.2e} (> 1e-4)")
    _questions(make, case, ctx, prompts)


def _questions(make: Callable[[], Policy], case: ModelCase, ctx: LawContext, contexts: list[torch.Tensor]) -> None:
    """Interior padding: after the contexts, questions of different lengths arrive in one forward,
    each row's left-padded among the new tokens, then greedy steps; each row matches itself alone."""
    import evictkit

    model = case.model()
    g = torch.Generator().manual_seed(case.seed + 7)
    questions = [torch.randint(3, 128, (n,), generator=g) for n in (3, 1)]

    def run(ctxs: list[torch.Tensor], qs: list[torch.Tensor], as_decode: bool):
        ids, mask = left_padded(ctxs)
        q_ids, q_mask = left_padded(qs)
        with torch.no_grad(), evictkit.compress(model, make(), budget=case.budget, slack=case.slack) as c:
            cache = new_cache(model)
            model(ids, attention_mask=mask, **cache_arg(model, cache))
            mask = torch.cat([mask, q_mask], dim=1)
            with c.as_decode() if as_decode else contextlib.nullcontext():
                logits = model(q_ids, attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
            seen = [logits]
            for _ in range(max(1, case.new - 1)):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logits = model(logits.argmax(-1)[:, None], attention_mask=mask, **cache_arg(model, cache)).logits[:, -1]
                seen.append(logits)
            return torch.stack(seen, 1), c.kept_positions()

    for as_decode in (False, True):
        try:
            logits, kept = run(contexts, questions, as_decode)
        except Exception as exc:
            raise ctx.fail(f"questions of different lengths in one forward raised {type(exc).__name__}: {exc}") from exc
        for i, (c, q) in enumerate(zip(contexts, questions)):
            alone, kept_alone = run([c], [q], as_decode)
            how = f"row {i} ({len(c)}-token context, {len(q)}-token question{', as_decode' if as_decode else ''})"
            for li, pos in kept.items():
                got = [h[h >= 0].tolist() for h in pos[i]]
                want = [h[h >= 0].tolist() for h in kept_alone[li][0]]
                if got != want:
                    raise ctx.fail(f"{how}, layer {li}: keeps {got} in the batch, {want} alone")
            err = float((logits[i] - alone[0]).abs().max())
            if err > 1e-4:
                raise ctx.fail(f"{how}: the logits differ by {err:.2e} (> 1e-4) from the row alone")



def chunked(make: Callable[[], Policy], case: ModelCase, *, label: str | None = None) -> None:
    """Chunked prefill: a chunk as long as the prompt is the one-shot prefill (same tokens, same
    kept positions); in smaller chunks every layer holds <= its budget after every chunk, with the
    true positions; with a budget above the whole sequence, generation equals the full cache
    whatever the chunk (in fp32: reduced precision rounds chunked forwards differently)."""
    import evictkit

    ctx = LawContext("chunked prefill (through evictkit.compress)", label or describe(make()), case)
    model, ids = case.model(), case.ids()

    def run(budget: int | float, chunk: int | None) -> tuple[torch.Tensor, dict[int, torch.Tensor], Any]:
        try:
            with evictkit.compress(model, make(), budget=budget, slack=case.slack, prefill_chunk=chunk) as c:
                out = _generate(model, ids, case.new)
                return out, c.kept_positions(), c
        except Exception as exc:
            raise ctx.fail(f"generate() with prefill_chunk={chunk} raised {type(exc).__name__}: {exc}") from exc

    one_shot, kept, _ = run(case.budget, None)
    whole, kept_whole, _ = run(case.budget, case.prompt)
    if not torch.equal(one_shot, whole) or any(not torch.equal(kept[li], kept_whole[li]) for li in kept):
        raise ctx.fail(f"prefill_chunk={case.prompt} (the whole prompt) differs from the one-shot prefill")
    chunk = max(2, case.prompt // 3)  # a one-token forward is a decode step, not a chunk
    bounds = [0, *range(case.prompt % chunk or chunk, case.prompt + 1, chunk)]  # cut from the end, as evictkit
    if isinstance(case.budget, float) or "prefill" not in make().phases:
        bounds = []  # a fraction of a prompt that arrives in pieces is refused, by design; no prefill: no bound
    cache = None
    try:
        with evictkit.compress(model, make(), budget=case.budget, slack=case.slack) as c:
            for start, seen in zip(bounds[:-1], bounds[1:]):
                out = model(ids[:, start:seen], use_cache=True, **(cache_arg(model, cache) if cache else {}))
                cache = cache_of(out)
                for s in c.stats.layers:
                    H = case.kv_heads
                    if s.entries > H * min(seen, s.budget):
                        raise ctx.fail(f"layer {s.layer}: {s.entries} entries in {H} KV heads after the chunk "
                                       f"ending at token {seen}, above H_kv x min(seen, budget) = "
                                       f"{H * min(seen, s.budget)}")
                for li, pos in c.kept_positions().items():
                    real = pos[pos >= 0]
                    if real.numel() and (int(real.max()) >= seen or int(real.min()) < 0):
                        raise ctx.fail(f"layer {li}: kept positions {real.unique().tolist()} are not positions of "
                                       f"the {seen} tokens seen")
    except LawViolation:
        raise
    except Exception as exc:
        raise ctx.fail(f"a loop of {chunk}-token forwards raised {type(exc).__name__}: {exc}") from exc
    roomy = max(case.prompt + case.new + 1, case.budget if isinstance(case.budget, int) else 0,
                min_valid_budget(make(), ctx.label))
    if case.dtype != "float32":
        return  # chunked and one-shot forwards round differently in reduced precision: stated in fp32
    full = _generate(model, ids, case.new)
    for c_len in (1, chunk):
        got, _, _ = run(roomy, c_len)
        if not torch.equal(got, full):
            raise ctx.fail(f"with budget {roomy} >= length and prefill_chunk={c_len} the tokens differ from the full "
                           "cache")


def invalid_budgets(make: Callable[[], Policy], *, label: str | None = None) -> None:
    """Budgets the policy cannot work with, and malformed budgets, raise ValueError before any
    forward runs; the smallest valid budget is accepted."""
    import evictkit
    from evictkit.specs.tiny import cached_tiny_model

    policy = make()
    ctx = LawContext("invalid budget", label or describe(policy), None)
    lo = min_valid_budget(policy, ctx.label)
    model = cached_tiny_model("llama", 1, 2, 1, 8, "float32")
    too_small = sorted({1, lo // 2, lo - 1} & set(range(1, lo)))
    for bad in [*too_small, 0, -3, 1.5, 0.0, True, "8", None]:
        try:
            evictkit.compress(model, make(), budget=bad)  # type: ignore[arg-type]  # invalid on purpose
        except ValueError:
            continue
        except Exception as exc:
            raise ctx.fail(f"compress(budget={bad!r}) raised {type(exc).__name__}, not ValueError: {exc}") from exc
        raise ctx.fail(f"compress(budget={bad!r}) was accepted; the smallest budget check_budget accepts is {lo}")
    try:
        with evictkit.compress(model, make(), budget=lo):
            pass
    except Exception as exc:
        raise ctx.fail(
            f"compress(budget={lo}) raised {type(exc).__name__} although check_budget({lo}) passes: {exc}") from exc


def resolved(case: ModelCase) -> list[int]:
    """The integer budgets a case's budget means for its prompt(s)."""
    lengths = [case.prompt] + ([case.prompt_b] if case.prompt_b else [])
    return [resolve_budget(case.budget, n) for n in lengths]
