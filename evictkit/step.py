"""The per-layer eviction step: the one place where a policy meets a layer's cache.

After each forward of a managed layer, `evict_step` runs, in this order (`observe` does 1-3,
`choose` 4-5, `compact` 6):

1. append: the new tokens' true positions, and zero rows for every side tensor;
2. roll the window: the newest `needs().window` post-RoPE queries, kept across forwards;
3. observe: the policy sees an `Observation` and returns side tensors, which are checked;
4. decide: evict when the layer holds more than its budget (plus `slack` while decoding);
5. select: the policy names the entries to keep; the selection is checked;
6. compact: K, V, positions and every side tensor in one call of the compaction core.

`evictkit.compress` calls it from a forward hook; the conformance kit (evictkit.specs.driver)
calls it on a synthetic layer, with a `Guard` that turns a policy's mistakes into law
violations; the benchmarks call it to time one layer. All three therefore drive a policy the
same way by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, cast

import attrs
import torch
from torch import nn

from evictkit import ragged
from evictkit.contract import Needs, Policy, RaggedSelection, declared
from evictkit.hf import attn_implementation
from evictkit.kernels import compact_many
from evictkit.layout import real_entries
from evictkit.observation import Observation
from evictkit.positions import shift_to_slots
from evictkit.selection import check_indices


@attrs.define
class LayerState:
    """Per-sequence state of one layer; a new one starts with each sequence."""

    budget: int  # entries per KV head this layer keeps
    positions: torch.Tensor | None = None  # [B, H_kv, T] true positions of cached entries (-1 on padding)
    state: dict[str, torch.Tensor] = attrs.field(factory=dict)  # policy side tensors [B, H_kv, T(, E)]
    scratch: dict[str, Any] = attrs.field(factory=dict)
    window: tuple[torch.Tensor, torch.Tensor] | None = None  # rolling (queries [B, H_q, w, D], positions [B, w])
    seen: int = 0  # tokens of the sequence so far (the next token's true position)
    pad: torch.Tensor | None = None  # [B, H_kv] leading padding slots of a ragged layer (evictkit.ragged)
    # a left-padded batch (evictkit.rows): one state per row (None before its first real token),
    # and where each row's view of the layer starts
    rows: list[LayerState | None] | None = None
    offsets: list[int] | None = None
    # a left-padded batch stepped as one (evictkit.padded): real tokens seen and budget per row [B]
    row_seen: torch.Tensor | None = None
    row_budgets: torch.Tensor | None = None
    # every row's rolling window is full (`needs().window` queries) and real; once true it stays
    # true (rows only gain real queries), so a padded step need not read the window's positions again
    window_real: bool = False
    # [B, H_kv, D] the newest cached key of each row after the last step: a row that moved
    # between forwards (beam search's reorder_cache) is found by it (evictkit.step.follow_rows)
    last_keys: torch.Tensor | None = None


@attrs.frozen
class StepConfig:
    """What stays fixed for every step of a compression run."""

    policy: Policy
    needs: Needs
    phases: tuple[str, ...]
    slack: int = 0
    inv_freq: torch.Tensor | None = None  # set in "shift" position mode: kept keys re-rotated to slots


class Selection(NamedTuple):
    """A checked selection, ready for compaction."""

    idx: torch.Tensor  # [B, H_kv, K] what select() returned (its ragged idx for a ragged selection)
    gather: torch.Tensor  # [B, H_kv, K] int64 indices the compaction uses (0 on padding columns)
    counts: torch.Tensor | None = None  # [B, H_kv] kept entries per head of a ragged selection
    pad: torch.Tensor | None = None  # [B, H_kv] leading padding after compaction; None = rectangular


class Guard:
    """How the step calls a policy and checks what it returns.

    The core's guard lets a policy's exceptions through and raises ValueError/TypeError on a bad
    return value. The conformance kit subclasses it to report each mistake as a law violation.
    """

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def side_tensor(self, policy: Policy, name: str, t: object, shape: tuple[int, int, int]) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4) or tuple(t.shape[:3]) != shape:
            raise ValueError(
                f"policy {policy.name!r}: observe() must return [B, H_kv, T] = {shape} "
                f"or [B, H_kv, T, E] tensors, got {name!r} with shape {getattr(t, 'shape', None)}"
            )
        return t

    def selection(self, policy: Policy, sel: object, st: LayerState, shape: tuple[int, int, int],
                  attn_impl: str | None) -> Selection:
        B, H, T = shape
        want = min(T, st.budget)
        if isinstance(sel, tuple):  # per-head counts: (idx, counts), see evictkit.ragged
            idx, counts = sel
            gather, pad = ragged.check_ragged(idx, counts, st.pad, B, H, T, want, policy.name, attn_impl)
            return Selection(idx, gather, counts, pad)
        if isinstance(sel, torch.Tensor) and sel.dim() == 3 and not declared(policy).exact_budget:
            want = min(max(sel.shape[-1], 1), want)  # LaCache frees whole ladder blocks: fewer, never more
        idx = cast(torch.Tensor, sel)
        check_indices(idx, B, H, T, want, policy.name)  # raises unless an int tensor [B, H, want]
        return Selection(idx, idx.long())

    def before_observe(self, obs: Observation) -> None:
        """Called right before `observe()` (the kit keeps pristine copies here)."""

    def before_select(self, obs: Observation) -> None:
        """Called right before `select()` (the kit checks `score()` here)."""


CORE_GUARD = Guard()


class StepResult(NamedTuple):
    """What one step did: the layer's K/V after it, and the eviction if there was one."""

    keys: torch.Tensor  # [B, H_kv, T', D]
    values: torch.Tensor
    phase: str
    limit: int  # the size above which this step evicted
    obs: Observation
    selection: Selection | None  # None when the step did not evict


