"""Fixed-capacity cache layers: a layer under eviction lives in one buffer allocated for its sequence.

transformers' `DynamicLayer` concatenates every forward's new K/V onto a new tensor, and each
eviction gathers the kept entries into another: a long chunked prefill or a decode loop allocates
a fresh cache-sized tensor per layer per forward. Under a budget the layer never holds more than
budget + slack + 1 entries while decoding, so once a layer decodes evictkit holds it in a
`FixedLayer`: one `[B, H_kv, capacity, D]` buffer per K and V, `keys`/`values` being views of its
first `n` slots. A decode step writes its token into the next free slot (`update`), and a
decode-time compaction writes the kept entries back to the front (`FixedLayer.store`), so a step
moves one token's bytes instead of the whole cache's. Prefill forwards keep transformers' plain
layer (`store_padded` says why: a buffer with a chunk's room in every layer holds more memory).

It is a `DynamicLayer` of transformers' Cache API, so everything that reads a cache reads it
unchanged. Its capacity grows if a later forward brings more tokens than the room left (by half
at least, so a layer that decodes without evicting reallocates rarely), and a compaction that
leaves more than twice the room the next forward needs shrinks it (the chunks' room is given back
when decoding starts). Operations it inherits that replace
`keys`/`values` with new tensors (beam search's `reorder_cache`, `batch_repeat_interleave`,
`crop`, `offload`) keep working: the next `update` adopts the new tensors into a buffer.
"""

from __future__ import annotations

from typing import Any

import torch

from evictkit.hf import DynamicLayer, dense_layer


class FixedLayer(DynamicLayer):
    """A padded-storage cache layer in a preallocated buffer; `keys`/`values` [B, H_kv, n, D] are views."""

    keys: torch.Tensor  # never None: made from entries, emptied by `reset` in place
    values: torch.Tensor

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
        if n + q > self.capacity:  # by a quarter at least: a layer that grows without evicting reallocates rarely
            self._adopt(self.keys, self.values, max(n + q, self.capacity + max(64, self.capacity // 4)))
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
        keeping room for `headroom` more; in place unless the shape asks for a new buffer, or the room
        does: too little, or more than twice the headroom left over (a prefill's room for chunks is
        given back when decoding starts)."""
        self._own()
        if keys is self.keys and values is self.values:
            return  # the layer's own entries: nothing moved
        B, H, K, D = keys.shape
        room = self.capacity - K
        if (B, H, D) != (self._k.shape[0], self._k.shape[1], self._k.shape[3]) or not headroom <= room <= 2 * headroom:
            self._adopt(keys, values, K + headroom)
            return
        # the kept entries are a gather's fresh tensors, never views of the buffer: copying is safe
        self._k[:, :, :K] = keys
        self._v[:, :, :K] = values
        self._set(K)


def store_padded(cache: Any, li: int, keys: torch.Tensor, values: torch.Tensor, headroom: int | None) -> None:
    """Write a compacted layer of the padded storage back into `cache.layers[li]`: with `headroom`
    (decoding) as a `FixedLayer` with room for that many more entries, made from the layer the
    first time; with None (a prefill forward) as a plain layer holding exactly the entries. A
    prefill chunk needs budget + chunk slots in one layer at a time; a buffer with that room in
    every layer would hold budget + chunk in all of them for the whole prefill (three times the
    budget at chunks of 2048 and budget 1024)."""
    layer = cache.layers[li]
    if headroom is None:
        if type(layer) is DynamicLayer:
            layer.keys, layer.values = keys, values
        else:
            cache.layers[li] = dense_layer(keys, values)
    elif isinstance(layer, FixedLayer):
        layer.store(keys, values, headroom)
    else:
        cache.layers[li] = FixedLayer(keys, values, keys.shape[2] + headroom)


def hold_for_decoding(cache: Any, li: int, headroom: int) -> None:
    """A plain padded layer that decodes becomes a `FixedLayer` (one copy), so the next decode steps
    write into its free slots instead of concatenating a new cache-sized tensor each."""
    layer = cache.layers[li]
    keys, values = layer.keys, layer.values
    if type(layer) is DynamicLayer and keys is not None and values is not None and keys.numel():
        cache.layers[li] = FixedLayer(keys, values, keys.shape[2] + headroom)


__all__ = ["FixedLayer", "hold_for_decoding", "store_padded"]
