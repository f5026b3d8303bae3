"""`h2o_prefill`: the KVCache-Factory variant of H2O, a one-shot prefill eviction.

Not H2O itself. H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference
of Large Language Models", NeurIPS 2023, arXiv 2306.14048; FMInference/H2O) accumulates attention
over every step and evicts one token per decode step (evictkit's `h2o`). KVCache-Factory
(Zefan-Cai/KVCache-Factory, `pyramidkv/pyramidkv_utils.py`, `H2OKVCluster.update_kv`) ships a
different algorithm under that name, reproduced here so results can be compared with it:

Score of a prompt key = sum over *all* prompt queries of their causal fp32 attention to it
(column sums), reduced over each KV head's query-head group; keep the top `budget - window`
prefix keys plus the newest `window`. No pooling, prefill only, the cache grows while decoding.

Defaults: window=32 (the reference's `init_H2O`; its LongBench script uses 8), gqa="mean".

Deviations from the reference:
- GQA: scores reduced to KV heads (mean by default) and H_kv heads cached; the reference expands
  K/V to the query heads.
- Kept indices sorted ascending, ties to the more recent key (the reference keeps score order).
- The attention is recomputed from the re-projected queries in chunks of queries, so memory
  stays bounded for long prompts (the reference materialises the full n x n matrix).
- At decode time, only when forced with `evictkit.compress(..., phase="decode"|"both")`, the
  prompt's queries are gone: the sum runs over the newest `window` queries (the core's rolling
  buffer), which makes the decode-time score SnapKV's without pooling.

Padded batches: padding keys get no attention from real queries and padding queries add nothing
(the key mask `obs.valid`); padding is never kept.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import GQA_REDUCTIONS, attention_column_sums, int_at_least, one_of, reduce_gqa


@attrs.define(frozen=True, kw_only=True)
class H2OPrefill(ScorePolicy):
    """H2O-prefill (KVCache-Factory variant): column sums of all prompt queries' attention.

    Parameters: `window` (32) newest entries always kept; `gqa` ("mean" or "max").

    Per prefill chunk: column sums of the chunk's own queries (entries kept from earlier chunks
    were chosen by theirs); the reference defines one-shot prefill only
    """

    name: ClassVar[str] = "h2o_prefill"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "H2O-prefill (KVCache-Factory variant): all-query attention sums, one shot"

    window: int = attrs.field(default=32, validator=int_at_least(1))
    gqa: str = attrs.field(default="mean", validator=one_of(GQA_REDUCTIONS))

    def needs(self) -> Needs:
        return Needs(window=self.window, queries=True, attention_weights=True, padding=True)

    def protected(self) -> tuple[int, int]:
        return (0, self.window)

    def score(self, obs: Observation) -> torch.Tensor:
        if obs.phase != "prefill":
            return reduce_gqa(obs.window_attention.sum(dim=2), obs.n_kv_heads, self.gqa)
        # the key mask hides padding keys from real queries and zeroes padding queries' rows
        sums = attention_column_sums(obs.queries, obs.keys, obs.query_positions, obs.positions, obs.scaling,
                                     obs.softcap, obs.valid)
        if obs.rows is not None and not bool(obs.rows.prefill.all()):
            # a padded batch's rows in both phases (a one-token question beside longer ones): each its own
            sums = torch.where(obs.rows.prefill[:, None, None], sums, obs.window_attention.sum(dim=2))
        return reduce_gqa(sums, obs.n_kv_heads, self.gqa)


@hookimpl
def evictkit_register_policies(register):
    register(H2OPrefill)
