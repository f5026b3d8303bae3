"""`tova`: Token Omission Via Attention.

Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104; reference implementation
schwartz-lab-NLP/TOVA (`src/tova_cache.py`, `TOVACache.reduce`).

Score: the attention row of the last query of the current forward (softmax over every cached
key, the current token included, fp32), averaged over all query heads of the layer, so every
KV head keeps the same tokens (layer-wise, the reference). `head_wise=True` scores each KV head
by the mean over its own query-head group instead. Nothing accumulates across steps: at
prefill only the last prompt token's row counts. It evicts after every forward, prefill
included, down to the budget (phases "prefill", "decode"); kept entries keep their order.

Defaults: head_wise=False (the reference and the paper's preferred variant); the reference's
README uses a cache of 512.

Protection: none, as in the reference: no sinks, no window, and the current token itself can be
evicted when its own attention row ranks it low (kvpress's TOVAPress forces it in; evictkit
follows the reference). Ties go to the more recent token (an evictkit choice).

Deviations: the attention row is recomputed from the cached post-RoPE keys and the re-projected
last query (the reference forces eager attention to read the weights); with slack > 0 eviction
runs only when a layer exceeds budget + slack, scored by the last query at that step.

Padded batches: the last query is each row's newest real one (the core's window skips padding
queries), padding keys get no attention, and padding is never kept.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import a_bool, reduce_gqa


def last_query_scores(attention: torch.Tensor, n_kv_heads: int, head_wise: bool) -> torch.Tensor:
    """TOVA scores from the last query's attention row.

    attention: [B, H_q, T] fp32 (softmax over the cached keys). Returns [B, H_kv, T]: the mean
    over all query heads repeated for every KV head, or (head_wise) the mean over each group.
    """
    if head_wise:
        return reduce_gqa(attention, n_kv_heads, "mean")
    B, _, T = attention.shape
    return attention.mean(dim=1, keepdim=True).expand(B, n_kv_heads, T)


@attrs.define(frozen=True, kw_only=True)
class TOVA(ScorePolicy):
    """Last query's attention, mean over heads. Parameters: `head_wise` (False).

    Per prefill chunk: the chunk's last query's attention, as at every decode step
    """

    name: ClassVar[str] = "tova"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    summary: ClassVar[str] = "last query's attention, averaged over heads, every step"

    head_wise: bool = attrs.field(default=False, validator=a_bool)

    def needs(self) -> Needs:
        # the reference may drop the newest token at decode: it competes like any other
        return Needs(window=1, may_evict_newest=True, padding=True)

    def score(self, obs: Observation) -> torch.Tensor:
        row = obs.window_attention[:, :, -1, :]  # [B, H_q, T]
        return last_query_scores(row, obs.n_kv_heads, self.head_wise)


@hookimpl
def evictkit_register_policies(register):
    register(TOVA)
