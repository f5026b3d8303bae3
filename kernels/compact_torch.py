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
    if x.device.type == "cpu" and x.is_contiguous() and idx.numel():
        # Whole-row index_select on the flattened [B*H*T, D] view is 5-15x faster than gather on
        # CPU (gather reads one index per element, not per row; benchmarks/test_bench_compaction.py).
        # On CUDA it is the other way round (the compaction suite with --device cuda), so gather stays there.
        # Rows are offset per (b, h), so an index outside [0, T) would silently read a neighbour
        # head's row where gather raises: check the range first (the index is D times smaller).
        B, H, T, D = x.shape
        lo, hi = torch.aminmax(idx)  # one pass over the indices
        if int(lo) < 0 or int(hi) >= T:
            raise IndexError(f"compaction index out of range [0, {T})")
        rows = idx + torch.arange(0, B * H * T, T, device=idx.device).view(B, H, 1)
        return x.view(B * H * T, D).index_select(0, rows.reshape(-1)).view(*idx.shape, D)
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))
