"""The padding law at the direct level: a row of a padded batch, stepped as one (evictkit.padded),
scores and keeps what the same row scores and keeps alone.

The end-to-end batch law (specs/endtoend.py) runs a tiny model, whose attention is nearly
uniform: a scorer that lets padding leak into its scores can still keep the same positions
there. This law drives one synthetic layer with junk padding of large magnitude, and compares
the scores themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import attrs
import torch

from evictkit import padded
from evictkit.contract import Policy, ScorePolicy, declared
from evictkit.observation import Observation
from evictkit.specs.cases import Case
from evictkit.specs.driver import layer_budgets
from evictkit.specs.subject import LawContext, describe
from evictkit.specs.tiny import tiny_attention
from evictkit.step import Guard, LayerState, StepConfig, evict_step

#: leading padding of the padded row's first forward, and interior padding of a later one
LEAD, INTERIOR = 3, 2
#: scores of the padded row's real entries must match the row alone within this (fp32)
RTOL, ATOL = 1e-4, 1e-5


class _ScoreGuard(Guard):
    """The core's checks; records a ScorePolicy's scores right before each select()."""

    def __init__(self, policy: Policy, ctx: LawContext, where: str) -> None:
        self.policy, self.ctx, self.where = policy, ctx, where
        self.scores: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # the layer's true positions the scores are of

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        return self.ctx.call(f"{what} at {self.where}", fn, *args)

    def before_select(self, obs: Observation) -> None:
        if isinstance(self.policy, ScorePolicy):
            self.scores = self.ctx.call(f"score() at {self.where}", self.policy.score, obs).float()
            self.positions = obs.positions.clone()


def _junk(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Padding's keys, values or hidden states: large, so that any leak shows."""
    return torch.randn(*shape, generator=g) * 30


def _real(positions: torch.Tensor) -> list[list[int]]:
    """Per KV head, the real (>= 0) true positions of one row [H_kv, T]."""
    return [h[h >= 0].tolist() for h in positions]


def padding(policy: Policy, case: Case, *, label: str | None = None) -> None:
    """A policy that declares `Needs(padding=True)` treats a padded row as the row alone: a row with
    junk padding first (and padding among its new tokens at a later forward), stepped as one beside
    a longer row, keeps the same true positions after every forward, and its real entries' scores
    (a ScorePolicy's) equal the row's alone within rtol 1e-4 (fp32); kept sets may differ only by
    swaps between entries whose scores tie within that tolerance."""
    one = attrs.evolve(case, batch=1, rows=(), style="random", dtype="float32")
    ctx = LawContext("padding", label or describe(policy), one)
    needs = ctx.call("needs()", declared, policy)
    if not needs.padding or needs.positions == "shift":
        return  # row by row (or refused), nothing of the padded step to check
    chunks = list(one.chunks)
    # interior padding at the first forward after the prompt's first one (a continuation or chunk)
    inner = 1 if len(chunks) > 1 else None
    pads = [LEAD if i == 0 else INTERIOR if i == inner else 0 for i in range(len(chunks))]
    other = attrs.evolve(one, seed=one.seed + 1, prompt=one.total + sum(pads), decode=())
    mine, theirs = one.data(), other.data()
    module, rope = tiny_attention(one.heads, one.kv_heads, one.head_dim, one.layer, "float32")
    config: Any = module.config  # this synthetic layer's own config: ragged selections need masks
    config._attn_implementation = "sdpa"
    cfg = StepConfig(policy=policy, needs=needs, phases=tuple(policy.phases), slack=one.slack)
    budgets = [layer_budgets(policy, one, ctx)[one.layer],
               layer_budgets(policy, attrs.evolve(one, prompt=one.prompt + LEAD), ctx)[one.layer]]
    g = torch.Generator().manual_seed(one.seed + 7)
    H, D, C = one.kv_heads, one.head_dim, one.heads * one.head_dim

    alone, batch = LayerState(budget=budgets[0]), LayerState(budget=0)
    a_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    b_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    mine_at = theirs_at = 0
    for i, (q, p) in enumerate(zip(chunks, pads)):
        where = f"forward {i} ({q} tokens{f', {p} padding before them in the batch' if p else ''})"
        span = slice(mine_at, mine_at + q)
        qpos = torch.arange(mine_at, mine_at + q)[None]
        k, v, h = mine.keys[:, :, span], mine.values[:, :, span], mine.hidden[:, span]
        a_guard = _ScoreGuard(policy, ctx, where + ", the row alone")
        a_keys = k if a_kv is None else torch.cat([a_kv[0], k], dim=2)
        a_vals = v if a_kv is None else torch.cat([a_kv[1], v], dim=2)
        res = evict_step(cfg, alone, module=module, layer_idx=one.layer, n_layers=one.n_layers, keys=a_keys,
                         values=a_vals, hidden_states=h, position_embeddings=rope(h, qpos), position_ids=qpos,
                         guard=a_guard)
        a_kv = (res.keys, res.values)

        w = q + p  # the other row fills the forward with real tokens
        t_span = slice(theirs_at, theirs_at + w)
        new_k = torch.cat([torch.cat([_junk(g, 1, H, p, D), k], dim=2), theirs.keys[:, :, t_span]])
        new_v = torch.cat([torch.cat([_junk(g, 1, H, p, D), v], dim=2), theirs.values[:, :, t_span]])
        hid = torch.cat([torch.cat([_junk(g, 1, p, C), h], dim=1), theirs.hidden[:, t_span]])
        pos = torch.cat([torch.cat([torch.zeros(1, p, dtype=torch.long), qpos], dim=1),
                         torch.arange(theirs_at, theirs_at + w)[None]])
        b_guard = _ScoreGuard(policy, ctx, where + ", in the padded batch")
        b_keys = new_k if b_kv is None else torch.cat([b_kv[0], new_k], dim=2)
        b_vals = new_v if b_kv is None else torch.cat([b_kv[1], new_v], dim=2)
        try:
            out = padded.padded_step(
                cfg, batch, module=module, layer_idx=one.layer, n_layers=one.n_layers, keys=b_keys, values=b_vals,
                hidden_states=hid, position_embeddings=rope(hid, pos), position_ids=pos,
                new_pad=torch.tensor([p, 0]), row_budget=lambda b, _n: budgets[b], guard=b_guard)
        except (ValueError, TypeError) as exc:  # the core's checks of what the policy returned
            raise ctx.fail(f"{where}, in the padded batch: {exc}") from exc
        b_kv = (out[0], out[1])
        mine_at, theirs_at = mine_at + q, theirs_at + w

        _compare(ctx, where, alone, batch, a_guard, b_guard, res.selection is not None)


