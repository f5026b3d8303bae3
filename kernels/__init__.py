"""Compaction kernels: gather the kept rows of K, V and side tensors.

`compact(x, idx)` is what every policy's eviction ends in. It dispatches to the Triton
kernel on CUDA when the kept bytes are large enough for it to beat torch.gather (see
`compact.TRITON_MIN_BYTES`) and to the torch path otherwise; `EVICTKIT_COMPACT_BACKEND=triton|torch`
forces one (`auto` is the default).
"""

from evictkit.kernels.compact import backend_for, compact, compact_many
from evictkit.kernels.compact_torch import compact_torch

__all__ = ["backend_for", "compact", "compact_many", "compact_torch"]
