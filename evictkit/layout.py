"""How a managed layer stores its entries: one view per storage layout, so the core asks, never checks types.

Two storages hold every layout evictkit makes:

- padded (`PaddedView`): transformers' own `[B, H_kv, T, D]` tensors. With `pad` None it is the
  dense layer. With `pad` [B, H_kv] the first `pad[b, h]` slots of head h of row b are padding
  (true position -1), hidden from attention by a mask of the layer's own size: this is the
  head-padded layout of a ragged selection (evictkit.ragged) and the layout of a left-padded batch
  (evictkit.rows), whose rows are padded on the left to the longest one.
- varlen (`VarlenView` over evictkit.ragged_cache.RaggedLayer): per-(row, head) segments in one
  buffer (free rows between them while decoding), read by evictkit's varlen attention by start
  and length, which needs no mask.

A view answers what the per-layer step asks of a layer (`Sequence.step`): its length in slots,
its K/V in the padded layout, each row's newest key (beam search is followed by it), its real
entries, whether reading it costs a copy, and whether the core must give its attention a mask.
Writing a step's K/V back, and choosing the storage for it, is `RaggedStore.store`'s.

"Real entries" has one definition: a slot is real when its true position is >= 0
(`real_counts`); `real_entries` is its fast form from the padding counts, which every layout
keeps equal to it.
"""

from __future__ import annotations

from typing import Any

import torch

from evictkit.hf import dense_layer
from evictkit.ragged_cache import RaggedLayer, newest_keys


def real_counts(positions: torch.Tensor) -> torch.Tensor:
    """[B, H_kv] real entries of each (row, KV head), from true positions [B, H_kv, T] (-1 = padding)."""
    return (positions >= 0).sum(-1)


def real_per_row(pad: torch.Tensor | None, n_kv_heads: int, slots: int) -> torch.Tensor | int:
    """Real entries of each row summed over its KV heads, [B] (an int when nothing is padding):
    `real_counts(positions).sum(-1)` read from the padding counts [B, H_kv], which lead each head."""
    return n_kv_heads * slots if pad is None else n_kv_heads * slots - pad.sum(-1)


def real_entries(pad: torch.Tensor | None, n_kv_heads: int, slots: int) -> int:
    """Real entries of a layer summed over its KV heads, for its fullest row: `real_per_row(...).max()`,
    with no pass over the positions."""
    per_row = real_per_row(pad, n_kv_heads, slots)
    return per_row if isinstance(per_row, int) else int(per_row.max())


class LayerView:
    """What the step reads of one cache layer, whatever its storage (see the module docstring)."""

    #: reading K/V costs a copy (the step skips it when the policy neither observes nor evicts)
    costly_to_read: bool = False
    #: the core gives the layer's attention a mask of the layer's own size
    masked: bool = True

    @property
    def slots(self) -> int:
        """T, the length of the padded layout."""
        raise NotImplementedError

    @property
    def n_kv_heads(self) -> int:
        raise NotImplementedError

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [B, H_kv, T, D] in the padded layout."""
        raise NotImplementedError

    def newest_keys(self, before: int = 0) -> torch.Tensor:
        """[B, H_kv, D] each row's newest key, `before` entries back from its end."""
        raise NotImplementedError

    def real_entries(self) -> int:
        """Real entries summed over the KV heads, for the fullest row."""
        raise NotImplementedError

    def padded_layer(self) -> Any:
        """The same entries as a transformers layer in the padded storage (the layer itself if it is one)."""
        raise NotImplementedError


class PaddedView(LayerView):
    """A transformers layer's `[B, H_kv, T, D]` tensors; `pad` [B, H_kv] leading padding slots
    (None: dense)."""

    def __init__(self, layer: Any, pad: torch.Tensor | None) -> None:
        self.layer, self.pad = layer, pad

    @property
    def slots(self) -> int:
        return self.layer.keys.shape[2]

    @property
    def n_kv_heads(self) -> int:
        return self.layer.keys.shape[1]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layer.keys, self.layer.values

    def newest_keys(self, before: int = 0) -> torch.Tensor:
        return self.layer.keys[:, :, self.slots - 1 - before]

    def real_entries(self) -> int:
        return real_entries(self.pad, self.n_kv_heads, self.slots)

    def padded_layer(self) -> Any:
        return self.layer


class VarlenView(LayerView):
    """A `RaggedLayer`: each (row, KV head) holds exactly its own entries (its padded layout and
    newest keys are read by start and length, never assuming the segments lie back to back)."""

    costly_to_read = True
    masked = False

    def __init__(self, layer: RaggedLayer) -> None:
        self.layer = layer

    @property
    def slots(self) -> int:
        return self.layer.get_seq_length()

    @property
    def n_kv_heads(self) -> int:
        return self.layer.shape[1]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values, _ = self.layer.padded()
        return keys, values

    def newest_keys(self, before: int = 0) -> torch.Tensor:
        return newest_keys(self.layer, before)

    def real_entries(self) -> int:
        return int(self.layer.counts.sum(-1).max())

    def padded_layer(self) -> Any:
        return dense_layer(*self.kv())


def view_of(layer: Any, pad: torch.Tensor | None = None) -> LayerView:
    """The view of a cache layer; `pad` is the padding the layer state tracks for the padded storage."""
    if isinstance(layer, RaggedLayer):
        return VarlenView(layer)
    return PaddedView(layer, pad)


__all__ = ["LayerView", "PaddedView", "VarlenView", "real_counts", "real_entries", "real_per_row", "view_of"]