def follow_rows(st: LayerState, old_keys: torch.Tensor) -> None:
    """Follow a permutation of the batch rows made outside evictkit since the last step.

    `old_keys` [B, H_kv, D] is the newest key each row of the cache holds before this forward.
    Beam search (`Cache.reorder_cache`) reorders and duplicates the rows of K and V between
    forwards; the newest key of a row depends on its whole history, so matching it against the
    keys recorded after the last step tells where every row came from, and every per-row
    tensor of the state follows. Raises RuntimeError when a row matches none.
    """
    last = st.last_keys
    if last is None or (old_keys.shape == last.shape and torch.equal(old_keys, last)):
        return
    if old_keys.shape[1:] != last.shape[1:]:
        raise RuntimeError("the cache's rows changed shape outside evictkit; start the sequence inside the block")
    same = (old_keys[:, None] == last[None].to(old_keys.device)).flatten(2).all(-1)  # [B_new, B_old]
    if not bool(same.any(-1).all()):
        raise RuntimeError("a batch row of the cache was changed outside evictkit (it matches no row evictkit "
                           "left); reorder rows with the cache's reorder_cache only")
    perm = same.int().argmax(-1).to(last.device)
    reorder_rows(st, perm)


def reorder_rows(st: LayerState, perm: torch.Tensor) -> None:
    """New row b takes old row perm[b]'s per-row state (positions, side tensors, window, padding)."""
    idx = perm.tolist()
    if st.positions is not None:
        st.positions = st.positions[perm.to(st.positions.device)]
    st.state = {n: t[perm.to(t.device)] for n, t in st.state.items()}
    if st.window is not None:
        st.window = (st.window[0][perm.to(st.window[0].device)], st.window[1][perm.to(st.window[1].device)])
    if st.pad is not None:
        st.pad = st.pad[perm.to(st.pad.device)]
    if st.rows is not None and st.offsets is not None:
        st.rows = [None if st.rows[i] is None else _copy_row(st.rows[i]) for i in idx]
        st.offsets = [st.offsets[i] for i in idx]
    if st.last_keys is not None:
        st.last_keys = st.last_keys[perm.to(st.last_keys.device)]
    if st.row_seen is not None and st.row_budgets is not None:
        on = perm.to(st.row_seen.device)
        st.row_seen, st.row_budgets = st.row_seen[on], st.row_budgets[on]


def _copy_row(row: LayerState | None) -> LayerState | None:
    # duplicated beams must not share the dicts a later step writes into
    return None if row is None else attrs.evolve(row, state=dict(row.state), scratch=dict(row.scratch))


def new_positions(position_ids: torch.Tensor | None, seen: int, B: int, q: int, device: torch.device) -> torch.Tensor:
    """[B, q] true positions of a forward's new tokens: the caller's, or counted on from `seen`."""
    if position_ids is None:
        return torch.arange(seen, seen + q, device=device).unsqueeze(0).expand(B, q)
    if position_ids.dim() == 3:  # multimodal rope (3, B, q): the text axis
        position_ids = position_ids[0]
    return position_ids.to(device=device, dtype=torch.long).expand(B, q)


