"""The varlen layer's fixed-capacity storage (evictkit.ragged_cache.RaggedLayer): segments in one
buffer with free rows after each, written in place by decode steps and decode-time compactions,
held to a plain reference (a Python list of each segment's entries) and, through a model, to the
padded ragged layout."""

import pytest
import torch

import evictkit
from evictkit.hf import cache_arg, cache_of, dense_layer
from evictkit.kernels import varlen_attention, varlen_attention_ref
from evictkit.layout import PaddedView, view_of
from evictkit.ragged_cache import RaggedLayer, RaggedStore, newest_keys
from evictkit.specs.tiny import tiny_model

B, H, D = 2, 3, 4


def _padded(lengths, *, K=None, seed=0):
    """keys, values [B, H, K, D] with lengths[b][h] real entries right-aligned (zeros before them), pad [B, H]."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    K = K or int(lens.max())
    keys, values = torch.randn(B, H, K, D, generator=g), torch.randn(B, H, K, D, generator=g)
    pad = K - lens
    hidden = torch.arange(K) < pad[..., None]
    return keys.masked_fill(hidden[..., None], 0), values.masked_fill(hidden[..., None], 0), pad


def _segments_of(keys, values, pad):
    """The reference: per segment (b * H + h), its (keys [n, D], values [n, D])."""
    return [(keys[b, h, int(pad[b, h]):].clone(), values[b, h, int(pad[b, h]):].clone())
            for b in range(keys.shape[0]) for h in range(keys.shape[1])]


def _padded_of(ref, rows):
    """The reference's padded layout: keys, values [rows, H, K, D] zeros before each segment, pad."""
    K, Dk = max(k.shape[0] for k, _ in ref), ref[0][0].shape[-1]
    keys, values = torch.zeros(rows, H, K, Dk), torch.zeros(rows, H, K, Dk)
    pad = torch.zeros(rows, H, dtype=torch.long)
    for s, (k, v) in enumerate(ref):
        b, h = divmod(s, H)
        n = k.shape[0]
        keys[b, h, K - n:], values[b, h, K - n:], pad[b, h] = k, v, K - n
    return keys, values, pad


def _assert_holds(layer, ref):
    """The layer holds exactly the reference's segments: read by start and length, in its padded
    layout, and back to back (segments())."""
    rows = len(ref) // H
    assert layer.shape == (rows, H)
    assert layer.counts.flatten().tolist() == [k.shape[0] for k, _ in ref]
    for s, (k, v) in enumerate(ref):
        lo, n = int(layer.starts[s]), int(layer.lengths[s])
        assert torch.equal(layer.keys[lo:lo + n], k) and torch.equal(layer.values[lo:lo + n], v)
    want = _padded_of(ref, rows)
    for got, exp in zip(layer.padded(), want):
        assert torch.equal(got, exp)
    keys, values, offsets = layer.segments()
    assert torch.equal(keys, torch.cat([k for k, _ in ref])) and torch.equal(values, torch.cat([v for _, v in ref]))
    assert offsets.tolist() == [0, *torch.tensor([k.shape[0] for k, _ in ref]).cumsum(0).tolist()]


def _new(rows=B, q=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, H, q, D, generator=g), torch.randn(rows, H, q, D, generator=g)


def _append(ref, k_new, v_new):
    """The reference after a step: new [rows, H, q, D] appended to every segment."""
    k_new, v_new = k_new.flatten(0, 1), v_new.flatten(0, 1)
    return [(torch.cat([k, k_new[s]]), torch.cat([v, v_new[s]])) for s, (k, v) in enumerate(ref)]


LENGTHS = [[5, 1, 9], [3, 7, 2]]


def test_from_padded_holds_exactly_the_entries_back_to_back():
    keys, values, pad = _padded(LENGTHS, K=11)
    layer = RaggedLayer.from_padded(keys, values, pad)
    assert layer.room == 0 and layer.keys.shape == (27, D)  # no free rows: N rows
    assert layer.starts.tolist() == [0, 5, 6, 15, 18, 25]
    _assert_holds(layer, _segments_of(keys, values, pad))
    k, v, _ = layer.segments()
    assert k.data_ptr() == layer.keys.data_ptr() and v.data_ptr() == layer.values.data_ptr()  # views, no copy


