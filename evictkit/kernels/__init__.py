"""Compaction kernels: gather the kept rows of K, V and side tensors.

`compact(x, idx)` is what every policy's eviction ends in. It dispatches to the Triton
kernel on CUDA when the kept bytes are large enough for it to beat torch.gather (see
`compact.TRITON_MIN_BYTES`) and to the torch path otherwise; `EVICTKIT_COMPACT_BACKEND=triton|torch`
forces one (`auto` is the default).

`varlen_attention(queries, keys, values, starts=..., lengths=..., scale=...)` is attention over a
ragged (per-head) cache stored flattened, each segment read by its start row and length (gaps of
free rows between segments allowed; cu_seqlens-style `offsets` are accepted too): Triton on CUDA,
torch elsewhere (`kernels/varlen_attention_ref.py` describes the layout).
"""

from evictkit.kernels.compact import backend_for, compact, compact_many
from evictkit.kernels.compact_torch import compact_torch
from evictkit.kernels.varlen_attention import varlen_attention, varlen_backend_for
from evictkit.kernels.varlen_attention_ref import varlen_attention_ref
from evictkit.kernels.varlen_attention_torch import varlen_attention_torch

__all__ = [
    "backend_for",
    "compact",
    "compact_many",
    "compact_torch",
    "varlen_attention",
    "varlen_attention_ref",
    "varlen_attention_torch",
    "varlen_backend_for",
]