def phase_of(st: LayerState, q: int, as_decode: bool = False) -> str:
    """The phase of a forward of q new tokens, decided here and nowhere else: "prefill" for a
    forward that starts a sequence, or continues it with several tokens (a prefill chunk: the
    policy compresses the layer back to its budget after it); "decode" for one new token, and
    for any continuation under `as_decode` (the query-agnostic protocol appends the question)."""
    if st.positions is None:
        return "prefill"
    return "decode" if as_decode or q == 1 else "prefill"


def prefill_rows(started: torch.Tensor, real_new: torch.Tensor, as_decode: bool = False) -> torch.Tensor:
    """`phase_of` for each row of a padded batch (evictkit.padded), whose rows start and continue
    on their own: [B] bool, True where the row's phase is "prefill". started: [B] bool, the row has
    seen a real token before this forward; real_new: [B] its real new tokens in this forward."""
    return ~started | ((real_new > 1) & (not as_decode))


def roll_window(module: nn.Module, window: tuple[torch.Tensor, torch.Tensor] | None, hidden: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], new_pos: torch.Tensor,
                w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The newest `w` post-RoPE queries [B, H_q, w, D] and their positions [B, w], after this forward."""
    from evictkit.attention import project_queries

    cos, sin = position_embeddings
    new_q = project_queries(module, hidden[:, -w:], cos[:, -w:], sin[:, -w:])
    new_p = new_pos[:, -w:]
    if window is not None and new_q.shape[2] < w:
        new_q = torch.cat([window[0], new_q], dim=2)[:, :, -w:]
        new_p = torch.cat([window[1], new_p], dim=1)[:, -w:]
    return new_q, new_p


def evict_step(
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
    position_ids: torch.Tensor | None = None,
    guard: Guard = CORE_GUARD,
    as_decode: bool = False,
) -> StepResult:
    """One forward's step on one layer. `keys`/`values` [B, H_kv, T, D] already hold the forward's
    q new tokens (q = hidden_states.shape[1]); `st` is updated in place. Returns K/V to store.
    as_decode: a continuation of several tokens is a decode step, not a prefill chunk."""
    obs = observe(cfg, st, module=module, layer_idx=layer_idx, n_layers=n_layers, keys=keys, values=values,
                  hidden_states=hidden_states, position_embeddings=position_embeddings, position_ids=position_ids,
                  guard=guard, as_decode=as_decode)
    limit, sel = choose(cfg, st, obs, guard)
    if sel is None:
        return StepResult(keys, values, obs.phase, limit, obs, None)
    keys, values = compact(cfg, st, obs, sel)
    return StepResult(keys, values, obs.phase, limit, obs, sel)


def observe(
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
    position_ids: torch.Tensor | None = None,
    guard: Guard = CORE_GUARD,
    as_decode: bool = False,
) -> Observation:
    """Steps 1-3: append the new tokens' positions and side-tensor rows, roll the window, and let
    the policy observe. Returns the Observation the rest of the step reads."""
    B, Hkv, T, _ = keys.shape
    q = hidden_states.shape[1]
    first = st.positions is None
    phase = phase_of(st, q, as_decode)

    new_pos = _append(cfg, st, module=module, hidden_states=hidden_states, position_embeddings=position_embeddings,
                      position_ids=position_ids, n_kv_heads=Hkv, device=keys.device)
    w = cfg.needs.window
    obs = Observation(
        module=module, layer_idx=layer_idx, n_layers=n_layers, phase=phase, keys=keys, values=values,
        positions=cast(torch.Tensor, st.positions),  # set by _append
        state=st.state, scratch=st.scratch, hidden_states=hidden_states,
        position_embeddings=position_embeddings, query_positions=new_pos, window=w,
        window_buffer=None if first else st.window, valid=ragged.valid_mask(st.pad, T), phases=cfg.phases,
    )
    if w and first:
        st.window = (obs.window_queries, obs.window_positions)

    st.state.update(side_tensors(cfg, obs, guard))
    return obs


def side_tensors(cfg: StepConfig, obs: Observation, guard: Guard = CORE_GUARD) -> dict[str, torch.Tensor]:
    """Step 3's call: the policy observes `obs`; returns its side tensors, each checked to be
    [B, H_kv, T] or [B, H_kv, T, E] (TypeError when observe() returns no mapping)."""
    policy = cfg.policy
    B, Hkv, T, _ = obs.keys.shape
    guard.before_observe(obs)
    returned = guard.call("observe()", policy.observe, obs) or {}
    if not isinstance(returned, Mapping):
        raise TypeError(f"policy {policy.name!r}: observe() returned {type(returned).__name__}; "
                        "it must return a mapping of side tensors")
    return {name: guard.side_tensor(policy, name, t, (B, Hkv, T)) for name, t in returned.items()}


def _append(cfg: StepConfig, st: LayerState, *, module: nn.Module, hidden_states: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor], position_ids: torch.Tensor | None,
            n_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Steps 1-2: the new tokens' true positions and zero side-tensor rows appended, the window
    rolled (the first forward's comes from its Observation, lazily). Returns the positions [B, q]."""
    B, q = hidden_states.shape[:2]
    first = st.positions is None
    new_pos = new_positions(position_ids, st.seen, B, q, device)
    appended = new_pos.unsqueeze(1).expand(B, n_kv_heads, q)
    st.positions = appended if st.positions is None else torch.cat([st.positions, appended], dim=-1)
    for name, t in st.state.items():
        st.state[name] = torch.cat([t, t.new_zeros(B, n_kv_heads, q, *t.shape[3:])], dim=2)
    st.seen += q
    w = cfg.needs.window
    if w and not first:
        st.window = roll_window(module, st.window, hidden_states, position_embeddings, new_pos, w)
    return new_pos


