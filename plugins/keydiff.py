"""`keydiff`: keep the keys least similar to the layer's mean key direction.

Park, Jones, Morse, Goel, Lee, Lott, "KeyDiff: Key Similarity-Based KV Cache Eviction for
Long-Context LLM Inference in Resource-Constrained Environments", arXiv 2504.15364; reference
implementation NVIDIA/kvpress 0.5.5 (`kvpress/presses/keydiff_press.py`, `KeyDiffPress`; the
paper's block-wise mode is `kvpress/presses/block_press.py`, `BlockPress`). No authors' code
was read.

Score, per KV head: the anchor is the mean of the unit-normalised cached keys (every cached key
counts, the evicted ones included); a key's score is minus its cosine similarity to the anchor,
so the most distinctive keys are kept. Keys only (post-RoPE, as cached): no queries, no GQA
reduction. Computed in fp32 with kvpress's epsilons (1e-12 on the normalisation, 1e-8 on the
cosine), so fp32 caches give kvpress's scores exactly.

`block` > 0 is the paper's block-wise eviction as kvpress's BlockPress simulates it on one
full-attention prefill: start from the first `budget` entries, then for each next `block`
entries score (kept + block) with the anchor of that candidate set and keep the top `budget`.
The block recursion sees only this forward's cache; with `block=0` (default) the whole cache is
scored at once.

Padded batches: the mean key runs over real keys only, and blocks are cut from each row's first
real slot, so a row keeps what it keeps alone.

Defaults: block=0 (kvpress's KeyDiffPress; its registry's `block_keydiff` uses 128), sinks=0,
window=0 (kvpress protects nothing). Prefill only, as the reference.

Deviations from the reference: kept entries stay in position order and exact ties go to the
more recent key (kvpress: top-k order, ties to `torch.topk`); in block mode the protected
`sinks`/`window` entries (none by default) are forced into every intermediate kept set. kvpress
computes in the cache dtype: with a bf16 cache its scores tie far more often than evictkit's fp32
ones, so bf16 kept sets can differ on those ties.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch
import torch.nn.functional as F

from evictkit import Needs, Observation, ScorePolicy, hookimpl
from evictkit.helpers import RaggedSelection, int_at_least, select_topk


def keydiff_scores(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Minus the cosine similarity of each key to the mean unit key: [B, H, T, D] -> [B, H, T] fp32.

    valid: [B, H, T] bool or None; the mean runs over the valid keys only (padding has no say).
    """
    k = keys.float()
    unit = F.normalize(k, p=2, dim=-1, eps=1e-12)
    if valid is None:
        anchor = unit.mean(dim=2, keepdim=True)
    else:
        w = valid[..., None].to(unit.dtype)
        anchor = (unit * w).sum(dim=2, keepdim=True) / w.sum(dim=2, keepdim=True).clamp_min(1)
    return -F.cosine_similarity(k, anchor, dim=-1, eps=1e-8)


@attrs.define(frozen=True, kw_only=True)
class KeyDiff(ScorePolicy):
    """Most distinctive keys (lowest cosine to the mean key) are kept.

    Parameters: `block` (0 = one shot; > 0 the paper's block-wise eviction), `sinks` (0) and
    `window` (0), always kept.

    Per prefill chunk: scores the whole cache against its own mean key after each chunk (block
    mode: the chunk's cache in blocks); kvpress compresses the first forward only
    """

    name: ClassVar[str] = "keydiff"
    phases: ClassVar[tuple[str, ...]] = ("prefill",)
    summary: ClassVar[str] = "keys least similar to the mean key direction (KeyDiff; keys only)"

    block: int = attrs.field(default=0, validator=int_at_least(0))
    sinks: int = attrs.field(default=0, validator=int_at_least(0))
    window: int = attrs.field(default=0, validator=int_at_least(0))

    def needs(self) -> Needs:
        return Needs(padding=True)  # the mean key over real keys; blocks from each row's first real slot

    def protected(self) -> tuple[int, int]:
        return (self.sinks, self.window)

    def score(self, obs: Observation) -> torch.Tensor:
        return keydiff_scores(obs.keys, obs.valid)

    def select(self, obs: Observation, budget: int) -> torch.Tensor | RaggedSelection:
        T = obs.length
        if not self.block or budget >= T:
            return super().select(obs, budget)
        keys, valid = obs.keys, obs.valid
        B, H, _, D = keys.shape
        # the recursion runs over each head's real entries r = 0, 1, ..: slot first + r, so blocks
        # are cut from the first real slot, as the row alone cuts them (no padding: first = 0)
        first = torch.zeros(B, H, 1, dtype=torch.long, device=keys.device)
        if valid is not None:
            first = (~valid).sum(-1, keepdim=True)
        count = T - first  # [B, H, 1] real entries
        n = T - int(first.min())
        r = torch.arange(n, device=keys.device)
        kept = r[:budget].expand(B, H, budget)
        for start in range(budget, n, self.block):
            block = r[start : min(start + self.block, n)].expand(B, H, -1)
            candidates = torch.cat([kept, block], dim=-1)  # ascending: kept ones precede the block
            real = None if valid is None else candidates < count  # a shorter row's block runs out first
            slots = (first + candidates).clamp(max=T - 1)
            s = keydiff_scores(keys.gather(2, slots[..., None].expand(-1, -1, -1, D)), real)
            forced = (candidates < self.sinks) | (candidates >= count - self.window)
            s = s.masked_fill(forced, float("inf"))
            kept = candidates.gather(-1, select_topk(s, budget, policy=self.name, valid=real))
        if valid is None:
            return kept
        # back to slots; a row with fewer real entries than the budget evicts nothing (any sorted
        # selection will do), every other keeps exactly its `budget` real entries
        chosen = torch.zeros(B, H, T + 1, dtype=torch.bool, device=keys.device)
        chosen.scatter_(2, torch.where(kept < count, first + kept, T), True)
        return select_topk(chosen[..., :T].float(), budget, policy=self.name, valid=valid)


@hookimpl
def evictkit_register_policies(register):
    register(KeyDiff)
