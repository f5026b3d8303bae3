"""The driver of the conformance kit: `drive` runs a policy on one synthetic layer exactly the
way `evictkit.compress` does (observe every forward, select when over budget, compact K, V,
positions and side tensors with the same indices) and records every `Step`; the laws in
checks.py read those steps. Every misuse it meets is raised through `LawContext.fail`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from evictkit.kernels import compact_many
from evictkit.observation import Observation
from evictkit.policy import Policy, ScorePolicy
from evictkit.specs.cases import Case
from evictkit.specs.subject import LawContext, _Refused
from evictkit.specs.tiny import tiny_attention


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


def kept_mask(idx: torch.Tensor, real: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H_kv, T] bool: the slots a selection keeps (`real` marks its non-padding columns)."""
    mask = torch.zeros(*idx.shape[:2], T + 1, dtype=torch.bool)
    cols = torch.where(real, idx.long(), T).cpu()  # padding columns land in a spare slot
    return mask.scatter_(-1, cols, True)[..., :T]
