"""`adakv`: per-head budgets inside a layer, allocated by a global top-k over the heads' scores.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for Efficient
LLM Inference", arXiv 2407.11550; reference implementation FFY0/AdaKV
(`adaptive_snapkv/monkeypatch/snapkv_utils.py`, `AdaptiveSnapKVCluster.update_kv`);
kvpress `AdaKVPress` is a masking-only re-implementation.

A wrapped scorer (default `snapkv`) scores every cached key per KV head. With a per-head average
of `B = budget - window` evictable entries (sinks, if the scorer declares any, also protected):
1. take the top `H_kv * B` scores over *all* the layer's heads (protected slots excluded) and
   count `n_h`, how many fall in head h;
2. give head h `cap_h = floor(alpha * B) + n_h * (B - floor(alpha * B)) / B` entries, rounded by
   the largest-remainder method so that the caps sum to exactly `H_kv * B` (ties to the lower head);
3. head h keeps its own top `cap_h` keys plus the protected window.

Padded batches: the top-k, the caps and each head's ranking count each row's real entries only
(`obs.valid`), sinks from its first real slot (stepped row by row for now, see `needs`).

The cache really shrinks: the layer is stored left-padded to its longest head and the padding is
masked out of attention (evictkit.ragged), so the memory saved is that of the longest head. The
layer total is exactly `H_kv * min(T, budget)` real entries.

Defaults: scorer="snapkv" (window=32, kernel=7, pool="max", as the reference), alpha=0.2 (the
reference's LongBench `--floor_alpha 0.2`), window=32, normalize=False, skip=0,
pyram_mode=False, pyram_beta=20 (the reference's defaults). Prefill only, as the reference.
Parameters: `scorer`, the wrapped score policy: an instance (`AdaKV(scorer=SnapKV(window=16),
window=16)`, as kvpress wraps a press with `AdaKVPress(press)`; nothing is looked up) or a
registered name (the string path: "snapkv", built through the registry with `window` and
`scorer_options`, as `evictkit list` and the command line give it); either way a ScorePolicy with
a `window` parameter. `alpha` in [0, 1] (fraction of B every head is guaranteed; 1 = uniform
SnapKV), `window` (the scorer's window: passed to a scorer given by name, and equal to an
instance's own), `scorer_options` (extra parameters of a scorer given by name, e.g.
{"kernel": 5}), and the reference's options:
- `normalize`: before the global top-k, weigh each head's scores by the share of its score mass
  that its own top B hold (heads whose attention is concentrated count for more);
- `skip`: layers below this index get uniform caps (B per head, plain scorer selection);
- `pyram_mode`: PyramidKV's per-layer budgets (`pyramidkv.pyramid_budgets`, slope
  `pyram_beta`) before the per-head allocation.

Deviations from the reference:
- Caps: the reference rounds `n_h (1 - alpha) + floor(alpha B)` per head, so the total is only
  about `H B` (short by up to `H * frac(alpha B)` plus rounding); we scale the adaptive part by
  `(B - floor(alpha B)) / B` and round to an exact total (identical when alpha * B is an integer).
  At decode time (only when forced with phase="decode"|"both") a cap is also clamped to the
  head's real entries and the excess goes to the heads that asked most.
- GQA: budgets per KV head on group-reduced scores (the reference's `gqa_support` mode); the
  reference's default expands K/V to the query heads.
- Storage: left-padded rectangular tensors with a per-head attention mask (needs sdpa or eager
  attention) instead of the reference's flattened varlen layout and CUDA kernel; batches > 1
  work (the reference asserts B = 1).
- Kept indices ascending within each head (the reference keeps descending score order); ties
  go to the more recent key, then to the lower head, deterministically.
- `pyram_mode` uses evictkit's PyramidKV schedule (exact linear ramp, per-layer budgets summing
  to exactly L * budget; see plugins/pyramidkv.py) where the reference floors the step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import RaggedSelection, a_bool, int_at_least, windowed_scorer
from evictkit.plugins.pyramidkv import pyramid_budgets


def allocate_head_budgets(
    counts: torch.Tensor, per_head: int, alpha: float, limit: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head caps [B, H] summing to H * per_head, at least floor(alpha * per_head) each.

    counts: [B, H] ints summing to H * per_head per row, how many of the layer's global top
        H * per_head scores fall in each head.
    limit: optional [B, H] most entries each head can give (decode time); excess is moved to the
        heads with room, those with the larger counts first.
    """
    B, H = counts.shape
    total = H * per_head
    counts = counts.long()
    if not bool((counts.sum(-1) == total).all()):
        raise ValueError(f"counts must sum to H * per_head = {total} per row, got {counts.sum(-1).tolist()}")
    floor_cap = math.floor(alpha * per_head + 1e-9)  # 1e-9: 0.29 * 100 must give 29, not 28
    rest = total - H * floor_cap
    share, rem = (counts * rest) // total, (counts * rest) % total
    short = rest - share.sum(-1)  # [B], < H
    order = torch.argsort(-rem, dim=-1, stable=True)  # largest remainder first, ties to the lower head
    bonus = (torch.arange(H, device=counts.device) < short[:, None]).long()
    share = share.scatter_add(-1, order, bonus)
    caps = floor_cap + share
    if limit is not None:
        caps = _clamp(caps, counts, limit.long())
    return caps


