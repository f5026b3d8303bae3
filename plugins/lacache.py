"""`lacache`: ladder-shaped KV cache with iterative compaction (positional, no scores).

Shi et al., "LaCache: Ladder-Shaped KV Caching for Efficient Long-Context Modeling of Large
Language Models", ICML 2025, arXiv 2507.14204; reference implementation GATECH-EIC/LaCache
(`ppl/lacache/kv_cache.py`, class `LaCache`; the LongBench/niah copies add `start_size`).

The index logic follows the reference code (not the paper's figure, which could not be checked):
- Constants for L layers, span S, overlap O: a ladder block holds `Bk = 1 + ceil((L - S) / (S - O))`
  tokens, each layer keeps `Ak = min(ceil(S / (S - O)), Bk)` of them and frees `R = Bk - Ak`.
- Layer i keeps the block offsets `(i mod (R + 1)) + k`, k < Ak: a staircase that repeats every
  R + 1 layers (for L/S/O = 32/16/0 even layers keep even tokens, odd layers odd ones).
- A cursor (per sequence, starts at the sinks) separates the compacted ladder region from the
  newest tokens. An eviction compacts the `ceil(need / R)` oldest uncompacted blocks, always
  leaving at least L newest tokens untouched; when that room runs out it "starts over": it
  compacts what room allows, then re-compacts the whole ladder region from the sinks with a
  coarser block (kept entries `t` apart), so density falls off geometrically with age.
- The first overflow raises the capacity once by floor(R / 2) (the reference's compensation).
Every head of a layer keeps the same tokens (every row too, except in a padded batch); every
layer keeps the same count.

Budget (evictkit choice, documented deviation): `budget` is the hard cap, i.e. the peak size
the reference reaches: evictkit runs the reference logic with cache_size = budget - floor(R / 2),
so after the compensation the capacity equals the budget. Since whole blocks are freed, a layer
can hold fewer than `budget` entries after an eviction (by less than the block's R, or R' after
a start-over); the policy declares `Needs(exact_budget=False)` and the core accepts fewer, never more.
The per-sequence cursor and compensation flag live in `obs.scratch` (reset with each sequence);
every layer keeps its own copy, and the copies agree because every layer sees the same lengths.

Defaults: span=16, overlap=0, sinks=4 (the reference's ppl setting; its LongBench default for
the sinks is 128), positions="absolute".

positions: the reference uses StreamingLLM's pos-shift (pre-RoPE keys re-rotated to cache
positions every step); that is `positions="shift"` here (exact re-rotation after each eviction,
see evictkit.positions). The default is "absolute", evictkit's rule that new tokens get their
true positions, like every other built-in policy.

Other deviations: the reference compacts once after a full prefill and then after each decode
step; evictkit does the same in phases ("prefill", "decode"), or every `slack + 1` steps with
slack > 0 (the logic then frees more at once). Constraints the reference leaves to a
ZeroDivisionError are ValueErrors here: span < L, overlap < span, R >= 1 and
budget >= sinks + L + Bk + floor(R / 2) (room for one whole ladder block beside the L newest
tokens once the capacity is the budget minus the compensation).

Padded batches (`Needs.padding`): stepped as one. Each row runs the ladder of its real length
from its first real slot (one ladder per distinct length and state), with its own cursor: in a
padded batch `obs.scratch` holds one state per row (None before the row's first eviction), and a
select() call advances only the rows it decides (`obs.rows.selecting`). Rows of one budget may
keep different counts, so the selection is ragged (`(idx, counts)`, at most H x budget per row).
The per-row states are not permuted by a reorder of the batch rows (evictkit.step.reorder_rows
does not touch scratch): beam search only moves rows among one prompt's beams, whose states are
equal (same lengths, same budget), but a reorder across prompts of different lengths would leave
the cursors with the wrong rows.

Two departures where the reference's lists break (both only in one-shot compactions of prompts
many times the budget, never in its token-by-token ppl stream):
- A start-over that asks for more coarse blocks than lie before the newest L tokens: the
  reference's tail range comes out empty and drops those tokens; evictkit stops at them (a
  coarser block if not even one fits) and runs another pass on the result.
- With t > 1 and Ak > 1 the reference's staircase offset `i mod (Bk' - Ak + 1)` plus the
  spacing t reaches into the next block (unsorted, repeated slots); evictkit uses
  `i mod (Bk' - t (Ak - 1))`, which equals the reference's whenever t == 1 or Ak == 1.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, Policy, hookimpl
from evictkit.helpers import POSITION_MODES, RaggedSelection, int_at_least

SCRATCH = "lacache"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@attrs.frozen
class LadderShape:
    """Block (Bk), kept per block per layer (Ak) and freed per block (R = Bk - Ak)."""

    block: int
    keep: int
    free: int


def ladder_shape(n_layers: int, span: int, overlap: int) -> LadderShape:
    """The ladder constants; ValueError when the reference would divide by zero."""
    if overlap < 0:
        raise ValueError(f"overlap={overlap}: must be >= 0")
    if span <= overlap:
        raise ValueError(f"overlap={overlap} must be smaller than span={span}")
    if span >= n_layers:
        raise ValueError(f"span={span} must be smaller than the number of layers ({n_layers})")
    step = span - overlap
    block = 1 + _ceil_div(n_layers - span, step)
    keep = min(_ceil_div(span, step), block)
    if block == keep:
        raise ValueError(
            f"span={span}, overlap={overlap} free nothing on a {n_layers}-layer model "
            "(every layer would keep the whole ladder block); lower overlap or span"
        )
    return LadderShape(block, keep, block - keep)


@attrs.frozen
class LadderState:
    """Per-sequence state: `cursor` (end of the compacted region, in current-cache slots),
    `capacity` (the reference's cache_size) and whether the compensation was applied."""

    cursor: int
    capacity: int
    compensated: bool = False


def _rungs(start: int, n_blocks: int, block: int, keep: int, spacing: int, offset: int) -> torch.Tensor:
    """Slots start + offset + block * j + spacing * k for j < n_blocks, k < keep (ascending)."""
    j = torch.arange(n_blocks).unsqueeze(1) * block
    k = torch.arange(keep).unsqueeze(0) * spacing
    return (start + offset + j + k).flatten()


def ladder_indices(
    length: int,
    layer: int,
    n_layers: int,
    *,
    sinks: int,
    span: int,
    overlap: int,
    state: LadderState,
) -> tuple[torch.Tensor, LadderState]:
    """One LaCache compaction of a cache of `length` entries for `layer`.

    Returns the kept slots (int64 [K], strictly increasing; all slots when nothing is over
    capacity) and the state after the step (the same for every layer). One pass of the
    reference logic, repeated only when a start-over had to stop short of the newest tokens.
    """
    idx = torch.arange(length)
    while True:
        step, state, done = _one_pass(idx.numel(), layer, n_layers, sinks, span, overlap, state)
        idx = idx[step]
        if done:
            return idx, state


def _one_pass(
    length: int, layer: int, n_layers: int, sinks: int, span: int, overlap: int, state: LadderState
) -> tuple[torch.Tensor, LadderState, bool]:
    shape = ladder_shape(n_layers, span, overlap)
    block, keep, free = shape.block, shape.keep, shape.free
    if length <= state.capacity:
        return torch.arange(length), state, True
    capacity = state.capacity if state.compensated else state.capacity + free // 2
    need = length - capacity
    room = capacity - state.cursor - n_layers  # the newest n_layers tokens stay uncompacted
    fits = (room // keep) * free
    n_blocks = _ceil_div(need, free) if need <= fits else room // keep
    first = torch.cat(
        [
            torch.arange(state.cursor),
            _rungs(state.cursor, n_blocks, block, keep, 1, layer % (free + 1)),
            torch.arange(state.cursor + block * n_blocks, length),
        ]
    )
    if need <= fits:
        return first, LadderState(cursor=state.cursor + n_blocks * keep, capacity=capacity, compensated=True), True

    # Start over: re-compact the whole ladder region from the sinks with a block `times` coarser.
    rest = need - fits
    per_pass = ((capacity - sinks - n_layers) // keep) * free
    times = _ceil_div(rest, per_pass)
    block2 = block + (times - 1) * (block - 1)
    n_blocks2 = _ceil_div(rest, block2 - keep)
    # A prompt many times the capacity, compacted at once, can ask for more blocks than lie
    # before the newest n_layers tokens; the reference then drops those tokens (its tail range
    # comes out empty). Stop at them instead and let another pass free the rest.
    region = first.numel() - n_layers - sinks
    done = n_blocks2 * block2 <= region
    if not done:
        if block2 > region:  # not one coarse block fits: the coarsest block that does
            times = (region - 1) // (block - 1)
            if times < 1:
                raise RuntimeError(
                    f"lacache cannot compact {length} entries to {capacity}: fewer than one ladder "
                    f"block ({block}) lies between the sinks and the newest {n_layers} tokens; raise the budget"
                )
            block2 = block + (times - 1) * (block - 1)
        n_blocks2 = region // block2
    # The reference staircases with layer % (free2 + 1); with times > 1 and keep > 1 a rung
    # spaced `times` apart then reaches into the next block (unsorted, repeated slots). The
    # modulus below keeps every rung inside its block and equals the reference's when
    # times == 1 or keep == 1, the only cases where the reference's lists are sorted.
    stairs = block2 - times * (keep - 1)
    second = torch.cat(
        [
            torch.arange(sinks),
            _rungs(sinks, n_blocks2, block2, keep, times, layer % stairs),
            torch.arange(sinks + block2 * n_blocks2, first.numel()),
        ]
    )
    after = LadderState(cursor=sinks + n_blocks2 * keep, capacity=capacity, compensated=True)
    return first[second], after, done


@attrs.define(frozen=True, kw_only=True)
class LaCache(Policy):
    """Ladder-shaped positional cache.

    Parameters: `span` (16, < layers), `overlap` (0, < span), `sinks` (4),
    `positions` ("absolute" | "shift").

    Per prefill chunk: its iterative ladder compaction after each chunk, as the reference's
    streaming loop does
    """

    name: ClassVar[str] = "lacache"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    summary: ClassVar[str] = "ladder-shaped cache across layers, iterative compaction (positional)"

    span: int = attrs.field(default=16, validator=int_at_least(1))
    overlap: int = attrs.field(default=0, validator=int_at_least(0))
    sinks: int = attrs.field(default=4, validator=int_at_least(0))
    positions: str = attrs.field(default="absolute", validator=attrs.validators.in_(POSITION_MODES))

    def __attrs_post_init__(self) -> None:
        if self.overlap >= self.span:
            raise ValueError(f"overlap={self.overlap} must be smaller than span={self.span}")

    def needs(self) -> Needs:
        # the ladder frees whole blocks: an eviction may keep fewer than the budget, never more
        # (in a padded batch rows of one budget keep different counts: a ragged selection)
        return Needs(positions=self.positions, exact_budget=False, padding=True)

    def protected(self) -> tuple[int, int]:
        return (self.sinks, 0)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, length: int) -> int:
        # Called for every layer at the start of a sequence, before any eviction: the checks
        # that need the number of layers live here.
        shape = ladder_shape(n_layers, self.span, self.overlap)
        least = self.sinks + n_layers + shape.block + shape.free // 2
        if budget < least:
            raise ValueError(
                f"budget={budget} is too small for lacache on a {n_layers}-layer model: it needs "
                f"budget >= sinks + layers + block + floor(R/2) = {self.sinks} + {n_layers} + "
                f"{shape.block} + {shape.free // 2} = {least} (room for one ladder block beside "
                f"the newest {n_layers} tokens)"
            )
        return budget

    def capacity(self, budget: int, n_layers: int) -> int:
        """The reference's cache_size for a budget: the peak after compensation is the budget."""
        return budget - ladder_shape(n_layers, self.span, self.overlap).free // 2

    def select(self, obs: Observation, budget: int) -> torch.Tensor | RaggedSelection:
        """[B, H_kv, K] kept slots (every row and head the same); in a padded batch (`obs.rows`)
        a ragged (idx, counts): each deciding row's ladder right-aligned, counts 0 elsewhere."""
        if obs.rows is not None:
            return self._select_rows(obs, budget)
        B, H, T = obs.positions.shape
        state = obs.scratch.get(SCRATCH)
        if state is None:
            state = LadderState(cursor=self.sinks, capacity=self.capacity(budget, obs.n_layers))
        idx, state = ladder_indices(
            T, obs.layer_idx, obs.n_layers, sinks=self.sinks, span=self.span, overlap=self.overlap, state=state
        )
        obs.scratch[SCRATCH] = state
        return idx.to(obs.keys.device).expand(B, H, idx.numel())

    def _select_rows(self, obs: Observation, budget: int) -> RaggedSelection:
        """A padded batch: each row of `obs.rows.selecting` runs the ladder of its real length
        with its own state, offset by its padding (a leading prefix, the same in every head)."""
        B, H, T = obs.positions.shape
        rows = obs.rows  # evictkit.padded.Rows
        selecting = rows.selecting if rows.selecting is not None else torch.ones(B, dtype=torch.bool)
        states = obs.scratch.get(SCRATCH)
        if not isinstance(states, list):  # a batch stepped as one so far: every row had its state
            states = [states] * B
        states = list(states)  # a new list: the core may call select() again for another budget
        pad = [0] * B if obs.valid is None else (~obs.valid[:, 0]).sum(-1).tolist()
        fresh = LadderState(cursor=self.sinks, capacity=self.capacity(budget, obs.n_layers))
        ladders: dict[tuple[int, LadderState], tuple[torch.Tensor, LadderState]] = {}
        kept: dict[int, torch.Tensor] = {}
        for b in selecting.nonzero().flatten().tolist():
            key = (T - pad[b], states[b] or fresh)
            if key not in ladders:  # rows of one length and state share one ladder
                ladders[key] = ladder_indices(key[0], obs.layer_idx, obs.n_layers, sinks=self.sinks,
                                              span=self.span, overlap=self.overlap, state=key[1])
            idx, states[b] = ladders[key]
            kept[b] = idx + pad[b]
        obs.scratch[SCRATCH] = states
        K = max((k.numel() for k in kept.values()), default=0)
        idx = torch.zeros(B, K, dtype=torch.long)
        counts = torch.zeros(B, dtype=torch.long)
        for b, k in kept.items():
            idx[b, K - k.numel():] = k
            counts[b] = k.numel()
        device = obs.keys.device
        return RaggedSelection(idx.to(device)[:, None].expand(B, H, K), counts.to(device)[:, None].expand(B, H))


@hookimpl
def evictkit_register_policies(register):
    register(LaCache)
