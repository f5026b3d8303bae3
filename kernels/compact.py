"""Dispatcher of the compaction core: Triton on CUDA for large compactions, torch otherwise."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from evictkit.kernels.compact_torch import compact_torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "EVICTKIT_COMPACT_BACKEND"


#: Kept bytes from which the Triton kernel beats torch on CUDA, by element size. Below them its
#: fixed ~35 us host-side launch costs more than torch.gather moves (one-call latencies on an
#: H200, docs/benchmarks.md: bf16 crosses over between 8 and 16 MiB kept, fp32, where gather
#: runs twice as fast, between 64 and 128 MiB).
TRITON_MIN_BYTES = {1: 12 << 20, 2: 12 << 20, 4: 96 << 20, 8: 96 << 20}


def backend_for(x: torch.Tensor, kept: int | None = None) -> str:
    """The backend `compact` uses for `x` [B, H, T, (D)] keeping `kept` rows per head: the env
    var if set; else on CUDA the Triton kernel when the kept bytes reach TRITON_MIN_BYTES (or
    `kept` is None), torch below; torch elsewhere."""
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{_ENV}={choice!r}: must be one of {', '.join(BACKENDS)}")
    if choice != "auto":
        return choice
    if not (x.is_cuda and _triton_available()):
        return "torch"
    return "triton" if kept is None or triton_pays(x, kept) else "torch"


def triton_pays(x: torch.Tensor, kept: int) -> bool:
    """Whether keeping `kept` rows per head of `x` moves enough bytes for the Triton kernel."""
    row = x.shape[3] if x.dim() == 4 else 1
    kept_bytes = x.shape[0] * x.shape[1] * kept * row * x.element_size()
    return kept_bytes >= TRITON_MIN_BYTES.get(x.element_size(), 12 << 20)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def compact(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Keep rows `idx` of `x` along the sequence axis.

    x:   [B, H, T, D] (keys, values) or [B, H, T] (side tensors)
    idx: [B, H, K] int64 in [0, T), usually sorted ascending so kept entries stay in order
    returns a new contiguous tensor [B, H, K, D] (or [B, H, K]).
    """
    if idx.dim() != 3 or idx.shape[:2] != x.shape[:2]:
        raise ValueError(f"idx must be [B, H, K] matching x's [B, H] = {tuple(x.shape[:2])}, got {tuple(idx.shape)}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be [B, H, T, D] or [B, H, T], got shape {tuple(x.shape)}")
    idx = idx.to(device=x.device, dtype=torch.long)
    if backend_for(x, idx.shape[-1]) == "triton":
        from evictkit.kernels.compact_triton import compact_triton  # imported late: TRITON_INTERPRET is read at import

        return compact_triton(x, idx)
    return compact_torch(x, idx)


def compact_many(tensors: Sequence[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """`compact` applied to K, V and every side tensor with the same indices."""
    return [compact(t, idx) for t in tensors]
