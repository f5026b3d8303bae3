"""A left-padded batch stepped as one: one observe/select/compact over `[B, H_kv, T]`, no loop over rows.

`model.generate` on a left-padded batch caches every row in one `[B, H_kv, T, D]` tensor; a later
forward may pad a row's new tokens on the left too (questions of different lengths after the
contexts), and a finished row may be fed padding only. evictkit keeps such a layer in the
head-padded layout of evictkit.ragged: the first `pad[b, h]` slots of row b, head h are padding
(true position -1), its real entries follow in order. After each forward:

1. append: the new tokens' true positions (each row's own; -1 on its padding tokens), zero side
   tensor rows; padding among a started row's new tokens is moved in front of its old entries
   (one gather of the whole layer, the compaction core's), so padding stays a leading prefix;
2. roll the window per row over real queries only (padding queries never enter it; a row with
   fewer real queries than the window has padding queries, position -1, in front);
3. observe: the policy sees the whole batch, with `obs.valid` False on padding slots and
   query positions -1 on padding queries; a row with no real new token (alone it would run no
   forward) keeps the side tensors it had;
4. decide per row: a row evicts when it had real new tokens and holds more than H_kv x its limit
   real entries (its budget is its own: from its own prompt length);
5. select once per distinct budget among the evicting rows (one call in the usual case): the
   policy must ignore padding (`Needs.padding`); what an evicting row keeps is checked, rows that
   do not evict keep all their real entries;
6. compact: K, V, positions and side tensors gathered in one call, each row right-aligned.

So a row of a batch keeps what it keeps alone (the batch law), as long as the policy's scores of
real entries do not depend on the padding: the kit's batch law checks it for every policy. A
policy that has not declared `Needs(padding=True)` is stepped row by row (evictkit.rows).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any, cast

import attrs
import torch
from torch import nn

from evictkit import ragged
from evictkit.attention import project_queries
from evictkit.hf import attn_implementation
from evictkit.kernels import compact_many
from evictkit.layout import real_per_row
from evictkit.observation import Observation
from evictkit.selection import check_indices
from evictkit.step import (
    CORE_GUARD,
    Guard,
    LayerState,
    StepConfig,
    new_positions,
    phase_of,
    prefill_rows,
    roll_window,
    side_tensors,
)


@attrs.define
class Rows:
    """A padded batch's rows, as the policy may need them (`Observation.rows`): each row's phase
    is its own, and `select()` is called once per distinct budget, for some of the rows.

    prefill: [B] bool, the row's phase is "prefill" (else "decode"; `obs.phase` is "prefill" when
        any row's is); active: [B] bool, the row has a real new token in this forward;
    selecting: [B] bool, set before each `select()` call: the rows whose kept entries this call
        decides (they evict, with this budget); None outside `select()`.
    """

    prefill: torch.Tensor
    active: torch.Tensor
    selecting: torch.Tensor | None = None


class PaddedObservation(Observation):
    """An Observation of a padded batch: `queries` are always this forward's own (padding queries
    included, at position -1), never the rolling window's newest, which skips padding."""

    @cached_property
    def queries(self) -> torch.Tensor:
        return self._project(0)


def start(st: LayerState, batch: int, seen: int, budget: int, device: torch.device) -> None:
    """Make `st` a padded batch's state: per-row tokens seen and budgets; a batch stepped as one
    so far (every row started, equal lengths) continues with its common ones."""
    st.row_seen = torch.full((batch,), seen, dtype=torch.long, device=device)
    st.row_budgets = torch.full((batch,), budget if seen else 0, dtype=torch.long, device=device)


