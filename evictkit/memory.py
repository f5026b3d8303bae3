"""Freed heap memory handed back to the OS during prefill (glibc's `malloc_trim`).

Under glibc's default allocator the buffers a prefill forward frees stay in the process's heap:
after a large block is freed, glibc raises its mmap threshold (up to 32 MiB), so later
temporaries of a forward (attention and MLP buffers of a chunk, several MiB each) come from the
heap instead of their own mappings, and freed holes stay resident between the live blocks (each
layer's compacted K/V). How far the resident set grows then depends on the order of frees, so it
varies from run to run. Measured on SmolLM2 fp32 (snapkv, budget 1024, an 8k prompt with a mask in
chunks of 2048, one thread, fresh processes; issue 23, docs/benchmarks.md):

- a trim before each forward only: peaks of 154 to 475 MiB above the loaded model through
  evictkit's chunker, 147 to 606 through `generate(prefill_chunk_size=2048)`;
- a trim after each layer's step in a prefill forward too: 136 to 207 MiB, for 0.55 to 0.97 s of
  a 60-70 s prefill;
- glibc with a fixed threshold (`MALLOC_MMAP_THRESHOLD_=65536`, set by the user): 126 to 127.

`evictkit.compress(..., release_memory=True)` (the default) calls `release_freed_memory` after
each managed layer's step in a prefill chunk that continues a sequence, and before a forward that
follows a prefill forward; decode steps never pay for it, nor does a one-shot prompt's forward
layer by layer: there the trim made the next layer fault its pages back in, 5% of a 4k prefill
(19.1 -> 20.0 s at one thread), for a peak that is the forward's own anyway. Setting the
threshold from the library would change the whole process's allocator for good (glibc has no way
back to its dynamic mode), so evictkit does not; the trim only returns memory already freed.
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
