"""The driver of the conformance kit: `drive` runs a policy on one synthetic layer through the
core's own per-layer step (`evictkit.step.evict_step`, the one `evictkit.compress` calls) and
records every `Step`; the laws in checks.py read those steps. Its `Guard` reports every misuse
through `LawContext.fail`, and keeps pristine copies of what the policy is shown.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import attrs
import torch

from evictkit import ragged
from evictkit.contract import Policy, ScorePolicy, declared
from evictkit.observation import Observation
from evictkit.specs.cases import Case
from evictkit.specs.subject import LawContext, _Refused
from evictkit.specs.tiny import tiny_attention
from evictkit.step import Guard, LayerState, Selection, StepConfig, evict_step


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
        return kept_mask(self.idx, self.real, self.T)  # type: ignore[arg-type]  # set when the step evicted

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
    B, H, D, layer = case.batch, case.kv_heads, case.head_dim, case.layer
    module, rope = tiny_attention(case.heads, H, D, layer, case.dtype)
    data = case.data()
    needs = ctx.call("needs()", declared, policy)
    cfg = StepConfig(policy=policy, needs=needs, phases=tuple(policy.phases), slack=case.slack)
    st = LayerState(budget=layer_budgets(policy, case, ctx)[layer])
    true_pos = torch.arange(case.total).expand(B, case.total)

    keys = values = None
    steps: list[Step] = []
    for i, q in enumerate(case.chunks):
        span = slice(st.seen, st.seen + q)
        new_k, new_v = data.keys[:, :, span], data.values[:, :, span]
        keys = new_k if keys is None else torch.cat([keys, new_k], dim=2)
        values = new_v if values is None else torch.cat([values, new_v], dim=2)
        hidden, qpos = data.hidden[:, span], true_pos[:, span]
        guard = _KitGuard(policy, ctx, i, case.finite, scores)
        pad = st.pad
        result = evict_step(cfg, st, module=module, layer_idx=layer, n_layers=case.n_layers, keys=keys,
                            values=values, hidden_states=hidden, position_embeddings=rope(hidden, qpos),
                            position_ids=qpos, guard=guard)
        obs, sel = result.obs, result.selection
        guard.check_untouched(obs)
        before = guard.before
        step = Step(index=i, phase=result.phase, q=q, budget=st.budget, limit=result.limit, before=before,
                    after=before, valid_after=ragged.valid_mask(pad, obs.length), scores=guard.scores)
        keys, values = result.keys, result.values
        if sel is not None:
            K = sel.gather.shape[-1]
            real = (torch.ones_like(sel.gather, dtype=torch.bool) if sel.counts is None
                    else torch.arange(K, device=sel.gather.device) >= (K - sel.counts)[..., None])
            step.idx, step.counts, step.real, step.gather = sel.idx, sel.counts, real, sel.gather
            step.valid_after = ragged.valid_mask(st.pad, K)
            step.after = {"keys": keys, "values": values, "positions": cast(torch.Tensor, st.positions),
                          **{f"state[{n}]": t for n, t in st.state.items()}}
        steps.append(step)
    return steps


class _KitGuard(Guard):
    """The core's step, with every policy mistake reported as a violation of the running law.

    It keeps pristine copies of what the policy is shown, so that a policy writing into the
    cache or its side tensors is caught even when the written tensor is the one compared.
    """

    def __init__(self, policy: Policy, ctx: LawContext, index: int, finite: bool, scores: bool) -> None:
        self.policy, self.ctx, self.index, self.finite, self.want_scores = policy, ctx, index, finite, scores
        self.before: dict[str, torch.Tensor] = {}
        self.shown: dict[str, torch.Tensor] = {}
        self.scores: torch.Tensor | None = None

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        # ValueError is the right answer to NaN/inf input
        return self.ctx.call(f"{what} at step {self.index}", fn, *args, value_error_ok=not self.finite)

    def before_observe(self, obs: Observation) -> None:
        self.shown = {"keys": obs.keys, "values": obs.values, "positions": obs.positions,
                      **{f"state[{n}]": t for n, t in obs.state.items()}}
        self.before = {name: t.clone() for name, t in self.shown.items()}

    def side_tensor(self, policy: Policy, name: str, t: object, shape: tuple[int, int, int]) -> torch.Tensor:
        i = self.index
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or tuple(t.shape[:3]) != shape:
            raise self.ctx.fail(f"observe() at step {i} returned {name!r} with shape "
                                f"{tuple(getattr(t, 'shape', ()))}; side tensors must be [B, H_kv, T] or "
                                f"[B, H_kv, T, E] with [B, H_kv, T] = {shape}")
        if self.finite and t.is_floating_point() and bool(torch.isnan(t).any()):
            raise self.ctx.fail(f"observe() at step {i} returned NaN in side tensor {name!r} on finite inputs")
        self.shown[f"state[{name}]"] = t
        self.before[f"state[{name}]"] = t.clone()
        return t

    def before_select(self, obs: Observation) -> None:
        if self.want_scores and isinstance(self.policy, ScorePolicy):
            self.scores = _checked_scores(self.policy, obs, self.ctx, self.index, tuple(obs.positions.shape),
                                          self.finite)

    def selection(self, policy: Policy, sel: object, st: LayerState, shape: tuple[int, int, int],
                  attn_impl: str | None) -> Selection:
        return _indexable(sel, st.pad, *shape, self.ctx, self.index)

    def check_untouched(self, obs: Observation) -> None:
        """Everything the policy was shown must be as it was: the core's tensors are read-only."""
        for name, t in self.shown.items():
            if not bit_equal(t, self.before[name]):
                raise self.ctx.fail(
                    f"step {self.index}: the policy modified {name} in place (in observe(), score() or select()); "
                    "an Observation's tensors are read-only: compute on copies and return new side tensors")