def padded_step(
    cfg: StepConfig,
    st: LayerState,
    *,
    module: nn.Module,
    layer_idx: int,
    n_layers: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor | None,
    new_pad: torch.Tensor,
    row_budget: Callable[[int, int], int],
    guard: Guard = CORE_GUARD,
    as_decode: bool = False,
    defer: Callable[[Observation, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
    """One forward's step on a padded layer (see the module docstring). Returns (keys, values,
    phase, whether any row evicted) and updates `st` (positions, pad, side tensors, window,
    row_seen, row_budgets).

    keys/values [B, H_kv, T, D] hold the forward's q new tokens last; new_pad [B]: padding tokens
    among them per row (they come first); row_budget(b, length): row b's budget for a prompt of
    `length` real tokens (asked once, at the row's first real token).
    defer: a cross-layer policy's (evictkit.cross_layer): the rows that prefill with real tokens
    do not evict here; `defer(obs, rows)` is called after observe() with those rows [B] bool.
    """
    B, H, T, _ = keys.shape
    q = hidden_states.shape[1]
    device = keys.device
    p = new_pad.to(device=device, dtype=torch.long)
    padding_now = bool(p.any())  # most decode steps have none: they take the short ways below
    active = p < q  # rows with a real new token
    if st.row_seen is None or st.row_budgets is None:
        start(st, B, 0, 0, device)
    prefill = prefill_rows(cast(torch.Tensor, st.row_seen) > 0, q - p, as_decode)  # each row's phase, as alone
    # the Observation's phase: "prefill" when any row's is (a one-token question beside longer
    # ones); the core decides eviction, and the slack, per row
    if not padding_now or bool(active.any()):
        phase = "prefill" if bool((prefill & active).any()) else "decode"
    else:
        phase = phase_of(st, q, as_decode)
    _budgets(st, p, q, row_budget)

    keys, values, new_pos = _append(cfg, st, keys, values, position_ids, p, q, H, padding_now)
    # one host read per layer until every row's window is real, none after (evictkit.step.LayerState)
    window_padded = st.window is not None and not st.window_real and bool((st.window[1] < 0).any())
    if st.window is not None and not window_padded and st.window[1].shape[1] == cfg.needs.window:
        st.window_real = True  # every row holds `window` real queries: it can only keep them
    if cfg.needs.window and st.window is not None:
        st.window = _roll_window(module, st.window, hidden_states, position_embeddings, new_pos, cfg.needs.window,
                                 sort=padding_now or window_padded)
    valid = ragged.valid_mask(st.pad, T)
    if valid is None and (padding_now or window_padded):
        # padding queries (this forward's, or in the window) are masked through the key mask (evictkit.attention)
        valid = torch.ones(B, H, T, dtype=torch.bool, device=device)
    obs = PaddedObservation(
        module=module, layer_idx=layer_idx, n_layers=n_layers, phase=phase, keys=keys, values=values,
        positions=st.positions, state=st.state, scratch=st.scratch, hidden_states=hidden_states,  # type: ignore[arg-type]
        position_embeddings=position_embeddings, query_positions=new_pos, window=cfg.needs.window,
        window_buffer=st.window, valid=valid, phases=cfg.phases,
    )
    obs.rows = Rows(prefill=prefill, active=active)
    if cfg.needs.window and st.window is None:
        st.window = (obs.window_queries, obs.window_positions)
    _observe(cfg, st, obs, guard, active)
    deferred = prefill & active if defer is not None else None
    if defer is not None and bool(cast(torch.Tensor, deferred).any()):
        defer(obs, cast(torch.Tensor, deferred))

    budgets = cast(torch.Tensor, st.row_budgets)  # set by start()
    limit = budgets + torch.where(prefill, 0, cfg.slack)
    real = real_per_row(st.pad, H, T)
    in_phase = (prefill & ("prefill" in cfg.phases)) | (~prefill & ("decode" in cfg.phases))
    evicting = active & (real > H * limit) & (budgets > 0) & in_phase
    if deferred is not None:  # their budgets come from the allocation after the last layer
        evicting = evicting & ~deferred
    if not bool(evicting.any()):
        return keys, values, phase, False
    kept = kept_mask(cfg, st, obs, guard, evicting)
    keys, values = compact_rows(st, keys, values, kept)
    return keys, values, phase, True


def _budgets(st: LayerState, p: torch.Tensor, q: int, row_budget: Callable[[int, int], int]) -> None:
    """Each row's budget, fixed at its first real token from its own prompt length."""
    seen, budgets = cast(torch.Tensor, st.row_seen), cast(torch.Tensor, st.row_budgets)
    starting = ((seen == 0) & (p < q)).nonzero().flatten().tolist()
    if starting:  # bookkeeping of ints, once per row and sequence; the step itself is batched
        lengths = (q - p).tolist()
        budgets[starting] = torch.tensor([row_budget(b, lengths[b]) for b in starting],
                                         dtype=torch.long, device=budgets.device)
        st.budget = int(budgets.max())


def _append(cfg: StepConfig, st: LayerState, keys: torch.Tensor, values: torch.Tensor,
            position_ids: torch.Tensor | None, p: torch.Tensor, q: int, H: int,
            padding_now: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 1: positions (-1 on padding) and zero side-tensor rows appended; padding among a
    started row's new tokens moved in front of its old entries. Returns (keys, values, the new
    tokens' positions [B, q])."""
    seen = cast(torch.Tensor, st.row_seen)
    B, _, T, _ = keys.shape
    device = keys.device
    old = T - q
    is_pad = torch.arange(q, device=device) < p[:, None]  # [B, q]
    if position_ids is None:  # each row counts on from its own length over its real tokens
        new_pos = seen[:, None] + (~is_pad).long().cumsum(-1) - 1
    else:
        new_pos = new_positions(position_ids, 0, B, q, device)
    if padding_now:
        new_pos = new_pos.masked_fill(is_pad, -1)
    appended = new_pos[:, None, :].expand(B, H, q)
    st.positions = appended if st.positions is None else torch.cat([st.positions, appended], dim=-1)
    for name, t in st.state.items():
        st.state[name] = torch.cat([t, t.new_zeros(B, H, q, *t.shape[3:])], dim=2)
    st.row_seen = seen + (q - p)
    st.seen = int(st.row_seen.max())
    if not padding_now:  # the padding, if any, is where it was
        return keys, values, new_pos
    lead = st.pad if st.pad is not None else torch.zeros(B, H, dtype=torch.long, device=device)
    if old:
        slots = torch.arange(T, device=device)
        moved = slots[None] < (old + p)[:, None]  # [B, T]: old entries shift right by the row's padding
        src = torch.where(moved, (slots[None] - p[:, None]).clamp(min=0), slots[None])
        names = list(st.state)
        out = compact_many([keys, values, st.positions, *st.state.values()], src[:, None, :].expand(B, H, T))
        keys, values, st.positions = out[0], out[1], out[2]
        st.state = dict(zip(names, out[3:]))
    lead = lead + p[:, None] if old else p[:, None].expand(B, H)
    st.positions = st.positions.masked_fill(torch.arange(T, device=device) < lead[..., None], -1)
    st.pad = lead if bool(lead.any()) else None
    return keys, values, new_pos


def _roll_window(module: nn.Module, window: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor], new_pos: torch.Tensor,
                 w: int, sort: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: each row's newest `w` real queries [B, H_q, w, D] and positions [B, w]; a row with
    fewer has padding queries (position -1) in front. Padding queries of this forward never enter.
    sort: False when neither this forward nor the window holds a padding query (the newest w are
    then simply the last w)."""
    if not sort:
        return roll_window(module, window, hidden, position_embeddings, new_pos, w)
    cos, sin = position_embeddings
    n = min(w, hidden.shape[1])
    new_q = project_queries(module, hidden[:, -n:], cos[:, -n:], sin[:, -n:])
    queries = torch.cat([window[0], new_q], dim=2)
    positions = torch.cat([window[1], new_pos[:, -n:]], dim=1)  # [B, L]
    L = positions.shape[1]
    # real queries keep their order and go last; padding (key -1) sorts first
    order = torch.where(positions >= 0, torch.arange(L, device=positions.device), -1).sort(dim=1).indices[:, -w:]
    kept_pos = positions.gather(1, order)
    kept_q = queries.gather(2, order[:, None, :, None].expand(-1, queries.shape[1], -1, queries.shape[3]))
    return kept_q, kept_pos


def _observe(cfg: StepConfig, st: LayerState, obs: Observation, guard: Guard, active: torch.Tensor) -> None:
    """Step 3: the policy observes the batch; rows with no real new token keep their side tensors."""
    before = dict(st.state)
    idle = not bool(active.all())
    for name, t in side_tensors(cfg, obs, guard).items():
        if idle and name in before:
            keep = (~active).view(t.shape[0], *([1] * (t.dim() - 1)))
            t = torch.where(keep, before[name], t)
        st.state[name] = t


def kept_mask(cfg: StepConfig, st: LayerState, obs: Observation, guard: Guard, evicting: torch.Tensor) -> torch.Tensor:
    """Steps 4-5: [B, H_kv, T] bool, what each row keeps: the policy's checked selection for an
    evicting row (one select() per distinct budget), all real entries for any other."""
    budgets = cast(torch.Tensor, st.row_budgets)
    B, H, T, _ = obs.keys.shape
    kept = cast(torch.Tensor, st.positions) >= 0
    guard.before_select(obs)
    for budget in sorted(set(budgets[evicting].tolist())):
        rows = evicting & (budgets == budget)
        if obs.rows is not None:
            obs.rows.selecting = rows
        chosen = guard.call("select()", cfg.policy.select, obs, int(budget))
        mask = _selection_mask(cfg, st, chosen, rows, (B, H, T), int(budget), attn_implementation(obs.module))
        kept = torch.where(rows[:, None, None], mask, kept)
    if obs.rows is not None:
        obs.rows.selecting = None
    return kept


def _selection_mask(cfg: StepConfig, st: LayerState, chosen: Any, rows: torch.Tensor, shape: tuple[int, int, int],
                    budget: int, attn_impl: str | None) -> torch.Tensor:
    """A select() result checked for the evicting `rows` and turned into a kept mask [B, H_kv, T]."""
    B, H, T = shape
    name = cfg.policy.name
    want = min(T, budget)
    valid = cast(torch.Tensor, st.positions) >= 0
    if isinstance(chosen, tuple):  # ragged: (idx, counts), see evictkit.ragged
        idx, counts = chosen
        r = rows.nonzero().flatten()
        pad = None if st.pad is None else st.pad[r]
        if isinstance(idx, torch.Tensor) and isinstance(counts, torch.Tensor) and idx.dim() == 3 and counts.dim() == 2:
            # the evicting rows at their own width: a row that does not evict may keep more in a head
            width = int(counts[r].max()) if len(r) else 0
            ragged.check_ragged(idx[r][..., idx.shape[-1] - width:], counts[r], pad, len(r), H, T, want, name,
                                attn_impl, exact=cfg.needs.exact_budget)
        else:
            ragged.check_ragged(idx, counts, pad, B, H, T, want, name, attn_impl)  # names the type mistake
        real = torch.arange(idx.shape[-1], device=idx.device) >= (idx.shape[-1] - counts.long())[..., None]
        idx = torch.where(real, idx.long(), T)  # padding columns scatter into a dropped extra slot
    else:
        if isinstance(chosen, torch.Tensor) and chosen.dim() == 3 and not cfg.needs.exact_budget:
            want = min(max(chosen.shape[-1], 1), want)
        check_indices(chosen, B, H, T, want, name)
        idx = chosen
    mask = torch.zeros(B, H, T + 1, dtype=torch.bool, device=valid.device)
    mask.scatter_(2, idx.to(valid.device), True)
    mask = mask[..., :T]
    if bool((mask & ~valid)[rows].any()):
        raise ValueError(f"policy {name!r}: select() kept a padding slot of a padded batch (obs.valid is False "
                         "there); padding must never be kept")
    return mask


def compact_rows(st: LayerState, keys: torch.Tensor, values: torch.Tensor,
             kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6: every row's kept entries right-aligned, in order, padding in front; one gather."""
    B, H, T, _ = keys.shape
    counts = kept.sum(-1)  # [B, H]
    K = int(counts.max())
    slots = torch.arange(T, device=kept.device)
    order = torch.where(kept, slots, -1).sort(dim=-1).values[..., T - K:]  # kept slots last, ascending
    pad = K - counts
    names = list(st.state)
    out = compact_many([keys, values, st.positions, *st.state.values()], order.clamp(min=0))  # type: ignore[list-item]
    keys, values, positions = out[0], out[1], out[2]
    st.state = dict(zip(names, out[3:]))
    st.positions = positions.masked_fill(torch.arange(K, device=kept.device) < pad[..., None], -1)
    st.pad = pad if bool(pad.any()) else None
    return keys, values


__all__ = ["PaddedObservation", "Rows", "compact_rows", "kept_mask", "padded_step", "start"]
