"""Dispatcher of the compaction core: Triton on CUDA, torch elsewhere."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from evictkit.kernels.compact_torch import compact_torch

BACKENDS = ("auto", "triton", "torch")
_ENV = "EVICTKIT_COMPACT_BACKEND"


def backend_for(x: torch.Tensor) -> str:
    """The backend `compact` uses for `x`: the env var if set, else triton on CUDA, else torch."""
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"{_ENV}={choice!r}: must be one of {', '.join(BACKENDS)}")
    if choice == "auto":
        return "triton" if x.is_cuda and _triton_available() else "torch"
    return choice


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
    if backend_for(x) == "triton":
        from evictkit.kernels.compact_triton import compact_triton  # imported late: TRITON_INTERPRET is read at import

        return compact_triton(x, idx)
    return compact_torch(x, idx)


def compact_many(tensors: Sequence[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """`compact` applied to K, V and every side tensor with the same indices."""
    return [compact(t, idx) for t in tensors]