def _compare(ctx: LawContext, where: str, alone: LayerState, batch: LayerState, a: _ScoreGuard, b: _ScoreGuard,
             evicted: bool) -> None:
    """Row 0 of the batch against the row alone after one forward: scores of real entries, kept positions."""
    a_pos, b_pos = cast(torch.Tensor, alone.positions)[0], cast(torch.Tensor, batch.positions)[0]
    score_of: list[dict[int, float]] | None = None
    if evicted and a.scores is not None and b.scores is not None and b.positions is not None:
        a_s, b_s = a.scores[0], b.scores[0]  # [H, T]: the layer before compaction, alone and in the batch
        a_p, b_p = cast(torch.Tensor, a.positions)[0], b.positions[0]
        for h in range(a_s.shape[0]):
            # the row's real entries, in order, in both (alone, a ragged selection pads heads too)
            mine, ref, at = b_s[h][b_p[h] >= 0], a_s[h][a_p[h] >= 0], a_p[h][a_p[h] >= 0]
            if mine.shape != ref.shape or not torch.allclose(mine, ref, rtol=RTOL, atol=ATOL):
                j = int((mine - ref).abs().argmax()) if mine.shape == ref.shape else 0
                raise ctx.fail(f"{where}: head {h} scores the entry at position {int(at[j])} "
                               f"{float(mine[j]):.6g} in a padded batch but {float(ref[j]):.6g} alone: padding "
                               "changed the score of a real entry (mask padding out of sums, means, pools and "
                               "softmaxes with obs.valid; count sinks from each head's first real slot)")
        score_of = [dict(zip(a_p[h].tolist(), a_s[h].tolist())) for h in range(a_s.shape[0])]
    got, want = _real(b_pos), _real(a_pos)
    for h, (g_h, w_h) in enumerate(zip(got, want)):
        if g_h == w_h:
            continue
        if score_of is not None and len(g_h) == len(w_h):
            s = score_of[h]
            lost, gained = sorted(set(w_h) - set(g_h)), sorted(set(g_h) - set(w_h))
            if all(abs(s[x] - s[y]) <= ATOL + RTOL * abs(s[x]) for x, y in zip(lost, gained)):
                continue  # swaps between entries whose scores tie within the tolerance
        raise ctx.fail(f"{where}: head {h} keeps positions {g_h} in a padded batch but {w_h} alone")
