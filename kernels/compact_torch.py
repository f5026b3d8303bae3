"""The torch fallback of the compaction core, and the plain reference the kernel is held to."""

from __future__ import annotations

import torch


def compact_torch(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather rows of `x` along the sequence axis.

    x:   [B, H, T, D] or [B, H, T] (side tensors: positions, running scores)
    idx: [B, H, K] int64, each in [0, T)
    returns [B, H, K, D] (or [B, H, K]), contiguous, same dtype and device as `x`.
    """
    if x.dim() == 3:
        return torch.gather(x, 2, idx)
    # gather beat index_select and advanced indexing for this layout on CPU
    # (benchmarks/test_bench_compaction.py); expand() is a view, no copy of idx.
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
