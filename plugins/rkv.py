"""`rkv`: decode-time eviction for long generations, by attention importance minus key redundancy.

Cai et al., "R-KV: Redundancy-aware KV Cache Compression for Reasoning Models", arXiv
2505.24133; reference implementation Zefan-Cai/R-KV (`rkv/compression/r1_kv.py`, `R1KV.update_kv`;
`rkv/utils.py`, `compute_attention_scores` and `cal_similarity`; the schedule in `rkv/modeling.py`
and `run_math.py`), as restated in shared/reference/methods-2026.md, section 6.

Score, per KV head, on a cache of T entries whose newest `window` (w) are protected:
1. Importance: logits q.k * scaling of the newest w post-RoPE queries (the core's rolling buffer at
   decode) against the prefix keys [0, T - w); GQA: the max over each KV head's query-head group
   *on the logits*, before the softmax; fp32 softmax over the prefix, mean over the w queries, then
   max-pooling along the keys (`kernel`, stride 1, padding kernel // 2).
2. Redundancy: the cosine similarities C = k^ k^T of every cached key (k^ = k / (|k| + 1e-8)),
   diagonal zeroed; in each row i, the entry of the *last* key j with C[i, j] > `threshold` is
   zeroed too (that most recent similar key is the one the method keeps; a row with no such key
   zeroes C[i, 0], as the reference does); r = softmax over j of the column means of C.
3. z = `mix` * importance - (1 - `mix`) * r on the prefix; the top budget - w prefix entries are
   kept, with the w newest.

Defaults (the reference class `R1KV` and its `run_math.py`): window=8, kernel=7, mix=0.07 (the
paper's README says 0.1), threshold=0.5 (hard-coded there). Phases: prefill and decode. The
reference compresses the prompt when it is at least the budget, and then, while generating,
whenever the token counter reaches a multiple of its buffer (128), back to the budget: the cache
runs between budget and budget + 128. In evictkit the buffer is `compress(..., slack=127)`: a
layer is compressed back to the budget when it reaches budget + 128 entries. With the default
slack=0 it is compressed at every decode step (the paper's "every step" variant, and O(T^2) work
per step for the similarities).

Per prefill chunk: scores the cache with the chunk's last `window` queries (the rolling window
when a chunk is shorter) after each chunk; the reference compresses a prompt in one piece

Deviations from the reference (docs/policies/rkv.md measures what they change):
- Schedule: the reference fires on the token counter (index % 128 == 0, the prompt counted), so
  its first decode compression comes 1 to 128 tokens after the prefill's; evictkit's slack fires
  on the cache size, 128 tokens after it. The contract has no token-index trigger.
- Storage order: the reference stores kept entries in descending-score order, so after its first
  compression the max-pool neighbourhood and the "last similar key" run over that order;
  evictkit keeps entries in position order (a law), so kept sets agree exactly at the first
  compression and less after it.
- fp32 throughout (the reference casts the mean attention back to the model dtype and computes
  the similarities in it); the logit scale is the model's `scaling` (the reference's 1/sqrt(d),
  the same for Llama-type models); Gemma-style logit soft-capping is applied when the model has it.
- Every batch row is scored on its own keys (the tagged reference used batch row 0's similarities
  for every row; its later versions score each row). Ties go to the more recent entry.
- The similarities are computed in blocks of rows, so memory stays O(block x T), not O(T^2).

Padded batches (`Needs.padding`): padding keys take no attention and no part in the
similarities (their means and softmax run over each row's real keys, "key 0" is its first real
key), padding window queries are left out of the mean, and the protected window's score is set
by the real prefix entries only (a padding slot's max-pooled importance is not 0).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import int_at_least, odd_kernel, pool1d

#: rows of the T x T similarity computed at once (memory B x H_kv x ROWS x T fp32)
ROWS = 1024


def _fraction(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{attr.name}={value!r}: must be a number in [0, 1]")


def _threshold(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1.0 <= value < 1.0:
        raise ValueError(f"{attr.name}={value!r}: must be a number in [-1, 1) (a cosine similarity)")


def importance(queries: torch.Tensor, keys: torch.Tensor, scaling: float, kernel: int,
               softcap: float | None = None, key_valid: torch.Tensor | None = None,
               query_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax attention of `queries` [B, H_q, w, D] over `keys` [B, H_kv, P, D] (the prefix),
    GQA max on the logits, max-pooled: [B, H_kv, P] fp32.

    Padded batches: key_valid [B, H_kv, P] bool hides padding keys (they get 0, which the
    max-pool of these non-negative weights treats like its own padding); query_valid [B, w] bool
    leaves padding queries out of the mean."""
    B, Hq, w, D = queries.shape
    Hkv = keys.shape[1]
    q = queries.float().view(B, Hkv, Hq // Hkv, w, D)
    logits = torch.matmul(q, keys.float()[:, :, None].transpose(-1, -2)) * scaling  # [B, H_kv, G, w, P]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    if key_valid is None:
        attn = logits.amax(dim=2).softmax(dim=-1).mean(dim=2)  # [B, H_kv, P]
    else:
        # the lowest float, not -inf: a row without real keys (it evicts nothing) stays finite
        logits = logits.masked_fill(~key_valid[:, :, None, None, :], torch.finfo(logits.dtype).min)
        probs = logits.amax(dim=2).softmax(dim=-1)  # [B, H_kv, w, P]
        real = torch.ones(B, w, dtype=torch.bool, device=q.device) if query_valid is None else query_valid
        probs = probs.masked_fill(~real[:, None, :, None], 0.0)
        attn = probs.sum(dim=2) / real.sum(-1).clamp(min=1)[:, None, None]
    return pool1d(attn.contiguous(), kernel, "max")


def redundancy(keys: torch.Tensor, threshold: float, rows: int = ROWS,
               valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of the column means of the keys' cosine similarities, each row's diagonal and last
    similar key (> threshold; key 0 when none) zeroed: [B, H_kv, T, D] -> [B, H_kv, T] fp32.

    valid: [B, H_kv, T] bool, False on a padded batch's leading padding slots: they are neither
    rows nor columns of the similarities, "key 0" is the first real key, the means are over the
    real keys and the softmax too (padding gets 0)."""
    B, H, T, _ = keys.shape
    k = keys.float()
    unit = k / (torch.linalg.vector_norm(k, dim=-1, keepdim=True) + 1e-8)
    slots = torch.arange(T, device=keys.device)
    first: torch.Tensor | int = 0
    if valid is not None:
        unit = unit * valid[..., None]  # a padding key is similar to nothing
        first = (~valid).sum(-1).clamp(max=T - 1)[:, :, None, None]  # [B, H, 1, 1]; a row not started: T - 1
    column_sums = torch.zeros(B, H, T, dtype=torch.float32, device=keys.device)
    for start in range(0, T, rows):
        i = slots[start : start + rows]
        sim = torch.matmul(unit[:, :, i], unit.transpose(-1, -2))  # [B, H, r, T]
        sim[:, :, torch.arange(len(i), device=keys.device), i] = 0.0
        # padding columns are 0: never above a threshold >= 0, and below a negative one the zeroed
        # diagonal (a later slot) is "similar" too, so they never become the newest similar key
        last = torch.where(sim > threshold, slots, first).amax(dim=-1, keepdim=True)  # the newest similar key
        sim.scatter_(-1, last, 0.0)
        column_sums += sim.sum(dim=2)
    if valid is None:
        return (column_sums / T).softmax(dim=-1)
    means = column_sums / valid.sum(-1, keepdim=True).clamp(min=1)
    # the lowest float, not -inf: a row with no real key yet stays finite (it evicts nothing)
    return means.masked_fill(~valid, torch.finfo(means.dtype).min).softmax(dim=-1)


@attrs.define(frozen=True, kw_only=True)
class RKV(ScorePolicy):
    """Importance (window attention) minus redundancy (key similarity); keeps the newest `window`.

    Parameters: `window` (8) newest queries that score and entries always kept; `kernel` (7, odd)
    max-pooling width; `mix` (0.07) weight of importance against redundancy (lambda);
    `threshold` (0.5) cosine above which two keys are similar. Use `slack=127` for the
    reference's buffer of 128 decode tokens between compressions.

    Per prefill chunk: scores the cache with the chunk's last `window` queries (the rolling
    window when a chunk is shorter) after each chunk; the reference compresses a prompt in one
    piece
    """

    name: ClassVar[str] = "rkv"
    phases: ClassVar[tuple[str, ...]] = ("prefill", "decode")
    summary: ClassVar[str] = "window attention minus key redundancy, for long generations (R-KV; decode)"

    window: int = attrs.field(default=8, validator=int_at_least(1))
    kernel: int = attrs.field(default=7, validator=odd_kernel)
    mix: float = attrs.field(default=0.07, validator=_fraction)
    threshold: float = attrs.field(default=0.5, validator=_threshold)

    def needs(self) -> Needs:
        return Needs(window=self.window, padding=True)

    def protected(self) -> tuple[int, int]:
        return (0, self.window)

    def score(self, obs: Observation) -> torch.Tensor:
        keys = obs.keys
        B, H, T, _ = keys.shape
        prefix = T - self.window
        if prefix <= 0:  # nothing but the protected window
            return torch.zeros(B, H, T, dtype=torch.float32, device=keys.device)
        valid = obs.valid
        attn = importance(obs.window_queries, keys[:, :, :prefix], obs.scaling, self.kernel, obs.softcap,
                          key_valid=None if valid is None else valid[..., :prefix],
                          query_valid=None if valid is None else obs.window_positions >= 0)
        red = redundancy(keys, float(self.threshold), valid=valid)[..., :prefix]
        z = self.mix * attn - (1.0 - self.mix) * red
        if valid is None:
            top = z.amax(dim=-1, keepdim=True) + 1.0  # the window is forced in by the selection anyway
        else:
            # a padding slot's pooled importance borrows its real neighbours' (> 0): it must not set
            # the window's score; a row with no real prefix scores 0 throughout, as it does alone;
            # padding slots score 0 (the selection never keeps them)
            real = valid[..., :prefix]
            top = z.masked_fill(~real, torch.finfo(z.dtype).min).amax(dim=-1, keepdim=True) + 1.0
            top = torch.where(real.any(-1, keepdim=True), top, 0.0)
            z = z.masked_fill(~real, 0.0)
        return torch.cat([z, top.expand(B, H, self.window)], dim=-1)


@hookimpl
def evictkit_register_policies(register):
    register(RKV)


__all__ = ["RKV", "importance", "redundancy"]
