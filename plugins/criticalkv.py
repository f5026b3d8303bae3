"""`criticalkv`: any scorer, re-weighted by how much each entry's value moves the layer's output.

Feng et al., "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective", arXiv 2502.03805; reference implementation NVIDIA/kvpress 0.5.5
(`kvpress/presses/criticalkv_press.py`, `CriticalKVPress`, a wrapper over any ScorerPress). No
authors' code was read.

Two stages around a wrapped scorer (`scorer`, a registered score policy) with scores s:
1. The top `floor(budget * first_stage_ratio)` entries by s (at least 1), the scorer's protected
   sinks and window first, are kept outright.
2. Every entry is re-scored s' = (s + `epsilon`) * n, where n is the L1 norm of its value pushed
   through the output projection, |v W_O^(h)|_1 over the hidden size, for each query head h of
   the entry's KV head (W_O^(h): that head's D columns of `o_proj.weight`), averaged over the
   group. The remaining budget goes to the highest s' among the other entries.
Only the scorer's `score()` is used, so scorers with a selection of their own (adakv's per-head
budgets, keydiff's block mode, h2o, restkv) are refused. The scorer's protected entries are
always kept; its `needs`, `protected`, `check_budget`, `layer_budget` and `observe` are the
policy's own, so `criticalkv` over `pyramidkv` keeps the pyramid's per-layer budgets. It reads
the layer's `o_proj` weight besides what the scorer reads; the value projection is computed in
fp32, one query head at a time ([B, T, hidden] each).
Padded batches: padding as the scorer honours it (`padding` is the scorer's); both stages skip
padding slots (`valid=obs.valid`) and the scorer's sinks count from each row's first real slot.

Defaults (kvpress's): scorer="snapkv" (the paper's main pairing; kvpress's README wraps KnormPress),
scorer_options=() (e.g. {"window": 64, "kernel": 5}), epsilon=1e-4, first_stage_ratio=0.5.
Prefill only, as kvpress.

Notes and deviations:
- The weighting assumes scores >= 0 (attention mass). With a signed scorer (knorm's -|k|,
  keydiff's -cos) a larger value norm lowers the score, as it does in kvpress; kvpress also warns
  that ExpectedAttention's own value-norm weighting (`vnorm`) should be off under CriticalKV.
- kvpress sizes stage 1 as int((1 - r) T first_stage_ratio) from its unrounded ratio; evictkit
  from the integer budget. The two agree whenever (1 - r) T lies within half an entry above the
  budget (the side-by-side's mapping); the kept count is the budget either way.
- Protected entries: kvpress's scorers give their window or sinks the score max + 1, so they
  fill stage 1 first, as here; when stage 1 is smaller than the protected set kvpress may then
  drop some of them, evictkit never does.
- Scores in fp32 (kvpress: the cache dtype, a bf16 sum over the hidden size); kept entries stay
  in position order and ties go to the more recent entry.
- The head-adaptive variant (kvpress `CriticalAdaKVPress`) is not this policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
import torch

from evictkit import Needs, Observation, Policy, ScorePolicy, hookimpl
from evictkit.helpers import select_topk


def _as_options(value: Any) -> tuple[tuple[str, Any], ...]:
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return tuple(value)


def _nonnegative(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{attr.name}={value!r}: must be a finite number >= 0")


def _fraction(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name}={value!r}: must be a number in [0, 1] (the budget's share kept by stage 1)")


def projected_value_norms(values: torch.Tensor, o_proj_weight: torch.Tensor) -> torch.Tensor:
    """|v W_O^(h)|_1 averaged over each KV head's query heads: values [B, H_kv, T, D],
    o_proj_weight [hidden, H_q * D] -> [B, H_kv, T] fp32."""
    B, Hkv, T, D = values.shape
    Hq = o_proj_weight.shape[1] // D
    G = Hq // Hkv
    weight = o_proj_weight.float()
    v = values.float()
    norms = torch.empty(B, Hq, T, dtype=torch.float32, device=values.device)
    for h in range(Hq):  # one head at a time: [B, T, hidden] instead of [B, H_q, T, hidden]
        out = v[:, h // G] @ weight[:, h * D : (h + 1) * D].T[None]
        norms[:, h] = torch.linalg.vector_norm(out, ord=1, dim=-1)
    return norms.view(B, Hkv, G, T).mean(dim=2)


def _wrappable(cls: type | None) -> bool:
    """A registered score policy whose selection is the shared one (no own select, not CriticalKV)."""
    return (cls is not None and issubclass(cls, ScorePolicy) and not issubclass(cls, CriticalKV)
            and getattr(cls, "select", None) is ScorePolicy.select)


@attrs.define(frozen=True, kw_only=True)
class CriticalKV(Policy):
    """Two-stage selection: the scorer's best half, then the rest by score x projected value norm.

    Parameters: `scorer` ("snapkv", a registered score policy), `scorer_options` (its parameters,
    a mapping or pairs), `epsilon` (1e-4) added to the scores before the weighting,
    `first_stage_ratio` (0.5) share of the budget chosen by the scorer alone.

    Per prefill chunk: the wrapped scorer's chunk scores, re-weighted after each chunk
    """

    name: ClassVar[str] = "criticalkv"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "any scorer, re-weighted by the value's output-projection norm (CriticalKV wrapper)"

    scorer: str = attrs.field(default="snapkv")
    scorer_options: tuple[tuple[str, Any], ...] = attrs.field(default=(), converter=_as_options)
    epsilon: float = attrs.field(default=1e-4, validator=_nonnegative)
    first_stage_ratio: float = attrs.field(default=0.5, validator=_fraction)
    _base: ScorePolicy = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        import evictkit

        table = evictkit.policies()
        if not _wrappable(table.get(self.scorer) if isinstance(self.scorer, str) else None):
            usable = ", ".join(n for n, c in table.items() if _wrappable(c)) or "none registered"
            raise ValueError(f"scorer={self.scorer!r}: must be a registered score policy with the shared selection "
                             f"({usable})")
        try:
            base = evictkit.policy(self.scorer, **dict(self.scorer_options))
        except TypeError as exc:  # an unknown option
            raise ValueError(f"scorer_options={dict(self.scorer_options)!r}: {exc}") from exc
        object.__setattr__(self, "_base", base)

    def needs(self) -> Needs:
        # o_proj, besides the scorer's reads; padding honoured as the scorer does (both stages skip it)
        return attrs.evolve(self._base.needs(), layer_weights=True)

    def protected(self) -> tuple[int, int]:
        return self._base.protected()

    def check_budget(self, budget: int) -> None:
        self._base.check_budget(budget)

    def layer_budget(self, budget: int, layer_idx: int, n_layers: int, length: int) -> int:
        return self._base.layer_budget(budget, layer_idx, n_layers, length)

    def observe(self, obs: Observation) -> Mapping[str, torch.Tensor]:
        return self._base.observe(obs)

    def select(self, obs: Observation, budget: int) -> torch.Tensor:
        scores = self._base.score(obs).float()
        B, H, T = scores.shape
        sinks, window = self.protected()
        valid = obs.valid
        if budget >= T:
            return select_topk(scores, budget, sinks=sinks, window=window, policy=self.name, valid=valid)
        first = int(budget * self.first_stage_ratio)
        if self.first_stage_ratio > 0:
            first = max(1, first)
        weighted = (scores + self.epsilon) * projected_value_norms(obs.values, obs.o_proj_weight)
        if valid is not None:  # padding values are junk: their weighted scores must not be inf or NaN
            weighted = weighted.masked_fill(~valid, 0.0)
        if first:
            stage1 = select_topk(scores, first, sinks=sinks, window=window, policy=self.name, valid=valid)
            weighted = weighted.scatter(-1, stage1, float("inf"))
        return select_topk(weighted, budget, sinks=sinks, window=window, policy=self.name, valid=valid)


@hookimpl
def evictkit_register_policies(register):
    register(CriticalKV)