def _checked_scores(
    policy: ScorePolicy, obs: Observation, ctx: LawContext, i: int, shape, finite: bool
) -> torch.Tensor:
    s = ctx.call(f"score() at step {i}", policy.score, obs, value_error_ok=not finite)
    if not isinstance(s, torch.Tensor) or tuple(s.shape) != shape or not s.is_floating_point():
        raise ctx.fail(f"score() at step {i} returned {type(s).__name__} {tuple(getattr(s, 'shape', ()))} "
                       f"{getattr(s, 'dtype', '')}; it must be float32 [B, H_kv, T] = {shape}")
    if s.dtype != torch.float32:
        # select_topk compares in fp32, but a bf16/fp16 score has already rounded distinct values to
        # ties (which flips the top-k); fp64 is refused too, so that every policy states one dtype
        raise ctx.fail(f"score() at step {i} returned {s.dtype} scores on a {obs.keys.dtype} cache; scores must "
                       "be float32: compute them in fp32 (e.g. `obs.keys.float()`) or return `scores.float()`")
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


def _indexable(selection: object, pad: torch.Tensor | None, B: int, H: int, T: int, ctx: LawContext,
               i: int) -> Selection:
    """Just enough to compact with a selection; every law checks the rest itself."""
    counts = None
    if isinstance(selection, tuple):
        if len(selection) != 2:
            raise ctx.fail(f"select() at step {i} returned a tuple of {len(selection)}; a ragged selection is "
                           "(idx, counts)")
        selection, counts = selection
    idx = selection
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64:
        raise ctx.fail(f"select() at step {i} returned {type(idx).__name__} "
                       f"{getattr(idx, 'dtype', '')}; it must return an int64 tensor [B, H_kv, K] "
                       "(convert with `.long()`)")
    if idx.dim() != 3 or tuple(idx.shape[:2]) != (B, H):
        raise ctx.fail(f"select() at step {i} returned shape {tuple(idx.shape)}; expected [B, H_kv, K] with "
                       f"B, H_kv = {B}, {H}")
    idx = idx.long()
    K = idx.shape[-1]
    new_pad = None
    if counts is None:
        real = torch.ones_like(idx, dtype=torch.bool)
    else:
        if (not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64
                or tuple(counts.shape) != (B, H)):
            raise ctx.fail(f"select() at step {i} returned counts {type(counts).__name__} "
                           f"{tuple(getattr(counts, 'shape', ()))} {getattr(counts, 'dtype', '')}; a ragged "
                           "selection needs int64 counts [B, H_kv] (convert with `.long()`)")
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
    return Selection(idx, torch.where(real, idx, 0), counts, new_pad)


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, device and values (NaN equal to NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def kept_mask(idx: torch.Tensor, real: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H_kv, T] bool: the slots a selection keeps (`real` marks its non-padding columns)."""
    mask = torch.zeros(*idx.shape[:2], T + 1, dtype=torch.bool)
    cols = torch.where(real, idx.long(), T).cpu()  # padding columns land in a spare slot
    return mask.scatter_(-1, cols, True)[..., :T]
