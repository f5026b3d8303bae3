"""`xattention`: XAttention's adaptive block selection by antidiagonal scoring.

Paper: Xu, Guo, Tang, Han et al., "XAttention: Block Sparse Attention with Antidiagonal Scoring",
ICML 2025 (arXiv:2503.16428); reference code: mit-han-lab/x-attention
(`xattn/src/Xattention.py`: `xattn_estimate`, `find_blocks_chunked`), also wrapped by
microsoft/MInference as `xattention`.

Per query head: queries and keys are cut into groups of `stride` tokens; the score of query group
i and key group j is the antidiagonal sum sum_t q[i*stride + stride-1-t] . k[j*stride + t] scaled
by 1 / (sqrt(D) * stride), one matmul of reshaped Q and K (about 1/stride of the dense Q K^T).
A causal softmax over j per group row gives P; summing P over (block / stride)^2 groups gives the
block scores W. Per query block: key block 0 and the diagonal block(s) are kept first, then key
blocks in decreasing W until the kept mass reaches `threshold` of the row's total. Kept blocks are
computed whole, causal on the diagonal.

Defaults (MInference's wrapper): threshold 0.9, stride 8, block 128 (XAttention's own
`Xattention_prefill` defaults to threshold 0.8).

Deviations: the scores are computed in fp32 for one head at a time (the reference: bf16 on CUDA in
chunks of 2048 rows); a chunk of a chunked prefill scores its queries against the retained cache
by slot, its groups aligned to the chunk's first query; options keep_sink / keep_recent of the
reference are not offered (block 0 and the diagonal are always kept).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import PatternAttention, hookimpl
from evictkit.helpers import int_at_least
from evictkit.plugins._prefill_patterns import diagonal_blocks, key_blocks_to_slots, row_slots


def _fraction(_inst: object, attr: attrs.Attribute, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{attr.name}={value!r}: must be a number in (0, 1] (share of each row's attention mass)")


def _stride_divides_block(inst: XAttention, attr: attrs.Attribute, value: int) -> None:
    if inst.block % value:
        raise ValueError(f"stride={value!r}: must divide block={inst.block} (groups tile the blocks)")


def _groups(x: torch.Tensor, stride: int, reverse: bool) -> torch.Tensor:
    """x [n, D] -> [ceil(n / stride), stride * D]: each group of stride rows side by side (zero padded),
    in reverse order when `reverse` (the antidiagonal's query side)."""
    n, D = x.shape
    pad = -n % stride
    x = torch.nn.functional.pad(x, (0, 0, 0, pad)).view(-1, stride, D)
    return (x.flip(1) if reverse else x).reshape(-1, stride * D)


@attrs.frozen(kw_only=True)
class XAttention(PatternAttention):
    """Key blocks ranked by antidiagonal scores, kept up to a share of each row's attention mass."""

    name: ClassVar[str] = "xattention"
    summary: ClassVar[str] = "XAttention: blocks by antidiagonal scores up to a mass threshold (adaptive)"

    threshold: float = attrs.field(default=0.9, validator=_fraction)
    block: int = attrs.field(default=128, validator=int_at_least(1))
    stride: int = attrs.field(default=8, validator=[int_at_least(1), _stride_divides_block])

    def block_scores(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """W [H_q, nq, nk] fp32: the antidiagonal softmax mass of each (query block, key block)."""
        _, Hq, q, D = query.shape
        Hkv, S = key.shape[1], key.shape[2]
        g, st, per = Hq // Hkv, self.stride, self.block // self.stride
        nq, nk = -(-q // self.block), -(-S // self.block)
        qg_rows = torch.arange(0, q, st, device=query.device)  # first row of each query group
        kg_slots = torch.arange(0, S, st, device=query.device)  # first slot of each key group
        causal = kg_slots[None, :] <= (S - q + qg_rows)[:, None]  # [nqg, nkg]
        out = torch.zeros(Hq, nq * per, nk * per, device=query.device)
        for h in range(Hq):  # one head: the group scores are [q / stride, S / stride]
            qg = _groups(query[0, h].float(), st, reverse=True)
            kg = _groups(key[0, h // g].float(), st, reverse=False)
            scores = (qg @ kg.T) / (D**0.5 * st)
            probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            out[h, : probs.shape[0], : probs.shape[1]] = probs
        return out.view(Hq, nq, per, nk, per).sum((2, 4))

    def pattern(self, query: torch.Tensor, key: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
        q, S = query.shape[2], key.shape[2]
        W = self.block_scores(query, key)  # [H_q, nq, nk]
        _, last = row_slots(q, S, self.block, query.device)
        kb_first = torch.arange(W.shape[-1], device=query.device) * self.block
        causal = kb_first[None, :] <= last[:, None]  # [nq, nk]
        forced = diagonal_blocks(q, S, self.block, self.block, query.device) | (kb_first == 0)[None, None, :]
        W = W.masked_fill(~causal, 0.0)
        # forced blocks first, then by score; keep a block while the mass before it is under the target
        priority = torch.where(forced, torch.inf, W)
        order = priority.argsort(dim=-1, descending=True, stable=True)
        mass_before = W.gather(-1, order).cumsum(-1) - W.gather(-1, order)
        target = self.threshold * W.sum(-1, keepdim=True)
        keep_sorted = (mass_before < target) | forced.expand_as(W).gather(-1, order)
        blocks = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted) & causal
        return key_blocks_to_slots(blocks, self.block, S), self.block


@hookimpl
def evictkit_register_prefill_attention(register):
    register(XAttention)
