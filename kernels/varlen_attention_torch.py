"""Varlen attention over a ragged (per-head) cache in torch, for the CPU: no padded copy of the cache.

Layout and causal rule: `kernels/varlen_attention_ref.py`. One loop iteration per (batch row,
KV head) segment: the group's g query heads and q queries are stacked into one [g * q, D] matrix,
so the segment's keys and values are read once per group (GQA), with two matmuls and a softmax
over exactly the segment's entries. Only the last q - 1 columns of a chunk need the causal mask,
so it is applied to that slice alone.

Measured against the alternatives on CPU (1 torch thread, fp32, B = 1, H_kv = 3, g = 3, D = 64,
median ms of one call; segment lengths per KV head):

    segments            q   per-head loop  loop of SDPA  block-diagonal dense  segment softmax (scatter)
    200/800/2000        1       0.117          0.137            0.256                 0.442
    200/800/2000       32       1.08           1.29             9.37                 59.6
    2200/2600/7200      1       0.349          0.375            0.920                 1.62
    2200/2600/7200     32       8.62           8.43            45.4                 244
    4000/4000/4000      1       0.354          0.454            0.995                 1.64
    4000/4000/4000     32       7.76           9.75            50.8                 249
    1000/4000/12000     1       0.512          0.686            2.11                  5.09
    1000/4000/12000    32      12.1           18.3             56.5                 444

- "loop of SDPA": the same loop calling scaled_dot_product_attention per segment (no softcap);
- "block-diagonal dense": all B * H_q * q queries against all N keys in one matmul, the other
  segments' entries masked (wastes a factor B * H_kv of the work);
- "segment softmax": the scores of each entry against its own segment's queries (gathered from
  one [N, B * H_q * q] matmul), segment max and sum with scatter_reduce / index_add, and the
  weighted values summed with index_add of an [N, g * q, D] product.
The flat forms pay for their extra work and memory traffic far more than the loop pays for its
B * H_kv Python iterations, so the per-head loop is kept. The padded layout's SDPA over the same
entries is compared in benchmarks/test_bench_varlen.py.
"""

from __future__ import annotations

import torch

from evictkit.kernels.varlen_attention_ref import check_varlen_inputs


def varlen_attention_torch(
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
    """Attention of `queries` [B, H_q, q, D] over the ragged cache `keys`, `values` [N, D] whose
    segment s = b * H_kv + h spans rows starts[s] : starts[s] + lengths[s] (`starts`, `lengths`
    int64 [B * H_kv], gaps between segments allowed), or offsets[s]:offsets[s + 1] (`offsets` int64
    [B * H_kv + 1], segments back to back). Query i sees its segment except the last q - 1 - i
    entries. Returns [B, H_q, q, D] in the queries' dtype, computed in fp32."""
    B, Hkv, g, starts, lengths = check_varlen_inputs(queries, keys, values, offsets, starts=starts, lengths=lengths)
    _, Hq, q, D = queries.shape
    out = torch.empty((B, Hkv, g * q, D), dtype=torch.float32, device=queries.device)
    if out.numel() == 0:
        return out.view(queries.shape).to(queries.dtype)
    # [B, H_kv, g * q, D]: head j = h * g + r, query i is row r * q + i of KV head h's group;
    # the scale is folded into the (few) queries rather than the (many) scores
    grouped = (queries.float() * scale).reshape(B, Hkv, g * q, D)
    # the chunk's causal triangle over the segment's last q - 1 entries: query i hides entry
    # L - q + 1 + t for t >= i (upper triangle, diagonal included, of a [q, q - 1] matrix)
    hide = torch.ones(q, q - 1, dtype=torch.bool, device=queries.device).triu() if q > 1 else None
    grad = torch.is_grad_enabled() and (queries.requires_grad or keys.requires_grad or values.requires_grad)
    los, lens = starts.tolist(), lengths.tolist()  # host copies of B * H_kv numbers: the loop needs ints
    for b in range(B):
        for h in range(Hkv):
            lo = los[b * Hkv + h]
            hi = lo + lens[b * Hkv + h]
            k = keys[lo:hi].float()  # a view when the cache is fp32
            v = values[lo:hi].float()
            scores = torch.mm(grouped[b, h], k.T)  # [g * q, L]
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            if hide is not None:
                L = hi - lo
                scores.view(g, q, L)[:, :, L - q + 1 :].masked_fill_(hide, float("-inf"))
            if grad:  # autograd does not follow out=: a plain forward (no torch.no_grad) must still run
                out[b, h] = torch.mm(torch.softmax(scores, dim=-1), v)
            else:
                torch.mm(torch.softmax(scores, dim=-1), v, out=out[b, h])
    return out.view(queries.shape).to(queries.dtype)
