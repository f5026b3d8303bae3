"""Ragged cache layers: each (batch row, KV head) stores exactly its own kept entries.

A policy that keeps a different number of entries per KV head (AdaKV) would otherwise leave
the layer left-padded to its longest head (evictkit.ragged), which saves memory only down to
that head's length. A `RaggedLayer` stores the kept entries flattened, `keys`/`values` [N, D]
in (row, head) order with `offsets` [B * H_kv + 1] (cu_seqlens style), and appends each new
token at the end of every segment.

It plugs into transformers through its public extension points, never by patching:

- `RaggedLayer` is a cache layer of the Cache API (a `DynamicLayer` subclass put in the
  cache's `layers` list in place of the layer it replaces);
- `varlen_attention` (kernels/varlen_attention*.py) is registered with transformers'
  `AttentionInterface` (and the matching mask function with `AttentionMaskInterface`) under a
  name of evictkit's own, and the model's config points at it only inside the `compress` block:
  `use_varlen_attention` sets both and restores them on exit (through evictkit.hf, the seam).
  Layers that are not ragged are handed to the model's own attention implementation unchanged.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any

import torch

from evictkit.fixed_cache import store_padded
from evictkit.hf import (
    DynamicLayer,
    attention_function,
    attn_implementation,
    dense_layer,
    mask_query_length,
    own_attention,
)
from evictkit.kernels import varlen_attention

#: attention implementations the varlen path can stand in front of (the others keep the padded layout)
SUPPORTED_IMPLS = ("sdpa", "eager")


class RaggedLayer(DynamicLayer):
    """One layer's cache with a kept length of its own per (row, KV head).

    keys, values: [N, D] flattened segments in (row, head) order; `counts` [B, H_kv] the entries
    of each segment (a Python-side copy in `_counts` avoids a host sync per decode step).
    """

    keys: torch.Tensor  # [N, D]
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.counts = counts.to(device=keys.device, dtype=torch.long)
        self._counts: list[int] = self.counts.flatten().tolist()
        self.device = keys.device
        self.is_initialized = True

    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor) -> RaggedLayer:
        """From the padded layout: [B, H_kv, K, D] with each head's first `pad[b, h]` slots padding."""
        K = keys.shape[2]
        counts = K - pad.to(keys.device)
        valid = torch.arange(K, device=keys.device) >= pad.to(keys.device)[..., None]  # [B, H, K]
        return cls(keys[valid], values[valid], counts)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.counts.shape)  # type: ignore[return-value]

    @property
    def offsets(self) -> torch.Tensor:
        """[B * H_kv + 1] int64 segment starts in `keys`/`values` (computed once per `counts`: the
        attention and the step both read it every forward)."""
        cached = getattr(self, "_offsets", None)
        if cached is None or cached[0] is not self.counts:
            flat = self.counts.flatten()
            cached = self._offsets = (self.counts, torch.cat([flat.new_zeros(1), flat.cumsum(0)]))
        return cached[1]

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The padded layout: keys, values [B, H_kv, K, D] (zeros before each head's entries) and
        pad [B, H_kv], K the longest segment."""
        B, H = self.shape
        K = max(self._counts, default=0)
        pad = K - self.counts
        valid = torch.arange(K, device=self.device) >= pad[..., None]
        out = []
        for flat in (self.keys, self.values):
            dense = flat.new_zeros(B, H, K, flat.shape[-1])
            dense[valid] = flat
            out.append(dense)
        return out[0], out[1], pad

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, H_kv, q, D] new entries at the end of every segment; returns the flat K/V."""
        B, H, q, D = key_states.shape
        self.keys = _append(self.keys, self._counts, key_states.reshape(B * H, q, D))
        self.values = _append(self.values, self._counts, value_states.reshape(B * H, q, D))
        self.counts = self.counts + q
        self._counts = [c + q for c in self._counts]
        _RAGGED[id(self.keys)] = self  # the attention function finds the layer from the keys it gets
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """The longest segment: the length of the padded layout this layer replaces."""
        return max(self._counts, default=0)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        return self.get_seq_length() + mask_query_length(query_length), 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row b takes old row beam_idx[b]'s segments (rows may repeat or drop: beam search)."""
        B, H = self.shape
        rows = beam_idx.tolist()
        seg_k = list(self.keys.split(self._counts))
        seg_v = list(self.values.split(self._counts))
        order = [b * H + h for b in rows for h in range(H)]
        self.keys = torch.cat([seg_k[s] for s in order])
        self.values = torch.cat([seg_v[s] for s in order])
        self.counts = self.counts[beam_idx.to(self.counts.device)]
        self._counts = self.counts.flatten().tolist()

    # DynamicLayer's own batch operations index dim 0 of [B, H_kv, T, D]; here dim 0 is tokens, so
    # each is answered in rows (contrastive search, assisted decoding) or refused, never inherited.
    def batch_repeat_interleave(self, repeats: int) -> None:
        """Every row repeated `repeats` times in place, as `DynamicLayer` does to its tensors."""
        B, _ = self.shape
        self.reorder_cache(torch.arange(B, device=self.counts.device).repeat_interleave(repeats))  # type: ignore[arg-type]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Only the rows `indices` kept, in that order."""
        self.reorder_cache(torch.as_tensor(indices, device=self.counts.device).long())  # type: ignore[arg-type]

    def crop(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(
            "a ragged evictkit cache layer cannot be cropped (its heads hold different tokens); assisted decoding "
            "and other crop users need ragged_layout='padded'")

    def lazy_initialization(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("a ragged evictkit cache layer is made from a padded one, never initialized empty")


def _append(flat: torch.Tensor, counts: list[int], new: torch.Tensor) -> torch.Tensor:
    """Interleave: segment s of `flat` followed by new[s], for every segment."""
    parts: list[torch.Tensor] = []
    for seg, add in zip(flat.split(counts), new.unbind(0)):
        parts += [seg, add]
    return torch.cat(parts)


# id(flat keys) -> the ragged layer that returned them from update(); weak, and checked by
# identity in the attention function (an id may be reused once its tensor is freed)
_RAGGED: weakref.WeakValueDictionary[int, RaggedLayer] = weakref.WeakValueDictionary()


def dense_kv(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Any cache layer's K/V as [B, H_kv, T, D] (a ragged one in its padded layout)."""
    if isinstance(layer, RaggedLayer):
        keys, values, _ = layer.padded()
        return keys, values
    return layer.keys, layer.values


def newest_keys(layer: RaggedLayer, before: int = 0) -> torch.Tensor:
    """[B, H_kv, D] each segment's newest key, `before` entries back from its end; zeros for a segment
    shorter than that (what the padded layout holds in that slot)."""
    B, H = layer.shape
    short = (layer.counts <= before).flatten()
    idx = (layer.offsets[1:] - 1 - before).clamp(min=0)
    keys = layer.keys[idx] if layer.keys.shape[0] else layer.keys.new_zeros(B * H, layer.keys.shape[-1])
    return keys.masked_fill(short[:, None], 0).view(B, H, -1)


def _name(impl: str) -> str:
    return f"evictkit_varlen_{impl}"


def _attention(impl: str) -> Any:
    """The registered attention function: varlen over a ragged layer, the model's own otherwise."""

    def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        layer = _RAGGED.get(id(key))
        if layer is None or layer.keys is not key:  # not ragged: the model's own implementation, its own mask
            return own_attention(module, impl)(module, query, key, value, attention_mask, *args, **kwargs)
        scale = kwargs.get("scaling")
        out = varlen_attention(query, key, value, layer.offsets,
                               scale=float(scale) if scale is not None else query.shape[-1] ** -0.5,
                               softcap=kwargs.get("softcap"))
        return out.transpose(1, 2).contiguous(), None  # [B, q, H_q, D], as transformers' functions return

    return attend


def serves(config: Any) -> bool:
    """Whether the varlen attention can serve a model with this config (its own implementation is
    one it stands in front of, or already evictkit's)."""
    impl = attn_implementation(config)
    return impl in SUPPORTED_IMPLS or (impl is not None and impl.startswith("evictkit_varlen_"))


def use_varlen_attention(config: Any) -> contextlib.AbstractContextManager[None]:
    """Point `config` at evictkit's varlen attention (registered under a name of its own) for the
    duration; restore the implementation and unregister on exit, exceptions included."""
    impl = attn_implementation(config)
    if impl not in SUPPORTED_IMPLS:
        raise ValueError(f"ragged layers need attn_implementation in {SUPPORTED_IMPLS}, got {impl!r}")
    return attention_function(config, _name(impl), _attention(impl), masks_like=impl)


#: how layers whose KV heads keep different counts are stored: "varlen" (each head its own length,
#: varlen attention; sdpa and eager models) or "padded" (left-padded to the longest head, per-head
#: masks: evictkit.ragged)
RAGGED_LAYOUTS = ("varlen", "padded")


class RaggedStore:
    """Where one compress block writes a step's K/V back, and what it undoes on exit: the varlen
    attention (on from the block's first ragged layer) and the caches it made ragged."""

    def __init__(self, layout: str) -> None:
        if layout not in RAGGED_LAYOUTS:
            raise ValueError(f"ragged_layout={layout!r}: must be one of {', '.join(RAGGED_LAYOUTS)} (how "
                             "layers whose KV heads keep different counts are stored)")
        self.layout = layout
        self._attention = contextlib.ExitStack()
        self._on = False
        self._caches: list[weakref.ref] = []

    def store(self, cache: Any, li: int, module: Any, pad: torch.Tensor | None, keys: torch.Tensor,
              values: torch.Tensor, headroom: int | None = None) -> None:
        """Ragged (flattened, one length per head) when the layer's heads differ and the varlen
        path serves this model, else in the padded layout (`store_padded`: while decoding, a
        fixed-capacity layer with room for `headroom` more entries)."""
        if pad is not None and self.layout == "varlen" and serves(module.config):
            if not self._on:  # the first ragged layer of this block
                self._attention.enter_context(use_varlen_attention(module.config))
                self._on = True
            if not any(ref() is cache for ref in self._caches):
                self._caches.append(weakref.ref(cache))
            cache.layers[li] = RaggedLayer.from_padded(keys, values, pad)
        else:
            store_padded(cache, li, keys, values, headroom)

    def close(self) -> None:
        """Give every cache made ragged its padded layout back (outside the block the model's own
        attention reads it, and its mask does not hide per-head padding), and the attention back."""
        for ref in self._caches:
            cache: Any = ref()
            for i, layer in enumerate(getattr(cache, "layers", ())):
                if isinstance(layer, RaggedLayer):
                    keys, values, _ = layer.padded()
                    cache.layers[i] = dense_layer(keys, values)
        self._caches.clear()
        self._attention.close()
        self._on = False