def test_decode_steps_write_in_place_until_the_room_is_used_up():
    keys, values, pad = _padded(LENGTHS)
    layer = RaggedLayer.from_padded(keys, values, pad, room=3)
    ref = _segments_of(keys, values, pad)
    assert layer.keys.shape[0] == 27 + 6 * 3 and layer.starts.tolist() == [0, 8, 12, 24, 30, 40]
    ptrs = (layer.keys.data_ptr(), layer.values.data_ptr())
    for step in range(3):
        k_new, v_new = _new(seed=step)
        out_k, out_v = layer.update(k_new, v_new)
        assert out_k is layer.keys and out_v is layer.values
        ref = _append(ref, k_new, v_new)
        _assert_holds(layer, ref)
        assert (layer.keys.data_ptr(), layer.values.data_ptr()) == ptrs  # written in place
        assert layer.room == 2 - step
    k_new, v_new = _new(seed=9)  # no room left: a new, larger buffer
    layer.update(k_new, v_new)
    ref = _append(ref, k_new, v_new)
    _assert_holds(layer, ref)
    assert layer.keys.data_ptr() != ptrs[0]
    assert layer.room >= 63  # grown by 64 rows a segment at least, one used
    ptr = layer.keys.data_ptr()
    k_new, v_new = _new(q=4, seed=10)  # a chunk of 4 fits the new room
    layer.update(k_new, v_new)
    _assert_holds(layer, _append(ref, k_new, v_new))
    assert layer.keys.data_ptr() == ptr


def test_growth_is_a_quarter_at_least():
    lengths = [[900, 1000, 800], [1200, 700, 1000]]  # 5600 entries: a quarter is 1400 rows, 234 a segment
    keys, values, pad = _padded(lengths)
    layer = RaggedLayer.from_padded(keys, values, pad)
    layer.update(*_new())
    assert layer.room == 233 and layer.keys.shape[0] == 5606 + 6 * 233
    ref = _append(_segments_of(keys, values, pad), *_new())
    _assert_holds(layer, ref)


def test_a_compaction_while_decoding_writes_into_the_buffer():
    keys, values, pad = _padded(LENGTHS)
    layer = RaggedLayer.from_padded(keys, values, pad, room=6)  # 27 + 36 rows
    ptr = layer.keys.data_ptr()
    # a compaction keeps 30 entries with headroom 3: 30 + 18 <= 63 <= 30 + 36, in place
    kept = [[6, 2, 8], [4, 5, 5]]
    k2, v2, p2 = _padded(kept, K=9, seed=5)
    layer.store(k2, v2, p2, headroom=3)
    assert layer.keys.data_ptr() == ptr and layer.keys.shape[0] == 63
    assert layer.room == 5  # the 33 rows left over, shared out
    ref = _segments_of(k2, v2, p2)
    _assert_holds(layer, ref)
    for step in range(5):  # the room it left is the decode steps'
        k_new, v_new = _new(seed=20 + step)
        layer.update(k_new, v_new)
        ref = _append(ref, k_new, v_new)
    _assert_holds(layer, ref)
    assert layer.keys.data_ptr() == ptr and layer.room == 0
    # far more room than twice the headroom: a new buffer of exactly entries + headroom
    k3, v3, p3 = _padded([[2, 1, 1], [1, 1, 2]], seed=6)
    layer.store(k3, v3, p3, headroom=1)
    assert layer.keys.data_ptr() != ptr and layer.keys.shape[0] == 8 + 6 and layer.room == 1
    _assert_holds(layer, _segments_of(k3, v3, p3))
    # too little room: a new buffer too
    k4, v4, p4 = _padded([[9, 9, 9], [9, 9, 9]], seed=7)
    layer.store(k4, v4, p4, headroom=2)
    assert layer.keys.shape[0] == 54 + 12 and layer.room == 2
    _assert_holds(layer, _segments_of(k4, v4, p4))


