"""Attention recomputation for scorers (flash/SDPA return no attention weights)."""

from __future__ import annotations

import sys

import torch
from torch import nn


def project_queries(
    module: nn.Module, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Re-project queries from hidden states exactly as the attention module does.

    hidden_states: [B, q, C]; cos, sin: [B or 1, q, D] (the rows of these tokens)
    returns post-RoPE queries [B, H_q, q, D].
    """
    B, q, _ = hidden_states.shape
    head_dim = module.head_dim
    query = module.q_proj(hidden_states).view(B, q, -1, head_dim).transpose(1, 2)  # type: ignore[operator]  # a submodule
    q_norm = getattr(module, "q_norm", None)  # Qwen3, Gemma3
    if q_norm is not None:
        query = q_norm(query)
    rope = _rope_fn(module)
    query, _ = rope(query, query, cos, sin)
    return query




def _rope_fn(module: nn.Module):
    fn = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__}: cannot find apply_rotary_pos_emb beside it; "
            "evictkit supports RoPE attention modules in the transformers style"
        )
    return fn


def attention_weights(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of `queries` over `keys`, causal by true positions, in fp32.

    queries: [B, H_q, w, D]; keys: [B, H_kv, T, D]; query_positions: [B, w];
    key_positions: [B, H_kv, T]. A key is visible when its position <= the query's.
    key_mask: optional [B, H_kv, T] bool, False hides a key (padding slots of ragged layers and
    padded batches). With a mask, a query at position -1 (a padded batch's padding query) gets a
    row of zeros: it attends to nothing.
    returns [B, H_q, w, T] (float32).
    """
    B, Hq, w, D = queries.shape
    Hkv, T = keys.shape[1], keys.shape[2]
    g = Hq // Hkv
    q = queries.float().reshape(B, Hkv, g * w, D)
    # in place on the fresh logits: on CPU the out-of-place scale and mask cost more than the matmul
    logits = torch.matmul(q, keys.float().transpose(-1, -2)).mul_(scaling)  # [B, Hkv, g*w, T]
    if softcap:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    logits = logits.view(B, Hkv, g, w, T)
    hidden = key_positions[:, :, None, None, :] > query_positions[:, None, None, :, None]  # [B, Hkv, 1, w, T]
    if key_mask is not None:
        hidden = hidden | ~key_mask[:, :, None, None, :]
    # an additive -inf bias, g times smaller than the logits: on CPU a masked_fill_ that broadcasts
    # the mask over the group costs 2.5x this add (0.28 against 0.11 ms at B=4, w=32, T=257)
    logits.add_(torch.where(hidden, float("-inf"), 0.0))
    probs = torch.softmax(logits, dim=-1)
    if key_mask is not None:  # a padding query sees no key: its softmax is 0/0, made 0
        probs.masked_fill_((query_positions < 0)[:, None, None, :, None], 0.0)
    return probs.view(B, Hq, w, T)


# fp32 elements of one chunk of attention rows [B, H_q, chunk, T]: 64 MiB
_CHUNK_ELEMENTS = 1 << 24


def _visible_key_counts(query_positions: torch.Tensor, key_positions: torch.Tensor, chunk: int) -> list[int]:
    """For each chunk of `chunk` queries, 1 + the last slot that any of its queries can see
    (T if none can), all chunks in one host round trip.

    The suffix minimum of the key positions (over batch and heads) is non-decreasing, and slot
    j or a later one is visible to position x exactly when that minimum at j is <= x, so a
    sorted search finds the last visible slot whatever order the slots are in.
    """
    T = key_positions.shape[-1]
    first_seen = key_positions.reshape(-1, T).amin(0).flip(0).cummin(0).values.flip(0)  # [T]
    qmax = query_positions.amax(0)  # [q]
    pad = -qmax.shape[0] % chunk
    if pad:
        qmax = torch.cat([qmax, qmax[-1:].expand(pad)])
    qmax = qmax.view(-1, chunk).amax(1).to(first_seen.dtype)
    n = torch.searchsorted(first_seen.contiguous(), qmax, right=True)
    return torch.where(n == 0, T, n).tolist()


def attention_column_sums(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention each key received, summed over the queries (causal, fp32): [B, H_q, T].

    Same arguments as `attention_weights`; the rows are computed in chunks of queries so a
    4k-token prefill never holds the whole [B, H_q, q, T] matrix. Each chunk only reads the
    keys up to the last slot any of its queries can see: at prefill (slots in position order)
    that skips the masked upper triangle, half the work; the skipped columns would add 0.
    """
    B, Hq, q, _ = queries.shape
    T = keys.shape[2]
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * Hq * T))
    total = torch.zeros(B, Hq, T, dtype=torch.float32, device=keys.device)
    for start, n in zip(range(0, q, chunk), _visible_key_counts(query_positions, key_positions, chunk)):
        qpos = query_positions[:, start : start + chunk]
        rows = attention_weights(
            queries[:, :, start : start + chunk], keys[:, :, :n], qpos, key_positions[..., :n],
            scaling, softcap, key_mask=None if key_mask is None else key_mask[..., :n],
        )
        total[..., :n] += rows.sum(dim=2)
    return total
