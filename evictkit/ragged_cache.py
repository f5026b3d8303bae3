"""Ragged cache layers: each (batch row, KV head) stores exactly its own kept entries.

A policy that keeps a different number of entries per KV head (AdaKV) would otherwise leave
the layer left-padded to its longest head (evictkit.ragged), which saves memory only down to
that head's length. A `RaggedLayer` stores each (row, head) segment's kept entries in one
`[M, D]` buffer per K and V, segment s = b * H_kv + h at rows starts[s] : starts[s] + counts[s],
read by evictkit's varlen attention by start and length.

Like the padded layouts' `FixedLayer` (evictkit.fixed_cache), a layer that decodes lives in a
buffer with room: every segment is followed by free rows of its own, so a decode step writes its
token into each segment's next free row (`update`, one indexed write) instead of concatenating a
new cache-sized tensor, and a decode-time compaction writes the kept entries back into the same
buffer (`RaggedLayer.store`). The room is the same for every segment (each gets q entries a
step); it grows (a new buffer, by a quarter at least) when a step would overflow it, and a
compaction that leaves more than twice the room the next steps need gives the surplus back. A
prefill forward keeps exactly the entries, back to back (`store_padded` says why). Unlike a
buffer of one capacity for every segment, the room is added to each segment's own length, so
the layer holds its entries plus B * H_kv * room rows, not B * H_kv times its longest head.

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
    """One layer's cache with a kept length of its own per (row, KV head), in one buffer with gaps.

    keys, values: [M, D] storage. Segment s = b * H_kv + h holds its `counts[b, h]` entries at rows
    starts[s] : starts[s] + counts[b, h] (`starts` int64 [B * H_kv], in (row, head) order), followed
    by at least `room` free rows of its own; free rows hold stale values that nothing reads. With
    room 0 the segments lie back to back from row 0 (`segments()` then reads them without a copy).
    The varlen attention reads the segments by `starts` and `lengths`. Python-side copies of the
    counts (`_counts`) and the room spare a host sync per decode step.
    """

    keys: torch.Tensor  # [M, D]
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor,
                 starts: torch.Tensor | None = None, room: int = 0) -> None:
        """keys, values [M, D]; counts [B, H_kv]; starts [B * H_kv] (None: back to back from row 0);
        room: the free rows after every segment (what the starts leave, and 0 when they are None)."""
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        counts = counts.to(device=keys.device, dtype=torch.long)
        if starts is None:
            starts = _back_to_back(counts.flatten().tolist(), 0, keys.device)[0]
        self._set(keys, values, counts, starts, room)

    def _set(self, keys: torch.Tensor, values: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor,
             room: int) -> None:
        self.keys, self.values = keys, values
        self.counts = counts
        self._counts: list[int] = counts.flatten().tolist()
        self.starts = starts
        self.room = room
        _RAGGED[id(keys)] = self  # the attention function finds the layer from the keys it gets

    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor, room: int = 0) -> RaggedLayer:
        """From the padded layout: [B, H_kv, K, D] with each head's first `pad[b, h]` slots padding;
        each segment followed by `room` free rows (0: exactly the entries, back to back)."""
        B, H, K, _ = keys.shape
        counts = (K - pad.to(keys.device)).long()
        listed = counts.flatten().tolist()
        starts, rows = _back_to_back(listed, room, keys.device)
        src = torch.arange(B * H, device=keys.device) * K + pad.to(keys.device).flatten()
        out = []
        for x in (keys, values):
            buf = x.new_empty(rows, x.shape[-1])
            _gather_segments(x.reshape(B * H * K, x.shape[-1]), src, listed, starts, room, buf)
            out.append(buf)
        return cls(out[0], out[1], counts, starts, room)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.counts.shape)  # type: ignore[return-value]

    @property
    def lengths(self) -> torch.Tensor:
        """[B * H_kv] int64 entries of each segment (a view of `counts`)."""
        return self.counts.flatten()

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The entries back to back: keys, values [N, D] in (row, head) order and offsets
        [B * H_kv + 1] (cu_seqlens style); views of the storage when it has no gaps, else a copy."""
        flat = self.lengths
        offsets = torch.cat([flat.new_zeros(1), flat.cumsum(0)])
        n = sum(self._counts)
        if self.room == 0:  # no free rows: the segments already lie back to back from row 0
            return self.keys[:n], self.values[:n], offsets
        out = []
        for x in (self.keys, self.values):
            buf = x.new_empty(n, x.shape[-1])
            _gather_segments(x, self.starts, self._counts, offsets[:-1], 0, buf)
            out.append(buf)
        return out[0], out[1], offsets

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The padded layout: keys, values [B, H_kv, K, D] (zeros before each head's entries) and
        pad [B, H_kv], K the longest segment."""
        B, H = self.shape
        K = max(self._counts, default=0)
        pad = K - self.counts
        if K == 0:
            return (self.keys.new_zeros(B, H, 0, self.keys.shape[-1]),
                    self.values.new_zeros(B, H, 0, self.values.shape[-1]), pad)
        slot = torch.arange(K, device=self.device)
        valid = slot >= pad[..., None]  # [B, H, K]
        rows = (self.starts.view(B, H, 1) + slot - pad[..., None]).clamp_(0, self.keys.shape[0] - 1)
        out = []
        for flat in (self.keys, self.values):
            dense = flat[rows.flatten()].view(B, H, K, flat.shape[-1])
            out.append(dense.masked_fill_(~valid[..., None], 0))
        return out[0], out[1], pad

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Write [B, H_kv, q, D] new entries into every segment's next free rows (one indexed write;
        a new buffer only when the room is used up); returns the storage, keys and values [M, D]."""
        B, H, q, D = key_states.shape
        if (B, H) != self.shape:
            raise ValueError(f"key_states has {B} rows x {H} KV heads; this ragged layer holds {self.shape}")
        if q > self.room:
            # by a quarter at least (and 64 rows a segment): a layer that decodes without evicting
            # reallocates rarely; a compaction gives the surplus back (RaggedLayer.store)
            self._relayout(self._counts, self.starts, max(q, 64, -(-sum(self._counts) // (4 * B * H))))
        rows = self.starts + self.lengths
        if q > 1:
            rows = (rows[:, None] + torch.arange(q, device=rows.device)).flatten()
        self.keys.index_copy_(0, rows, key_states.reshape(B * H * q, D))
        self.values.index_copy_(0, rows, value_states.reshape(B * H * q, value_states.shape[-1]))
        self.counts = self.counts + q
        self._counts = [c + q for c in self._counts]
        self.room -= q  # written in place: the buffer `_set` registered in _RAGGED is the same
        return self.keys, self.values

    def _relayout(self, counts: list[int], src_starts: torch.Tensor, room: int,
                  counts_t: torch.Tensor | None = None) -> None:
        """New buffers holding segments of `counts` (segment s read from this storage's rows
        src_starts[s]...), each followed by `room` free rows."""
        starts, rows = _back_to_back(counts, room, self.device)
        bufs = []
        for x in (self.keys, self.values):
            buf = x.new_empty(rows, x.shape[-1])
            _gather_segments(x, src_starts, counts, starts, room, buf)
            bufs.append(buf)
        self._set(bufs[0], bufs[1], self.counts if counts_t is None else counts_t, starts, room)

    def store(self, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor, headroom: int) -> None:
        """Hold exactly a compaction's entries, keys/values [B, H_kv, K, D] with `pad` [B, H_kv]
        leading padding slots per head, with room for `headroom` more in every segment: in place
        (one gather into the buffer) unless the shape asks for a new buffer, or the room does: too
        little, or more than twice the headroom left over (the room a layer grew while it decoded
        without evicting is given back)."""
        B, H, K, D = keys.shape
        counts = (K - pad.to(keys.device)).long()
        listed = counts.flatten().tolist()
        S, n, M = B * H, sum(listed), self.keys.shape[0]
        same = ((B, H) == self.shape and D == self.keys.shape[-1] and values.shape[-1] == self.values.shape[-1]
                and keys.dtype == self.keys.dtype and keys.device == self.keys.device)
        if not same or S == 0 or not n + S * headroom <= M <= n + 2 * S * headroom:
            fresh = RaggedLayer.from_padded(keys, values, pad, room=headroom)
            self._set(fresh.keys, fresh.values, fresh.counts, fresh.starts, fresh.room)
            return
        if _shares(keys, self.keys) or _shares(values, self.values):  # never read rows while writing them
            keys, values = keys.clone(), values.clone()
        room = (M - n) // S  # the rows left over, shared out: between headroom and twice that
        starts, _ = _back_to_back(listed, room, keys.device)
        src = torch.arange(S, device=keys.device) * K + pad.to(keys.device).flatten()
        for x, buf in ((keys, self.keys), (values, self.values)):
            _gather_segments(x.reshape(S * K, x.shape[-1]), src, listed, starts, room, buf)
        self._set(self.keys, self.values, counts, starts, room)

    def get_seq_length(self) -> int:
        """The longest segment: the length of the padded layout this layer replaces."""
        return max(self._counts, default=0)

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        return self.get_seq_length() + mask_query_length(query_length), 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row b takes old row beam_idx[b]'s segments (rows may repeat or drop: beam search); the
        segments keep their room."""
        B, H = self.shape
        rows = beam_idx.tolist()
        if rows == list(range(B)):
            return
        idx = beam_idx.to(self.counts.device)
        order = (idx[:, None] * H + torch.arange(H, device=idx.device)).flatten()
        counts = self.counts[idx]
        self._relayout(counts.flatten().tolist(), self.starts[order], self.room, counts)

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


def _back_to_back(counts: list[int], room: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """starts [S] int64 of segments of `counts` laid one after the other from row 0, each followed
    by `room` free rows, and the rows they span (computed on the host: no device sync)."""
    starts, at = [], 0
    for c in counts:
        starts.append(at)
        at += c + room
    return torch.tensor(starts, dtype=torch.long, device=device), at


def _gather_segments(src: torch.Tensor, src_starts: torch.Tensor, counts: list[int], starts: torch.Tensor,
                     room: int, out: torch.Tensor) -> None:
    """Write segment s, the counts[s] rows of `src` [R, D] from src_starts[s], to rows starts[s]... of
    `out` [M, D] (the layout of `_back_to_back(counts, room)`): one index_select into `out`'s
    front, with no copy of the entries in between. The free rows get some row of src (never read).
    `out` must not overlap `src`."""
    S = len(counts)
    span = sum(counts) + S * room
    if span == 0 or src.shape[0] == 0:
        return
    dev = src.device
    width = torch.tensor(counts, dtype=torch.long, device=dev)
    seg = torch.repeat_interleave(torch.arange(S, device=dev), width + room, output_size=span)
    within = torch.arange(span, device=dev) - starts[seg]
    # a free row copies its segment's last entry (the clamp keeps every index inside src)
    rows = (src_starts[seg] + torch.minimum(within, width[seg] - 1)).clamp_(0, src.shape[0] - 1)
    if torch.is_grad_enabled() and src.requires_grad:  # autograd does not follow out=
        out[:span] = src.index_select(0, rows)
    else:
        torch.index_select(src, 0, rows, out=out[:span])


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one storage."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


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
    D = layer.keys.shape[-1]
    if layer.keys.shape[0] == 0:
        return layer.keys.new_zeros(B, H, D)
    short = (layer.counts <= before).flatten()
    idx = (layer.starts + layer.lengths - 1 - before).clamp(0, layer.keys.shape[0] - 1)
    return layer.keys[idx].masked_fill(short[:, None], 0).view(B, H, D)


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
        out = varlen_attention(query, key, value, starts=layer.starts, lengths=layer.lengths,
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
        fixed-capacity layer with room for `headroom` more entries). A ragged layer that decodes
        stays ragged when a step leaves its heads equal (no padding): moving it to the padded
        storage and back at the next uneven step would cost two new buffers."""
        if pad is None and headroom is not None and isinstance(cache.layers[li], RaggedLayer):
            pad = torch.zeros(keys.shape[:2], dtype=torch.long, device=keys.device)
        if pad is not None and self.layout == "varlen" and serves(module.config):
            if not self._on:  # the first ragged layer of this block
                self._attention.enter_context(use_varlen_attention(module.config))
                self._on = True
            if not any(ref() is cache for ref in self._caches):
                self._caches.append(weakref.ref(cache))
            layer = cache.layers[li]
            if headroom is not None and isinstance(layer, RaggedLayer):
                layer.store(keys, values, pad, headroom)  # decoding: in place, in the layer's buffer
            else:  # a prefill forward keeps exactly the entries (store_padded says why)
                cache.layers[li] = RaggedLayer.from_padded(keys, values, pad, room=headroom or 0)
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
