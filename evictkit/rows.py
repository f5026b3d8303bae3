"""Left-padded batches: every row is its own sequence, stepped alone on a view of the shared cache.

`model.generate` on a left-padded batch caches every row in one `[B, H_kv, T, D]` tensor, the
shorter rows' padding first; a later forward may pad a row's new tokens on the left too (rows
whose questions differ in length). evictkit keeps one `LayerState` per row (`LayerState.rows`) and runs
the ordinary per-layer step (evictkit.step) on each row's view of the layer: batch 1, from the
row's first real entry on. So a row's positions, side tensors, scratch, window and budget are its
own, padding is never scored or kept, and a row of a batch gets exactly what it gets alone (the
batch law), by construction.

Layout after a step: row b's kept entries are the last `L_b` slots of the layer, the slots before
them are padding (zeros, true position -1, hidden from attention by the per-head mask of
evictkit.ragged). A row whose heads keep different counts (AdaKV) pads its shorter heads inside
its own view, as a ragged layer does. `LayerState.offsets[b]` is where row b's view starts.
"""

from __future__ import annotations

from typing import Any

import torch

from evictkit.step import CORE_GUARD, Guard, LayerState, StepConfig, choose, compact, observe


def start_rows(batch: int) -> tuple[list[LayerState | None], list[int]]:
    """Per-row states (None until a row's first real token) and view offsets for a new sequence."""
    return [None] * batch, [0] * batch


def split_rows(st: LayerState) -> None:
    """Turn the state of a batch stepped as one into per-row states, in place: a batch whose rows
    were all real so far, which now gets padding among its new tokens (questions of different
    lengths after a shared-length context). Each row's view starts at slot 0 of the layer; its
    scratch is the batch's, with tensors whose first dimension is the batch sliced to the row."""
    if st.positions is None:
        raise RuntimeError("split_rows needs a layer state that has seen a forward")
    B = st.positions.shape[0]
    st.rows = [LayerState(
        budget=st.budget, positions=st.positions[b:b + 1], state={n: t[b:b + 1] for n, t in st.state.items()},
        scratch={k: _row_of(v, b, B) for k, v in st.scratch.items()},
        window=None if st.window is None else (st.window[0][b:b + 1], st.window[1][b:b + 1]),
        seen=st.seen, pad=None if st.pad is None else st.pad[b:b + 1],
    ) for b in range(B)]
    st.offsets = [0] * B


def rows_step(
    cfg: StepConfig,
    st: LayerState,
    *,
    module: Any,
    layer_idx: int,
    n_layers: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    position_ids: torch.Tensor | None,
    new_pad: list[int],
    row_budget: Any,
    guard: Guard = CORE_GUARD,
    as_decode: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One forward's step on a padded layer: every row stepped alone. Returns (keys, values,
    whether any row evicted) and updates `st` (its rows, offsets, joint positions and pad).

    new_pad: padding tokens among this forward's q new tokens, per row (they come first). A row
        that has started may get padding too (its new tokens are fewer than the longest row's):
        those slots leave its view, and a row with no real new token is not stepped, as alone it
        would run no forward.
    row_budget(b, length): the budget of row b for a prompt of `length` real tokens.
    """
    if st.rows is None or st.offsets is None:
        raise RuntimeError("rows_step needs a layer state started with start_rows()")
    B, H, T, _ = keys.shape
    q = hidden_states.shape[1]
    old = T - q
    cos, sin = position_embeddings
    views: list[tuple[torch.Tensor, torch.Tensor]] = []
    evicted = False
    for b in range(B):
        p = new_pad[b]
        row = st.rows[b]
        if row is None and p < q:  # the row's first real tokens
            row = st.rows[b] = LayerState(budget=row_budget(b, q - p))
            st.offsets[b] = old + p
        elif row is None:  # still padding only
            st.offsets[b] = T
        off = st.offsets[b]
        if row is None:
            views.append((keys[b:b + 1, :, T:], values[b:b + 1, :, T:]))
            continue
        row_k, row_v = keys[b:b + 1, :, off:], values[b:b + 1, :, off:]
        if off < old + p:  # padding among a started row's new tokens: it leaves the row's view
            row_k = torch.cat([keys[b:b + 1, :, off:old], keys[b:b + 1, :, old + p:]], dim=2)
            row_v = torch.cat([values[b:b + 1, :, off:old], values[b:b + 1, :, old + p:]], dim=2)
        if p == q:  # no real new token: alone, the row ran no forward
            views.append((row_k, row_v))
            continue
        row_cos, row_sin = _row(cos, b), _row(sin, b)
        obs = observe(
            cfg, row, module=module, layer_idx=layer_idx, n_layers=n_layers, keys=row_k,
            values=row_v, hidden_states=hidden_states[b:b + 1, p:],
            position_embeddings=(row_cos[:, p:], row_sin[:, p:]),
            position_ids=None if position_ids is None else _row(position_ids, b)[:, p:], guard=guard,
            as_decode=as_decode,
        )
        _, sel = choose(cfg, row, obs, guard)
        if sel is None:
            views.append((obs.keys, obs.values))
        else:
            views.append(compact(cfg, row, obs, sel))
            evicted = True
    if evicted or any(o != T - v[0].shape[2] for o, v in zip(st.offsets, views)):
        keys, values = _left_pad([k for k, _ in views]), _left_pad([v for _, v in views])
    K = keys.shape[2]
    st.offsets = [K - k.shape[2] for k, _ in views]
    st.positions, st.pad = _joint_view(st.rows, st.offsets, H, K, keys.device)
    return keys, values, evicted


def _row_of(value: Any, b: int, batch: int) -> Any:
    """Row b of a scratch value: a tensor whose first dimension is the batch is sliced (a policy's
    per-row statistics), tuples and lists item by item; anything else (scalars) is shared."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value[b:b + 1]
    if isinstance(value, (tuple, list)):
        return type(value)(_row_of(v, b, batch) for v in value)
    return value


def _row(t: torch.Tensor, b: int) -> torch.Tensor:
    """Row b of a per-row tensor, or the tensor itself when it is shared by the batch (size 1)."""
    return t if t.shape[0] == 1 else t[b:b + 1]


def _left_pad(parts: list[torch.Tensor]) -> torch.Tensor:
    """[1, H, L_b, D] per row -> [B, H, max L_b, D], each row right-aligned, zeros before it."""
    K = max(t.shape[2] for t in parts)
    return torch.cat([torch.cat([t.new_zeros(*t.shape[:2], K - t.shape[2], *t.shape[3:]), t], dim=2)
                      for t in parts], dim=0)


def _joint_view(rows: list[LayerState | None], offsets: list[int], H: int, K: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer-wide positions [B, H, K] (-1 on padding) and padding [B, H] (None: none) that the
    core's mask, stats and harness views read."""
    positions, pad = [], []
    for row, off in zip(rows, offsets):
        if row is None or row.positions is None:
            positions.append(torch.full((1, H, K), -1, dtype=torch.long, device=device))
            pad.append(torch.full((1, H), K, dtype=torch.long, device=device))
            continue
        positions.append(torch.cat([torch.full((1, H, off), -1, dtype=torch.long, device=device),
                                    row.positions.to(device)], dim=2))
        inner = row.pad if row.pad is not None else torch.zeros(1, H, dtype=torch.long, device=device)
        pad.append(inner.to(device) + off)
    joint = torch.cat(pad, dim=0)
    return torch.cat(positions, dim=0), (joint if bool(joint.any()) else None)