def test_a_compaction_of_the_layers_own_entries_is_safe():
    # the kept entries may be views of the buffer itself: read before the rows are overwritten
    keys, values, pad = _padded(LENGTHS)
    layer = RaggedLayer.from_padded(keys, values, pad, room=2)
    M = layer.keys.shape[0]
    view_k = layer.keys[:M - M % 6].view(B, H, -1, D)
    view_v = layer.values[:M - M % 6].view(B, H, -1, D)
    K = view_k.shape[2]
    p = torch.full((B, H), K - 3)
    want = _segments_of(view_k.clone(), view_v.clone(), p)
    layer.store(view_k, view_v, p, headroom=2)  # 18 entries + 12 <= 39 <= 18 + 24: in place
    assert layer.keys.shape[0] == M
    _assert_holds(layer, want)


def test_store_in_a_block_keeps_the_prefill_exact_and_decoding_in_place():
    model = tiny_model(layers=1, kv_heads=H, heads=6)
    module = model.model.layers[0].self_attn
    Dm = module.head_dim
    g = torch.Generator().manual_seed(0)

    def compacted(lengths, K):
        lens = torch.tensor(lengths)
        return torch.randn(B, H, K, Dm, generator=g), torch.randn(B, H, K, Dm, generator=g), K - lens

    class Cache:
        layers = [dense_layer(torch.zeros(B, H, 1, Dm), torch.zeros(B, H, 1, Dm))]

    cache, store = Cache(), RaggedStore("varlen")
    try:
        keys, values, pad = compacted(LENGTHS, 9)
        store.store(cache, 0, module, pad, keys, values, headroom=None)
        layer = cache.layers[0]
        assert isinstance(layer, RaggedLayer) and layer.room == 0 and layer.keys.shape[0] == 27  # prefill: exact
        keys, values, pad = compacted(LENGTHS, 9)
        store.store(cache, 0, module, pad, keys, values, headroom=4)  # decoding: a buffer with room
        layer = cache.layers[0]
        assert layer.room == 4 and layer.keys.shape[0] == 27 + 24
        ptr = layer.keys.data_ptr()
        keys, values, pad = compacted([[6, 2, 8], [4, 5, 2]], 8)  # 27 + 24 <= 51 rows <= 27 + 48
        store.store(cache, 0, module, pad, keys, values, headroom=4)
        assert cache.layers[0] is layer and layer.keys.data_ptr() == ptr  # the same layer, the same buffer
        _assert_holds(layer, _segments_of(*(t.masked_fill((torch.arange(8) < pad[..., None])[..., None], 0)
                                              for t in (keys, values)), pad))
    finally:
        store.close()
    assert not isinstance(cache.layers[0], RaggedLayer) and cache.layers[0].keys.shape == (B, H, 8, Dm)


def test_batch_operations_move_rows_with_their_room():
    keys, values, pad = _padded(LENGTHS)
    layer = RaggedLayer.from_padded(keys, values, pad, room=4)
    ref = _segments_of(keys, values, pad)
    k_new, v_new = _new()
    layer.update(k_new, v_new)
    ref = _append(ref, k_new, v_new)
    layer.reorder_cache(torch.tensor([1, 1, 0]))
    ref = [ref[b * H + h] for b in (1, 1, 0) for h in range(H)]
    assert layer.room == 3
    _assert_holds(layer, ref)
    ptr = layer.keys.data_ptr()
    k_new, v_new = _new(rows=3, seed=4)
    layer.update(k_new, v_new)  # still in place after the move
    ref = _append(ref, k_new, v_new)
    _assert_holds(layer, ref)
    assert layer.keys.data_ptr() == ptr
    layer.batch_select_indices(torch.tensor([2, 0]))
    ref = [ref[b * H + h] for b in (2, 0) for h in range(H)]
    _assert_holds(layer, ref)
    layer.batch_repeat_interleave(2)
    ref = [ref[b * H + h] for b in (0, 0, 1, 1) for h in range(H)]
    _assert_holds(layer, ref)
    assert layer.room == 2


@pytest.mark.parametrize("before", [0, 1, 2])
def test_newest_keys_with_gaps_match_the_padded_layout(before):
    keys, values, pad = _padded([[5, 1, 9], [3, 2, 1]])
    layer = RaggedLayer.from_padded(keys, values, pad, room=3)
    layer.update(*_new())
    padded_keys, padded_values, padded_pad = layer.padded()
    want = PaddedView(dense_layer(padded_keys, padded_values), padded_pad).newest_keys(before)
    assert torch.equal(newest_keys(layer, before), want)
    assert torch.equal(view_of(layer).newest_keys(before), want)


