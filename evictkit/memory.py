"""Freed heap memory handed back to the OS between prefill forwards (glibc's `malloc_trim`).

Under glibc's default allocator the buffers a prefill forward frees stay in the process's heap
arenas (the mmap threshold rises after large frees, and each thread allocates from its own
arena), so the resident set of a long prompt prefilled in chunks keeps earlier chunks' freed
buffers, and how much varies from run to run. Measured (docs/benchmarks.md, issue 23): snapkv at
budget 1024, an 8k prompt with a mask in chunks of 2048, three fresh processes each: 653, 482 and
152 MiB above the loaded model without a trim between chunks, 257, 152 and 280 MiB with one.
`evictkit.compress(..., release_memory=True)` (the default) calls `release_freed_memory` before a
forward that follows a prefill forward (a chunk); decode steps never pay for it.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, looked up once; None where there is none (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS (`malloc_trim(0)`); False where the C library has no
    malloc_trim. Live tensors are untouched: only memory already freed is released."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


__all__ = ["release_freed_memory"]
