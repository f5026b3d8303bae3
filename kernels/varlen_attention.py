"""Dispatcher of varlen attention over a ragged (per-head) cache: Triton on CUDA, torch elsewhere.

Layout and causal rule: `kernels/varlen_attention_ref.py`. `EVICTKIT_VARLEN_BACKEND=triton|torch`
forces one backend (`auto`, the default, picks Triton for CUDA tensors when Triton is installed).
"""

from __future__ import annotations

import os

import torch

from evictkit.kernels.compact import _triton_available
from evictkit.kernels.varlen_attention_torch import varlen_attention_torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "EVICTKIT_VARLEN_BACKEND"


def varlen_backend_for(queries: torch.Tensor) -> str:
    """The backend `varlen_attention` uses for `queries`: the env var if set; else Triton on CUDA
    (when installed: the torch loop launches several kernels per segment), torch elsewhere."""
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{_ENV}={choice!r}: must be one of {', '.join(BACKENDS)}")
    if choice != "auto":
        return choice
    return "triton" if queries.is_cuda and _triton_available() else "torch"


def varlen_attention(
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
    """Attention of the q new tokens over a ragged cache that already holds them.

    queries: [B, H_q, q, D], H_q = H_kv * g (query head j reads KV head j // g)
    keys, values: [N, D], the rows holding every (b, h) segment
    offsets: int64 [B * H_kv + 1], segments back to back: segment s = b * H_kv + h is rows
        offsets[s]:offsets[s + 1]; or, with gaps between segments allowed,
    starts, lengths: int64 [B * H_kv], segment s is rows starts[s] : starts[s] + lengths[s]
    (either form; a segment's last q entries are the new tokens, and query i sees all but its last
    q - 1 - i entries)
    scale: the score scale (usually D ** -0.5); softcap: Gemma-2's tanh cap on the scaled scores, or None
    returns [B, H_q, q, D] in the queries' dtype, computed in fp32.
    """
    if varlen_backend_for(queries) == "triton":
        from evictkit.kernels.varlen_attention_triton import varlen_attention_triton  # late: TRITON_INTERPRET

        return varlen_attention_triton(queries, keys, values, offsets, starts=starts, lengths=lengths, scale=scale,
                                       softcap=softcap)
    return varlen_attention_torch(queries, keys, values, offsets, starts=starts, lengths=lengths, scale=scale,
                                  softcap=softcap)
