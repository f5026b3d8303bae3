"""Triton kernel: varlen attention over a ragged (per-head) cache, for CUDA.

Layout and causal rule: `kernels/varlen_attention_ref.py`. One program per (segment, block of
BLOCK_M query rows), where a segment's rows are its GQA group's g query heads times the q queries
(row r * q + i is head h * g + r, query i): the program walks the segment's keys in blocks of
BLOCK_N with an online softmax, so each K/V block is loaded once for the whole group (once per
row block when g * q > BLOCK_M, which only long prefill chunks reach).

Everything is computed in fp32 (loads are cast, dots use `input_precision="ieee"`: TF32 would
miss the 1e-5 the tests hold it to), which also keeps the interpreter (`TRITON_INTERPRET=1`,
set before this module is imported), whose bf16 arithmetic is wrong, exact. Segments are read by
their start and length (int64; `offsets` are turned into those), so a fixed-capacity cache's free
rows between segments are never read, and every load is masked: the tails of the segment, of D
and of the row block.

Not checked here (it would cost a host sync per call): that every segment lies within the N rows
and holds at least q entries. A query that would see no entry gets zeros, not NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from evictkit.kernels.varlen_attention_ref import check_varlen_inputs


@triton.jit
def _varlen_attention_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, len_ptr, o_ptr,
    H_KV, G, Q_LEN, D,
    sq_b, sq_h, sq_q, sq_d,
    sk_n, sk_d,
    sv_n, sv_d,
    so_b, so_h, so_q, so_d,
    scale, softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    b = seg // H_KV
    h = seg % H_KV
    lo = tl.load(start_ptr + seg).to(tl.int64)
    seg_len = tl.load(len_ptr + seg).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * Q_LEN
    qi = rows % Q_LEN
    head = (h * G + rows // Q_LEN).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    d_ok = offs_d < D
    q_rows = q_ptr + b * sq_b + head * sq_h + qi.to(tl.int64) * sq_q
    # the scale is folded into the queries, once, rather than into every block of scores
    qv = tl.load(q_rows[:, None] + offs_d[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qv = qv.to(tl.float32) * scale
    # query i sees entries 0 .. L - q + i of its segment (its own token is entry L - q + i)
    last = seg_len - Q_LEN + qi.to(tl.int64)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, seg_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = offs_n < seg_len
        kv_mask = n_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_ptr + (lo + offs_n)[:, None] * sk_n + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        s = tl.dot(qv, tl.trans(kb.to(tl.float32)), input_precision="ieee")  # [BLOCK_M, BLOCK_N]
        if HAS_SOFTCAP:
            # tanh from exp (libdevice.tanh has no interpreter version): exact sign, e in (0, 1]
            x = s / softcap
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = softcap * tl.where(x < 0, -t, t)
        visible = n_ok[None, :] & (offs_n[None, :] <= last[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen nothing yet keeps m = -inf: shift by 0 there, so exp gives 0, not NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_ptr + (lo + offs_n)[:, None] * sv_n + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, vb.to(tl.float32), input_precision="ieee")
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = o_ptr + b * so_b + head * so_h + qi.to(tl.int64) * so_q
    tl.store(o_rows[:, None] + offs_d[None, :] * so_d, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def varlen_attention_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    starts: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same contract as `varlen_attention_torch`: queries [B, H_q, q, D], keys and values [N, D],
    the segments as offsets int64 [B * H_kv + 1] or as starts and lengths int64 [B * H_kv];
    returns [B, H_q, q, D] in the queries' dtype."""
    B, Hkv, g, starts, lengths = check_varlen_inputs(queries, keys, values, offsets, starts=starts, lengths=lengths)
    _, Hq, q, D = queries.shape
    out = torch.empty(queries.shape, dtype=queries.dtype, device=queries.device)
    if out.numel() == 0:
        return out
    if keys.shape[0] == 0:  # no cache at all (only possible with q = 0, handled above): nothing to read
        return out.zero_()
    # tl.dot needs every block dimension >= 16
    block_d = max(16, triton.next_power_of_2(D))
    block_m = max(16, min(64, triton.next_power_of_2(g * q)))
    block_n = max(16, min(64, 8192 // block_d))
    grid = (B * Hkv, triton.cdiv(g * q, block_m))
    _varlen_attention_kernel[grid](
        queries, keys, values, starts.contiguous(), lengths.contiguous(), out,
        Hkv, g, q, D,
        *queries.stride(), *keys.stride(), *values.stride(), *out.stride(),
        float(scale), float(softcap) if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out
