"""`h2o`: Heavy-Hitter Oracle, the real-drop variant that evicts after every forward.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048; reference implementation FMInference/H2O
(`h2o_hf/utils_real_drop/modify_llama.py`, `H2OKVCache_LayerWise`).

Score: a key's attention accumulated over every query that saw it while it was cached. Each
forward adds the column sums of the current queries' attention (softmax over every cached key
and the current tokens, causal by position, fp32) to the running score of the surviving keys;
new keys start at 0. The running score travels with K/V as the side tensor "h2o" (returned by
`observe`), so it is compacted with the cache and never kept on the policy object.
Selection: the `recent` newest slots are kept, then the top `budget - recent` of the rest
(heavy hitters); ties go to the more recent token; kept entries keep their order. It evicts
after every forward, prefill included, down to the budget (phases "prefill", "decode").

Defaults: recent = None -> budget // 2, at least 1 (the paper splits the budget half heavy,
half recent; the reference's class default is hh=4, recent=512, its demo 48 / 2000). With
recent=0 the newest token competes like any other (the policy then declares
`may_evict_newest`).

Deviations from the reference:
- GQA: the reference scores query heads and breaks on GQA models (H2O issue #32). evictkit
  keeps one score per KV head: the mean over the head's query-head group of the per-query-head
  scores (equal to their sum / G, so the ranking inside a KV head is the group sum's). With
  one query head per KV head this is the reference score exactly.
- Batch: the reference sums scores over the batch (it assumes B = 1); evictkit scores each
  batch row separately.
- Attention is recomputed from the cached post-RoPE keys and re-projected queries (SDPA and
  flash return no weights), in query chunks at prefill to bound memory.
- With slack > 0 the score still accumulates at every forward, but eviction runs only when a
  layer exceeds budget + slack.

Padded batches: padding queries add nothing to the running score and padding keys get no
attention (the key mask `obs.valid`); padding is never kept and the recent window is the
newest real slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import attention_column_sums, reduce_gqa, select_topk

STATE = "h2o"


def _recent_valid(instance: object, attribute: attrs.Attribute, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"recent={value!r}: must be None (budget // 2) or an int >= 0 (newest slots always kept)")


def accumulated_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Column sums of the queries' attention, reduced to KV heads by the group mean.

    queries: [B, H_q, q, D] (post-RoPE); keys: [B, H_kv, T, D]; query_positions: [B, q];
    key_positions: [B, H_kv, T]; key_mask: optional [B, H_kv, T] bool (False = padding slot).
    Returns fp32 [B, H_kv, T]: sum over the q queries of the attention each key received
    (0 where the key is later than the query).
    """
    sums = attention_column_sums(queries, keys, query_positions, key_positions, scaling, softcap, key_mask)
    return reduce_gqa(sums, keys.shape[1], "mean")


@attrs.define(frozen=True, kw_only=True)
class H2O(ScorePolicy):
    """Accumulated attention (heavy hitters) + a recent window.

    Parameters: `recent` (None = max(1, budget // 2); else an int in [0, budget)).

    Per prefill chunk: adds each chunk's queries' attention to the running scores and evicts to
    the budget, as the reference does token by token
    """

    name: ClassVar[str] = "h2o"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    summary: ClassVar[str] = "accumulated attention (heavy hitters) + recent window, every step"

    recent: int | None = attrs.field(default=None, validator=_recent_valid)

    def needs(self) -> Needs:
        # Only a zero window leaves the newest token to the heavy-hitter ranking.
        return Needs(queries=True, attention_weights=True, may_evict_newest=self.recent == 0, padding=True)

    def protected(self) -> tuple[int, int]:
        # With recent=None the window depends on the budget; select() applies it.
        return (0, self.recent or 0)

    def check_budget(self, budget: int) -> None:
        if self.recent is not None and self.recent >= budget:
            raise ValueError(
                f"recent={self.recent} must be smaller than budget={budget} (the rest of the budget holds "
                "the heavy hitters); lower recent or raise the budget"
            )

    def window_for(self, budget: int) -> int:
        """Recent slots kept for a layer budget (None: half of it, at least the newest token)."""
        return max(1, budget // 2) if self.recent is None else self.recent

    def observe(self, obs: Observation) -> Mapping[str, torch.Tensor]:
        added = accumulated_attention(
            obs.queries, obs.keys, obs.query_positions, obs.positions, obs.scaling, obs.softcap, obs.valid
        )
        previous = obs.state.get(STATE)
        return {STATE: added if previous is None else previous + added}

    def score(self, obs: Observation) -> torch.Tensor:
        # The core stores observe()'s result before it asks for a selection.
        return obs.state[STATE]

    def select(self, obs: Observation, budget: int) -> torch.Tensor:
        return select_topk(self.score(obs), budget, window=self.window_for(budget), policy=self.name, valid=obs.valid)


@hookimpl
def evictkit_register_policies(register):
    register(H2O)
