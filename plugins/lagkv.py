"""`lagkv`: score each partition of the cache by its spread relative to the next partition.

Liang et al., "LagKV: Lag-Relative Information of the KV Cache Tells Which Tokens Are
Important", arXiv 2504.04704; reference implementation NVIDIA/kvpress 0.5.5
(`kvpress/presses/lagkv_press.py`, `LagKVPress`), which this policy follows. The authors' code
(AI-Lab-China-Merchants-Bank/LagKV, `lag_kv.py`) compresses incrementally inside the cache
update instead (see below).

Score, per KV head, with S = `sinks` and L = `lag`, for a cache of T entries:
- Cut slots [S, E), E = S + floor((T - S) / L) * L, into partitions of L entries. Partition i is
  scored against partition i + 1 (its "lag" reference), so the last full partition and the
  T - E leftover entries (together the "tail") have no reference.
- For the keys, and separately the values: min-max normalise each channel of partition i by the
  reference partition's channel min and max, take each entry's standard deviation over the
  channels (unbiased), and softmax it over the L entries of the partition. The entry's score is
  the mean of the key and value scores.
- Unless `cross_scoring`, the score is replaced by the entry's rank inside its partition,
  rank / L, so every partition offers its entries in the same ladder of values.
- The sinks and the tail score 1, above every partition entry (< 1), so they are kept first.
- A cache shorter than S + 2L has no scored partition: the sinks score 1 and the other entries
  a ramp (i / (T - S), the older the lower), so the newest entries are kept (StreamingLLM-like).
Keys and values only (post-RoPE, as cached); computed in fp32.
Padded batches: sinks and partitions are counted from each head's first real slot, over its real
entries only, so a row is partitioned (and keeps) as it is alone.

Defaults (kvpress's): sinks=4, lag=128, cross_scoring=False. The authors' defaults are 16 sinks
and lag 1024. Prefill only, as kvpress.

Deviations from the reference:
- Ties: the rank scores repeat once per partition, so when `budget - sinks - tail` is not a
  multiple of the number of scored partitions, one rank value straddles the cut. evictkit gives
  those tied entries to the more recent partitions; kvpress leaves them to `torch.topk`, so the
  kept sets can differ there (definitional; parity is exact whenever the cut falls between rank
  values, see docs/benchmarks.md). Likewise when `budget < sinks + tail`, the score-1 tail entries
  tie (evictkit keeps the newest).
- The sinks are protected (`protected() = (sinks, 0)`), so budgets <= sinks are refused; kvpress
  scores them 1 and accepts any budget.
- A reference channel whose min equals its max contributes 0 instead of kvpress's NaN (0/0).
- kvpress casts the rank and ramp scores to the cache dtype (bf16 rounds rank / L for L > 256
  and the ramp for T - S > 256); evictkit keeps them in fp32.
- Chunked prefill: after each chunk the current cache is partitioned by slot, as kvpress
  partitions a prompt (kvpress itself compresses the first forward only). The authors compress
  each pair of full partitions as it arrives, keep a fixed fraction of every partition, never
  re-score compressed entries, and weight the value score by `score_v_ratio`; that schedule is
  not this policy's.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import a_bool, int_at_least


def lag_relative_scores(x: torch.Tensor, lag: int) -> torch.Tensor:
    """Per-partition softmax of the lag-normalised channel spread.

    x: [B, H, P, L, D] (P >= 2 consecutive partitions of `lag` entries). Returns [B, H, P - 1, L]:
    the scores of partitions 0 .. P-2, each normalised by the channel range of the next one.
    """
    ref = x[:, :, 1:]
    lo = ref.amin(dim=-2, keepdim=True)
    span = ref.amax(dim=-2, keepdim=True) - lo
    flat = span == 0
    normed = (x[:, :, :-1] - lo) / span.masked_fill(flat, 1.0)
    normed = normed.masked_fill(flat, 0.0)  # a constant reference channel says nothing (the reference: 0/0)
    spread = normed.std(dim=-1)
    if x.shape[-1] == 1:
        spread = torch.zeros_like(spread)  # one channel has no spread (unbiased std of one value is NaN)
    return spread.softmax(dim=-1)


def lagkv_scores(keys: torch.Tensor, values: torch.Tensor, sinks: int, lag: int, cross_scoring: bool,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """LagKV scores [B, H, T] (fp32) of a cache `keys`, `values` [B, H, T, D].

    valid: [B, H, T] bool, False on each head's leading padding (None: no padding). Sinks and
    partitions are counted from each head's first real slot, over its real entries only, as the
    row alone counts them; padding scores 0.
    """
    B, H, T, D = keys.shape
    first = None if valid is None else (~valid).sum(-1, keepdim=True)  # [B, H, 1]
    if first is not None:  # left-align each head's real entries: entry r of a head at index r
        src = (first + torch.arange(T, device=keys.device)).clamp(max=T - 1)
        keys = keys.gather(2, src[..., None].expand(-1, -1, -1, D))
        values = values.gather(2, src[..., None].expand(-1, -1, -1, D))
    count = torch.full((B, H, 1), T, device=keys.device) if first is None else T - first  # real entries
    r = torch.arange(T, device=keys.device)
    scores = torch.ones(B, H, T, dtype=torch.float32, device=keys.device)
    # a head with too few entries for two partitions: a ramp after the sinks, the newest highest
    short = count < sinks + 2 * lag
    ramp = (r - sinks).float() / (count - sinks).clamp(min=1).float()
    scores = torch.where(short & (r >= sinks), ramp, scores)
    if T >= sinks + 2 * lag:  # some head has scored partitions: the same grid for all, cut at r = sinks
        end = sinks + (T - sinks) // lag * lag
        parts = (end - sinks) // lag
        k = keys[:, :, sinks:end].float().reshape(B, H, parts, lag, D)
        v = values[:, :, sinks:end].float().reshape(B, H, parts, lag, D)
        s = (lag_relative_scores(k, lag) + lag_relative_scores(v, lag)) / 2
        if not cross_scoring:
            s = s.argsort(dim=-1).argsort(dim=-1).float() / lag
        grid = torch.ones_like(scores)
        grid[..., sinks : end - lag] = s.reshape(B, H, -1)
        # a head's own last full partition and leftovers are its tail (score 1), past it the
        # grid holds a shorter head's non-entries
        tail = sinks + ((count - sinks) // lag - 1) * lag
        scores = torch.where(~short & (r >= sinks) & (r < tail), grid, scores)
    if first is None:
        return scores
    back = (r - first).clamp(min=0)  # slot t holds real entry t - first
    return scores.gather(2, back).masked_fill(r < first, 0.0)


@attrs.define(frozen=True, kw_only=True)
class LagKV(ScorePolicy):
    """Lag-relative spread of keys and values, ranked per partition; sinks and tail kept first.

    Parameters: `sinks` (4) oldest entries always kept; `lag` (128) partition length;
    `cross_scoring` (False): compare raw scores across partitions instead of ranks.

    Per prefill chunk: partitions the current cache by slot after each chunk, as kvpress
    partitions a prompt; the authors compress each pair of full partitions as it arrives
    """

    name: ClassVar[str] = "lagkv"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "lag-relative key/value spread per partition, sinks + tail first (LagKV; keys/values only)"

    sinks: int = attrs.field(default=4, validator=int_at_least(0))
    lag: int = attrs.field(default=128, validator=int_at_least(1))
    cross_scoring: bool = attrs.field(default=False, validator=a_bool)

    def protected(self) -> tuple[int, int]:
        return (self.sinks, 0)

    def needs(self) -> Needs:
        return Needs(padding=True)  # sinks and partitions from each head's first real slot

    def score(self, obs: Observation) -> torch.Tensor:
        return lagkv_scores(obs.keys, obs.values, self.sinks, self.lag, self.cross_scoring, obs.valid)


@hookimpl
def evictkit_register_policies(register):
    register(LagKV)
