"""`snapkv`: keep the prefix keys the observation window attends to most, plus the window.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469; reference implementation FasterDecoding/SnapKV
(`snapkv/monkeypatch/snapkv_utils.py`, `SnapKVCluster.update_kv`), configs
`experiments/LongBench/config/ablation_c*_w32_k7_maxpool.json`.

Score of a cached key = sum over the newest `window` queries of their fp32 softmax attention
(over every cached key, causal by position), reduced over each KV head's query-head group, then
1-D pooled along the key axis (stride 1, zero padding k//2) over the prefix (everything but the
window). The shared selection keeps the top `budget - window` prefix keys plus the window.

Defaults: window=32, kernel=7, pool="max" (the authors' LongBench configs; the class default in
the reference is avg pooling with k=5), gqa="mean". Prefill only (`phases=("prefill",)`), as in
the reference; with `evictkit.compress(..., phase="decode"|"both")` the window is the rolling
buffer of the newest `window` queries the core keeps.

Deviations from the reference:
- GQA: scores are reduced to KV heads (mean over the group by default, `gqa="max"` as option)
  *before* pooling, and the cache keeps H_kv heads. The reference expands K/V to the query
  heads before compressing (G times the memory); kvpress pools per query head first and then
  averages. We reduce first, as KVCache-Factory's `kv_head` mode and AdaKV's `gqa_support` do
  (KVCache-Factory measured LongBench parity with the query-head layout), which also pools
  G times fewer rows.
- Kept indices are sorted ascending (the reference stores the prefix in score order); ties go
  to the more recent key, deterministically (the reference leaves them to `torch.topk`).
- The window counts inside the budget, as in the reference; `budget <= window` is refused.
- Softmax covers the whole cache, causal by true position: identical to the reference's
  window-causal block at prefill.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import GQA_REDUCTIONS, POOLS, a_bool, int_at_least, odd_kernel, one_of, pool1d, reduce_gqa

__all__ = ["SnapKV", "a_bool", "int_at_least", "odd_kernel", "one_of", "window_scores"]  # validators re-exported


# --- validators shared by the built-in policies (pyramidkv, adakv, h2o_prefill, tova, restkv) --
def window_scores(obs: Observation, window: int, kernel: int, pool: str, gqa: str) -> torch.Tensor:
    """SnapKV scores [B, H_kv, T] (fp32): window-attention column sums, GQA-reduced, prefix pooled.

    The newest `window` slots are not pooled (they are protected, and the reference pools the
    prefix only, so their own high self-attention does not spill onto the prefix).
    """
    attn = obs.window_attention  # [B, H_q, w, T] fp32
    summed = reduce_gqa(attn.sum(dim=2), obs.n_kv_heads, gqa)  # [B, H_kv, T]
    T = summed.shape[-1]
    cut = max(T - window, 0)
    if cut == 0:
        return summed
    prefix = pool1d(summed[..., :cut].contiguous(), kernel, pool)
    return torch.cat([prefix, summed[..., cut:]], dim=-1)


@attrs.define(frozen=True, kw_only=True)
class SnapKV(ScorePolicy):
    """Observation-window attention, pooled; keeps top (budget - window) prefix keys + window.

    Parameters: `window` (32) newest queries that vote and are always kept; `kernel` (7, odd)
    pooling width; `pool` ("max", "avg" counting zero padding, or "none"); `gqa` ("mean" or
    "max") reduction of query heads to KV heads.

    Per prefill chunk: scores the cache with the chunk's last `window` queries (the rolling
    window when a chunk is shorter); the reference defines one-shot prefill only
    """

    name: ClassVar[str] = "snapkv"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "observation-window attention, pooled (prefill)"

    window: int = attrs.field(default=32, validator=int_at_least(1))
    kernel: int = attrs.field(default=7, validator=odd_kernel)
    pool: str = attrs.field(default="max", validator=one_of(POOLS))
    gqa: str = attrs.field(default="mean", validator=one_of(GQA_REDUCTIONS))

    def needs(self) -> Needs:
        return Needs(window=self.window, padding=True)

    def protected(self) -> tuple[int, int]:
        return (0, self.window)

    def score(self, obs: Observation) -> torch.Tensor:
        return window_scores(obs, self.window, self.kernel, self.pool, self.gqa)


@hookimpl
def evictkit_register_policies(register):
    register(SnapKV)
