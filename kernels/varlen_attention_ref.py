"""Varlen attention over a ragged (per-head) cache: the layout, its checks, and the plain reference.

The layout (shared by every implementation in `kernels/varlen_attention*.py`):

- `keys`, `values`: [N, D], the kept entries of every (batch row, KV head) segment, flattened in
  (b, h) order; N is the total over all segments.
- `offsets`: int64 [B * H_kv + 1], cu_seqlens style: segment s = b * H_kv + h spans rows
  `offsets[s]:offsets[s + 1]`; offsets[0] = 0 and offsets[-1] = N.
- `queries`: [B, H_q, q, D] with H_q = H_kv * g (GQA): query head j reads KV head j // g.
- Causality: the last q entries of every segment are the q new tokens themselves (they were
  appended to every segment before the attention), everything before them is older. Query i
  sees its segment's entries except the last (q - 1 - i): decode (q = 1) sees the whole segment,
  a prefill chunk is causal within its last q entries. So every segment holds at least q entries.
- The result is [B, H_q, q, D] in the queries' dtype, computed in fp32; `softcap` (Gemma-2) maps
  each score s to softcap * tanh(s / softcap) after scaling, before the mask.

`varlen_attention_ref` gathers each segment into a dense tensor and runs a textbook softmax
attention on it: slow and obviously right, it is what the tests hold the fast versions to.
"""

from __future__ import annotations

import torch


def check_varlen_inputs(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, *, values_too: bool = True
) -> tuple[int, int, int]:
    """Validate the layout above; return (B, H_kv, g).

    Shapes and dtypes are always checked. The offsets' values (start at 0, end at N, each segment at
    least q long) are checked only when `values_too` and the offsets live on the CPU: on a GPU the
    check would cost a host sync per layer and step, which the callers' own invariants make
    unnecessary.
    """
    if queries.dim() != 4:
        raise ValueError(f"queries must be [B, H_q, q, D], got shape {tuple(queries.shape)}")
    B, Hq, q, D = queries.shape
    if keys.dim() != 2 or keys.shape[1] != D:
        raise ValueError(f"keys must be [N, D] with D = {D} (the queries' head dim), got {tuple(keys.shape)}")
    if values.shape != keys.shape:
        raise ValueError(f"values must have the keys' shape {tuple(keys.shape)}, got {tuple(values.shape)}")
    if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32) or offsets.numel() < 2:
        raise ValueError(f"offsets must be int64 [B * H_kv + 1], got {offsets.dtype} {tuple(offsets.shape)}")
    S = offsets.numel() - 1
    if S % B:
        raise ValueError(f"offsets has {S} segments, not a multiple of the batch size {B}")
    Hkv = S // B
    if Hq % Hkv:
        raise ValueError(f"H_q = {Hq} query heads is not a multiple of H_kv = {Hkv} KV heads")
    if not (queries.device == keys.device == values.device == offsets.device):
        raise ValueError("queries, keys, values and offsets must be on one device")
    if values_too and offsets.device.type == "cpu":
        lengths = offsets[1:] - offsets[:-1]
        if int(offsets[0]) != 0 or int(offsets[-1]) != keys.shape[0]:
            raise ValueError(
                f"offsets must run from 0 to N = {keys.shape[0]}, got {int(offsets[0])}..{int(offsets[-1])}"
            )
        if q and int(lengths.min()) < q:
            raise ValueError(f"every segment must hold at least the q = {q} new tokens; the shortest has "
                             f"{int(lengths.min())} entries")
    return B, Hkv, Hq // Hkv


def varlen_attention_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of `queries` [B, H_q, q, D] over the ragged cache `keys`, `values` [N, D] with
    `offsets` [B * H_kv + 1]; returns [B, H_q, q, D] in the queries' dtype (see the module doc).

    One dense softmax attention per (segment, query head), in fp32."""
    B, Hkv, g = check_varlen_inputs(queries, keys, values, offsets)
    q = queries.shape[2]
    out = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    bounds = offsets.tolist()
    dev = keys.device
    for b in range(B):
        for h in range(Hkv):
            lo, hi = bounds[b * Hkv + h], bounds[b * Hkv + h + 1]
            k = keys[lo:hi].float()  # [L, D]
            v = values[lo:hi].float()
            L = hi - lo
            # query i sees entries 0 .. L - q + i (its own token is entry L - q + i)
            visible = torch.arange(L, device=dev)[None, :] <= (L - q + torch.arange(q, device=dev))[:, None]
            for j in range(h * g, (h + 1) * g):
                scores = queries[b, j].float() @ k.T * scale  # [q, L]
                if softcap is not None:
                    scores = softcap * torch.tanh(scores / softcap)
                scores = scores.masked_fill(~visible, float("-inf"))
                out[b, j] = torch.softmax(scores, dim=-1) @ v
    return out.to(queries.dtype)
