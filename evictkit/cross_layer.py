"""Budgets allocated across layers (`Needs(cross_layer=True)`, CAKE): one cut after the last layer.

A static schedule (`Policy.layer_budget`, PyramidKV) knows each layer's budget before the forward.
A cross-layer policy's budgets depend on what every layer saw, so at a prefill forward (a prompt,
or a chunk of one) the core:

1. steps each layer as a padded batch (evictkit.padded) whose prefilling rows do not evict: the
   policy observes, and its `layer_signal(obs)` [B] is kept here with the layer's module and rows;
2. after the last managed layer, asks `allocate(signals [L, R], totals [R], available [L, R])`
   for every layer's budget, for the R rows that prefilled; `totals` is what the static schedule
   would have kept over all layers, so an allocation redistributes the total, never raises it;
3. cuts every layer to its new budget: one `select()` per layer and distinct budget on an
   Observation of the layer as it is now (no queries of this forward: q_len is 0; the rolling
   window, side tensors, positions and scratch are there), compacted like any padded step.

Decode steps are per layer, at the allocated per-row budgets (plus slack). Each row's budgets are
its own (signals, totals and available are per row), so a row of a batch keeps what it keeps alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import attrs
import torch

from evictkit.fixed_cache import store_padded
from evictkit.layout import real_per_row, view_of
from evictkit.padded import PaddedObservation, Rows, compact_rows, kept_mask
from evictkit.step import Guard, LayerState, StepConfig


@attrs.define
class Deferred:
    """One layer's prefill forward, waiting for the allocation: its module, its `layer_signal`
    [B], its rows, and `cut` (`rows.prefill & rows.active`: the rows that prefilled and are cut)."""

    module: Any
    signal: torch.Tensor
    rows: Rows
    cut: torch.Tensor  # [B] bool
    before: int = 0  # the layer's slots in its step (its books are kept after the cut)
    evicted: bool = False  # a decoding row of the batch evicted in the layer's step


def _real(st: LayerState, H: int, T: int, B: int) -> torch.Tensor:
    """[B] real entries (summed over the KV heads) each row of the layer holds."""
    real = real_per_row(st.pad, H, T)
    return real.cpu() if isinstance(real, torch.Tensor) else torch.full((B,), real, dtype=torch.long)


def check_allocation(name: str, budgets: object, n_layers: int, n_rows: int) -> torch.Tensor:
    """`allocate()`'s return value checked: an int tensor [L, R] of budgets >= 1."""
    if not isinstance(budgets, torch.Tensor) or budgets.shape != (n_layers, n_rows) or (
            budgets.is_floating_point() or budgets.dtype == torch.bool):
        raise ValueError(f"policy {name!r}: allocate() must return an int tensor [L, R] = [{n_layers}, {n_rows}] of "
                         f"per-layer budgets, got {type(budgets).__name__} "
                         f"{tuple(getattr(budgets, 'shape', ()))} {getattr(budgets, 'dtype', '')}")
    if n_rows and int(budgets.min()) < 1:
        raise ValueError(f"policy {name!r}: allocate() gave a budget of {int(budgets.min())}; every layer keeps "
                         "at least 1 entry per KV head")
    return budgets.long()


def allocate(cfg: StepConfig, guard: Guard, layers: dict[int, LayerState], pending: dict[int, Deferred],
             cache: Any, totals: Callable[[int, list[int]], int]) -> list[int]:
    """Step 2: each deferred layer's `row_budgets` set for the rows that prefilled. Returns the
    layer indices, in order. totals(b, layer indices): row b's static total over those layers."""
    lis = list(pending)
    rows = pending[lis[0]].cut.cpu().nonzero().flatten()
    signals = torch.stack([pending[li].signal.detach().float().cpu()[rows] for li in lis])
    available = []
    for li in lis:
        view = view_of(cache.layers[li], layers[li].pad)
        B = cast(torch.Tensor, layers[li].row_budgets).shape[0]
        available.append(_real(layers[li], view.n_kv_heads, view.slots, B)[rows] // view.n_kv_heads)
    wanted = torch.tensor([totals(int(b), lis) for b in rows.tolist()], dtype=torch.long)
    budgets = check_allocation(cfg.policy.name, guard.call("allocate()", cfg.policy.allocate, signals, wanted,
                                                             torch.stack(available)), len(lis), len(rows))
    for li, budget in zip(lis, budgets):
        st = layers[li]
        row_budgets = cast(torch.Tensor, st.row_budgets)
        row_budgets[rows.to(row_budgets.device)] = budget.to(row_budgets.device)
        st.budget = int(row_budgets.max())
    return lis


def cut(cfg: StepConfig, guard: Guard, st: LayerState, deferred: Deferred, cache: Any, li: int,
        n_layers: int) -> bool:
    """Step 3 on one layer: its prefilled rows cut to their allocated budgets. Returns whether
    any row evicted (the layer is then stored compacted)."""
    layer = cache.layers[li]
    keys, values = view_of(layer, st.pad).kv()
    B, H, T, _ = keys.shape
    budgets = cast(torch.Tensor, st.row_budgets)
    evicting = deferred.cut.to(budgets.device) & (_real(st, H, T, B).to(budgets.device) > H * budgets)
    if not bool(evicting.any()):
        return False
    window = st.window
    empty = keys.new_zeros(B, 0, deferred.module.o_proj.weight.shape[0])
    obs = PaddedObservation(
        module=deferred.module, layer_idx=li, n_layers=n_layers, phase="prefill", keys=keys, values=values,
        positions=cast(torch.Tensor, st.positions), state=st.state, scratch=st.scratch, hidden_states=empty,
        position_embeddings=(empty, empty), query_positions=torch.zeros(B, 0, dtype=torch.long, device=keys.device),
        window=cfg.needs.window, window_buffer=window, valid=cast(torch.Tensor, st.positions) >= 0, phases=cfg.phases,
    )
    obs.rows = deferred.rows
    kept = kept_mask(cfg, st, obs, guard, evicting)
    keys, values = compact_rows(st, keys, values, kept)
    store_padded(cache, li, keys, values, None)
    return True


__all__ = ["Deferred", "allocate", "check_allocation", "cut"]
