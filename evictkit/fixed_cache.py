"""Fixed-capacity cache layers: a layer under eviction lives in one buffer allocated for its sequence.

transformers' `DynamicLayer` concatenates every forward's new K/V onto a new tensor, and each
eviction gathers the kept entries into another: a long chunked prefill or a decode loop allocates
a fresh cache-sized tensor per layer per forward. Under a budget the layer never holds more than
budget + the largest forward's new tokens (budget + chunk, or budget + slack + 1), so after its
first eviction evictkit moves it into a `FixedLayer`: one `[B, H_kv, capacity, D]` buffer per K
and V, `keys`/`values` being views of its first `n` slots. A forward writes its new tokens into
the next free slots (`update`), and a compaction writes the kept entries back to the front
(`FixedLayer.store`), so the memory a layer holds stops following the prompt.

It is a `DynamicLayer` of transformers' Cache API, so everything that reads a cache reads it
unchanged. Its capacity grows (one reallocation) if a later forward brings more tokens than the
room left, e.g. a long question after the context. Operations it inherits that replace
`keys`/`values` with new tensors (beam search's `reorder_cache`, `batch_repeat_interleave`,
`crop`, `offload`) keep working: the next `update` adopts the new tensors into a buffer.
"""

from __future__ import annotations

from typing import Any

import torch

from evictkit.hf import DynamicLayer


class FixedLayer(DynamicLayer):
    """A padded-storage cache layer in a preallocated buffer; `keys`/`values` [B, H_kv, n, D] are views."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._adopt(keys, values, capacity)

    @property
    def capacity(self) -> int:
        return self._k.shape[2]

    def _adopt(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """A new buffer of max(capacity, n) slots holding `keys`/`values` [B, H_kv, n, D] in front."""
        B, H, n, D = keys.shape
        cap = max(capacity, n)
        self._k = keys.new_empty(B, H, cap, D)
        self._v = values.new_empty(B, H, cap, values.shape[-1])
        self._k[:, :, :n] = keys
        self._v[:, :, :n] = values
        self._set(n)

    def _set(self, n: int) -> None:
        self._n = n
        self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]
        self._views = (self.keys, self.values)

    def _own(self) -> None:
        """Adopt `keys`/`values` again if an inherited operation replaced the views."""
        if self.keys is not self._views[0] or self.values is not self._views[1]:
            self._adopt(self.keys, self.values, self.capacity)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H_kv, q, D] new entries into the next free slots; returns the views of all n + q."""
        self._own()
        n, q = self._n, key_states.shape[2]
        if n + q > self.capacity:
            self._adopt(self.keys, self.values, n + q)
        self._k[:, :, n:n + q] = key_states
        self._v[:, :, n:n + q] = value_states
        self._set(n + q)
        return self.keys, self.values

    def reset(self) -> None:
        """Empty, keeping the buffer (transformers' `Cache.reset`)."""
        self._own()
        self._set(0)

    def store(self, keys: torch.Tensor, values: torch.Tensor, headroom: int = 0) -> None:
        """Hold exactly `keys`/`values` [B, H_kv, K, D] (a compaction's result) in the buffer's front,
        keeping room for `headroom` more; in place unless the shape or the room asks for a new buffer."""
        self._own()
        if keys is self.keys and values is self.values:
            return  # the layer's own entries: nothing moved
        B, H, K, D = keys.shape
        if (B, H, D) != (self._k.shape[0], self._k.shape[1], self._k.shape[3]) or K + headroom > self.capacity:
            self._adopt(keys, values, K + headroom)
            return
        # the kept entries are a gather's fresh tensors, never views of the buffer: copying is safe
        self._k[:, :, :K] = keys
        self._v[:, :, :K] = values
        self._set(K)


def store_fixed(cache: Any, li: int, keys: torch.Tensor, values: torch.Tensor, headroom: int) -> None:
    """Write a compacted layer of the padded storage back into `cache.layers[li]`, as a `FixedLayer`
    with room for `headroom` more entries (made from the layer the first time)."""
    layer = cache.layers[li]
    if isinstance(layer, FixedLayer):
        layer.store(keys, values, headroom)
    else:
        cache.layers[li] = FixedLayer(keys, values, keys.shape[2] + headroom)


__all__ = ["FixedLayer", "store_fixed"]