def _clamp(caps: torch.Tensor, counts: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    caps = caps.clone()
    for b in range(caps.shape[0]):
        excess = int((caps[b] - limit[b]).clamp(min=0).sum())
        if not excess:
            continue
        caps[b] = torch.minimum(caps[b], limit[b])
        for h in torch.argsort(-counts[b], stable=True).tolist():
            give = min(excess, int(limit[b, h] - caps[b, h]))
            caps[b, h] += give
            excess -= give
            if not excess:
                break
    return caps


def _as_options(value: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return tuple(value)


def _check_alpha(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{attr.name}={value!r}: must be a number in [0, 1] (the guaranteed fraction of each head's budget)"
        )


def mass_share_weights(scores: torch.Tensor, candidate: torch.Tensor, per_head: int) -> torch.Tensor:
    """AdaKV's `normalize`: per head, (sum of its top `per_head` candidate scores) / (sum of all
    its candidate scores); [B, H, T] scores and mask -> [B, H, 1]. 1 where a head has no mass."""
    vals = scores.masked_fill(~candidate, 0.0)
    top = vals.topk(min(per_head, vals.shape[-1]), dim=-1).values.sum(-1, keepdim=True)
    total = vals.sum(-1, keepdim=True)
    return torch.where(total > 0, top / total.clamp_min(torch.finfo(total.dtype).tiny), torch.ones_like(total))


@attrs.define(frozen=True, kw_only=True)
class AdaKV(ScorePolicy):
    """Adaptive per-head budgets on top of a window scorer (default SnapKV); ragged heads.

    Per prefill chunk: scores the cache with the chunk's last `window` queries (the rolling
    window when a chunk is shorter) and re-allocates the layer's budget across heads after each
    chunk; the reference defines one-shot prefill only
    """

    name: ClassVar[str] = "adakv"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "SnapKV scores with per-head budgets from a global top-k (prefill, ragged heads)"

    scorer: str | ScorePolicy = attrs.field(default="snapkv")
    alpha: float = attrs.field(default=0.2, validator=_check_alpha)
    window: int = attrs.field(default=32, validator=int_at_least(1))
    scorer_options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_as_options)
    normalize: bool = attrs.field(default=False, validator=a_bool)
    skip: int = attrs.field(default=0, validator=int_at_least(0))
    pyram_mode: bool = attrs.field(default=False, validator=a_bool)
    pyram_beta: int = attrs.field(default=20, validator=int_at_least(1))
    _base: ScorePolicy = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        base = windowed_scorer(type(self), self.scorer, self.window, self.scorer_options)
        object.__setattr__(self, "_base", base)  # derived from the fields once: a hyper-parameter, not state

    def needs(self) -> Needs:
        # padding is honoured (see the docstring) whenever the scorer's scores honour it
        return attrs.evolve(self._base.needs(), ragged_heads=True)

    def protected(self) -> tuple[int, int]:
        return self._base.protected()

    def score(self, obs: Observation) -> torch.Tensor:
        return self._base.score(obs)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, length: int) -> int:
        if not self.pyram_mode:
            return budget
        sinks, window = self.protected()
        return pyramid_budgets(budget, sinks + window, n_layers, length, self.pyram_beta)[layer_idx]

    def select(self, obs: Observation, budget: int) -> RaggedSelection:
        """Ragged selection: idx [B, H_kv, K] right-aligned per head, counts [B, H_kv]."""
        scores = self.score(obs).float()
        B, H, T = scores.shape
        if torch.isnan(scores).any():
            raise ValueError(f"policy {self.name!r}: scorer {self.scorer!r} returned NaN scores")
        sinks, window = self.protected()
        slots = torch.arange(T, device=scores.device)
        valid = obs.valid if obs.valid is not None else torch.ones(B, H, T, dtype=torch.bool, device=scores.device)
        rank = valid.long().cumsum(-1) - 1  # index among the head's real entries
        protected = valid & ((rank < sinks) | (slots >= T - window))
        candidate = valid & ~protected
        per_head = budget - sinks - window

        masked = scores.masked_fill(~candidate, float("-inf"))
        if obs.layer_idx < self.skip:  # the reference's uniform lower layers
            counts = torch.full((B, H), per_head, dtype=torch.long, device=scores.device)
        else:
            weighted = masked * mass_share_weights(scores, candidate, per_head) if self.normalize else masked
            # Global top-k over the layer: flattened newest-first, heads interleaved, so a stable
            # sort breaks ties toward the more recent key, then the lower head.
            flat = weighted.flip(-1).transpose(1, 2).reshape(B, T * H)
            top = torch.argsort(flat, dim=-1, descending=True, stable=True)[:, : H * per_head]
            counts = torch.zeros(B, H, dtype=torch.long, device=scores.device).scatter_add_(
                -1, top % H, torch.ones_like(top)
            )
        caps = allocate_head_budgets(counts, per_head, self.alpha, limit=candidate.sum(-1))

        order = torch.argsort(masked.flip(-1), dim=-1, descending=True, stable=True)
        head_rank = torch.empty_like(order).scatter_(-1, order, slots.expand(B, H, T)).flip(-1)
        keep = protected | (candidate & (head_rank < caps[..., None]))
        kept = keep.sum(-1)
        K = int(kept.max())
        # kept slots ascending, right-aligned: unkept ones sort first as -1
        idx = torch.where(keep, slots, -1).sort(dim=-1).values[..., T - K :]
        return RaggedSelection(idx, kept)


@hookimpl
def evictkit_register_policies(register):
    register(AdaKV)
