"""Triton compaction kernel: out[b, h, k, :] = x[b, h, idx[b, h, k], :].

A pure copy: values are loaded and stored, never computed on, so every dtype (bf16 included)
is reproduced bit for bit, also under the interpreter (`TRITON_INTERPRET=1`, which must be
set before this module is imported). Offsets are int64 so caches past 2**31 elements are safe,
and every access is masked: the tails of K and D, and indices outside [0, T) (those rows are
written as zeros instead of reading foreign memory; the core validates indices before calling).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _compact_kernel(
    src, idx, dst,
    H, T, K, D,
    s_b, s_h, s_t, s_d,
    i_b, i_h, i_k,
    o_b, o_h, o_k, o_d,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    mask_k = offs_k < K
    rows = tl.load(idx + b * i_b + h * i_h + offs_k * i_k, mask=mask_k, other=0).to(tl.int64)
    valid = mask_k & (rows >= 0) & (rows < T)
    src_row = src + b * s_b + h * s_h + rows * s_t
    dst_row = dst + b * o_b + h * o_h + offs_k * o_k
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask_d = offs_d < D
        vals = tl.load(src_row[:, None] + offs_d[None, :] * s_d,
                       mask=valid[:, None] & mask_d[None, :], other=0)
        tl.store(dst_row[:, None] + offs_d[None, :] * o_d, vals,
                 mask=mask_k[:, None] & mask_d[None, :])


def compact_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Same contract as `compact_torch`: x [B, H, T, D] or [B, H, T], idx [B, H, K]."""
    squeeze = x.dim() == 3
    x4 = x.unsqueeze(-1) if squeeze else x
    B, H, T, D = x4.shape
    K = idx.shape[-1]
    out = torch.empty((B, H, K, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out.squeeze(-1) if squeeze else out
    block_d = min(128, triton.next_power_of_2(D))
    block_k = max(1, min(64, 4096 // block_d))
    grid = (B * H, triton.cdiv(K, block_k))
    _compact_kernel[grid](
        x4, idx, out,
        H, T, K, D,
        *x4.stride(), *idx.stride(), *out.stride(),
        BLOCK_K=block_k, BLOCK_D=block_d,
    )
    return out.squeeze(-1) if squeeze else out
