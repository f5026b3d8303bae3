"""Varlen attention over a ragged (per-head) cache: the layout, its checks, and the plain reference.

The layout (shared by every implementation in `kernels/varlen_attention*.py`):

- `keys`, `values`: [N, D] rows holding the kept entries of every (batch row, KV head) segment;
  segment s = b * H_kv + h is the rows `starts[s] : starts[s] + lengths[s]`.
- The segments are given in one of two forms:
  - `starts`, `lengths`: int64 [B * H_kv] each. Segments may leave gaps between them (free rows
    of a fixed-capacity cache, evictkit.ragged_cache.RaggedLayer; their contents are never read)
    and need not be in order; each must lie within the N rows.
  - `offsets`: int64 [B * H_kv + 1], cu_seqlens style, for segments back to back: segment s spans
    rows `offsets[s]:offsets[s + 1]`, offsets[0] = 0 and offsets[-1] = N. It is the same as
    starts = offsets[:-1], lengths = offsets[1:] - offsets[:-1].
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
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    starts: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    values_too: bool = True,
) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """Validate the layout above; return (B, H_kv, g, starts, lengths), the segments as starts and
    lengths (int64 [B * H_kv] each) whichever form they came in.

    Shapes and dtypes are always checked. The segments' values (offsets from 0 to N; starts and
    lengths within the N rows; each segment at least q long) are checked only when `values_too`
    and they live on the CPU: on a GPU the check would cost a host sync per layer and step, which
    the callers' own invariants make unnecessary.
    """
    if queries.dim() != 4:
        raise ValueError(f"queries must be [B, H_q, q, D], got shape {tuple(queries.shape)}")
    B, Hq, q, D = queries.shape
    if keys.dim() != 2 or keys.shape[1] != D:
        raise ValueError(f"keys must be [N, D] with D = {D} (the queries' head dim), got {tuple(keys.shape)}")
    if values.shape != keys.shape:
        raise ValueError(f"values must have the keys' shape {tuple(keys.shape)}, got {tuple(values.shape)}")
    N = keys.shape[0]
    if offsets is not None:
        if starts is not None or lengths is not None:
            raise ValueError("give the segments either as offsets or as starts and lengths, not both")
        if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32) or offsets.numel() < 2:
            raise ValueError(f"offsets must be int64 [B * H_kv + 1], got {offsets.dtype} {tuple(offsets.shape)}")
        if values_too and offsets.device.type == "cpu" and (int(offsets[0]) != 0 or int(offsets[-1]) != N):
            raise ValueError(f"offsets must run from 0 to N = {N}, got {int(offsets[0])}..{int(offsets[-1])}")
        starts, lengths = offsets[:-1], offsets[1:] - offsets[:-1]
    elif starts is None or lengths is None:
        raise ValueError("the segments are missing: give offsets, or starts and lengths")
    else:
        for name, t in (("starts", starts), ("lengths", lengths)):
            if t.dim() != 1 or t.dtype not in (torch.int64, torch.int32) or t.numel() < 1:
                raise ValueError(f"{name} must be int64 [B * H_kv], got {t.dtype} {tuple(t.shape)}")
        if starts.shape != lengths.shape:
            raise ValueError(f"starts {tuple(starts.shape)} and lengths {tuple(lengths.shape)} must have one shape")
    S = starts.numel()
    if S % B:
        raise ValueError(f"the segments number {S}, not a multiple of the batch size {B}")
    Hkv = S // B
    if Hq % Hkv:
        raise ValueError(f"H_q = {Hq} query heads is not a multiple of H_kv = {Hkv} KV heads")
    if not (queries.device == keys.device == values.device == starts.device == lengths.device):
        raise ValueError("queries, keys, values and the segments (offsets, or starts and lengths) must be on one "
                         "device")
    if values_too and starts.device.type == "cpu":
        shortest = int(lengths.min())
        if shortest < 0 or int(starts.min()) < 0 or int((starts + lengths).max()) > N:
            raise ValueError(f"every segment must lie within the N = {N} rows of keys (starts >= 0, lengths >= 0, "
                             "starts + lengths <= N)")
        if q and shortest < q:
            raise ValueError(f"every segment must hold at least the q = {q} new tokens; the shortest has "
                             f"{shortest} entries")
    return B, Hkv, Hq // Hkv, starts.long(), lengths.long()


def varlen_attention_ref(
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
    segments are given by `offsets` [B * H_kv + 1] or by `starts` and `lengths` [B * H_kv]; returns
    [B, H_q, q, D] in the queries' dtype (see the module doc).

    One dense softmax attention per (segment, query head), in fp32."""
    B, Hkv, g, starts, lengths = check_varlen_inputs(queries, keys, values, offsets, starts=starts, lengths=lengths)
    q = queries.shape[2]
    out = torch.empty(queries.shape, dtype=torch.float32, device=queries.device)
    los, lens = starts.tolist(), lengths.tolist()
    dev = keys.device
    for b in range(B):
        for h in range(Hkv):
            lo = los[b * Hkv + h]
            hi = lo + lens[b * Hkv + h]
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