def track(cfg: StepConfig, st: LayerState, *, module: nn.Module, hidden_states: torch.Tensor,
          position_embeddings: tuple[torch.Tensor, torch.Tensor], position_ids: torch.Tensor | None,
          n_kv_heads: int, device: torch.device, as_decode: bool = False) -> str:
    """Steps 1-2 alone, for a forward in which the policy neither observes (it keeps the default
    `observe`) nor evicts: the layer's entries need not be read at all (a ragged layer is then
    never laid out padded). Returns the forward's phase."""
    phase = phase_of(st, hidden_states.shape[1], as_decode)
    _append(cfg, st, module=module, hidden_states=hidden_states, position_embeddings=position_embeddings,
            position_ids=position_ids, n_kv_heads=n_kv_heads, device=device)
    return phase


def needs_step(cfg: StepConfig, st: LayerState, q: int, *, as_decode: bool = False) -> bool:
    """Whether this forward's step reads the layer: the policy evicts in its phase, or observes."""
    return phase_of(st, q, as_decode) in cfg.phases or type(cfg.policy).observe is not Policy.observe


def choose(
    cfg: StepConfig, st: LayerState, obs: Observation, guard: Guard = CORE_GUARD
) -> tuple[int, Selection | None]:
    """Steps 4-5: (limit, checked selection) when the layer holds more real entries than
    H_kv x limit (limit = budget, plus slack while decoding); (limit, None) otherwise."""
    B, Hkv, T, _ = obs.keys.shape
    limit = st.budget + (cfg.slack if obs.phase == "decode" else 0)
    if obs.phase not in cfg.phases or real_entries(st.pad, Hkv, T) <= Hkv * limit:
        return limit, None
    guard.before_select(obs)
    chosen = guard.call("select()", cfg.policy.select, obs, st.budget)
    attn_impl = attn_implementation(obs.module)
    sel = guard.selection(cfg.policy, chosen, st, (B, Hkv, T), attn_impl)
    if sel.pad is not None and cfg.inv_freq is not None:
        raise ValueError(f"policy {cfg.policy.name!r}: ragged layers do not support positions='shift'")
    return limit, sel


def compact(cfg: StepConfig, st: LayerState, obs: Observation, sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 6: K, V, positions and every side tensor gathered with one selection; returns K, V."""
    names = list(st.state)
    out = compact_many([obs.keys, obs.values, cast(torch.Tensor, st.positions), *st.state.values()], sel.gather)
    keys, values, st.positions = out[0], out[1], out[2]
    st.state = dict(zip(names, out[3:]))
    st.pad = sel.pad
    if sel.pad is not None:
        st.positions = st.positions.masked_fill(
            ~ragged.valid_mask(sel.pad, sel.gather.shape[-1]), -1)  # type: ignore[operator]  # not None: pad is set
    if cfg.inv_freq is not None:
        keys = shift_to_slots(keys, sel.gather, cfg.inv_freq)
    return keys, values


__all__ = ["CORE_GUARD", "Guard", "LayerState", "RaggedSelection", "Selection", "StepConfig", "StepResult",
           "choose", "compact", "evict_step", "follow_rows", "needs_step", "new_positions", "observe", "phase_of",
           "prefill_rows", "side_tensors",
           "reorder_rows", "roll_window", "track"]