def test_varlen_attention_over_the_buffer_reads_only_the_segments():
    keys, values, pad = _padded(LENGTHS)
    layer = RaggedLayer.from_padded(keys, values, pad, room=5)
    layer.keys[:] = 1e4  # free rows full of garbage: the attention must never read them
    layer.values[:] = 1e4
    layer.store(keys, values, pad, headroom=5)
    k_new, v_new = _new(q=2)
    flat_k, flat_v = layer.update(k_new, v_new)
    queries = torch.randn(B, 2 * H, 2, D, generator=torch.Generator().manual_seed(3))
    out = varlen_attention(queries, flat_k, flat_v, starts=layer.starts, lengths=layer.lengths, scale=0.5)
    expected = varlen_attention_ref(queries, *layer.segments(), scale=0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert layer.keys.shape[0] > sum(layer.counts.flatten().tolist())  # there were free rows to avoid


def test_update_refuses_a_batch_of_another_shape():
    keys, values, pad = _padded(LENGTHS)
    layer = RaggedLayer.from_padded(keys, values, pad, room=2)
    with pytest.raises(ValueError, match="3 rows x 3 KV heads; this ragged layer holds"):
        layer.update(*_new(rows=3))


# --- through a model: decoding with a ragged policy ----------------------------------------------


def _decode(model, ids, layout, steps, slack):
    """Prefill then `steps` greedy decode steps under adakv; per step the logits and, per layer,
    the storage's data pointer (None for a layer that is not ragged)."""
    logits, ptrs = [], []
    with evictkit.compress(model, "adakv", budget=24, window=4, phase="both", slack=slack,
                           ragged_layout=layout) as run, torch.no_grad():
        out = model(ids, use_cache=True)
        cache = cache_of(out)
        for _ in range(steps):
            tok = out.logits[:, -1:].argmax(-1)
            out = model(tok, use_cache=True, **cache_arg(model, cache))
            logits.append(out.logits[:, -1])
            ptrs.append([layer.keys.data_ptr() if isinstance(layer, RaggedLayer) else None
                         for layer in cache.layers])
        kept = run.kept_positions()
    return logits, ptrs, kept


@pytest.mark.parametrize("slack", [0, 4])  # at slack 0 the heads of the tiny model often end a step equal
@pytest.mark.parametrize("rows", [1, 2])
def test_decoding_matches_the_padded_layout_and_stays_in_one_buffer(rows, slack):
    model = tiny_model(layers=2, kv_heads=2, heads=4)
    ids = torch.randint(3, 128, (rows, 90), generator=torch.Generator().manual_seed(rows))
    steps = 30
    dense, _, kept_dense = _decode(model, ids, "padded", steps, slack)
    varlen, ptrs, kept = _decode(model, ids, "varlen", steps, slack)
    for a, b in zip(varlen, dense):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert all(torch.equal(kept[li], kept_dense[li]) for li in kept)
    assert any(p is not None for step in ptrs for p in step)
    # after the first decode-time compaction (within slack + 1 steps) a layer decodes and compacts
    # in one buffer: once ragged it stays ragged (a step that leaves its heads equal keeps it there,
    # rather than moving it to the padded storage and back), and its buffer never moves (the
    # room covers slack + 1 new entries, so it never grows)
    for li in range(2):
        seen = [step[li] for step in ptrs[slack + 1:]]
        first = next(i for i, p in enumerate(seen) if p is not None)
        assert None not in seen[first:], f"layer {li} left the ragged storage while decoding"
        assert len(set(seen[first:])) == 1, f"layer {li}: a new buffer while decoding"


def test_cache_bytes_counts_the_entries_not_the_free_rows():
    from types import SimpleNamespace

    from evictkit.eval.engine import cache_bytes

    keys, values, pad = _padded(LENGTHS)
    roomy = RaggedLayer.from_padded(keys, values, pad, room=7)
    exact = RaggedLayer.from_padded(keys, values, pad)
    assert roomy.keys.shape[0] > exact.keys.shape[0]  # the storage has free rows ...
    entry = 2 * D * keys.element_size()  # K and V of one entry
    for layer in (roomy, exact):  # ... which a cache's size does not count
        assert cache_bytes(SimpleNamespace(layers=[layer])) == sum(map(sum, LENGTHS)) * entry
