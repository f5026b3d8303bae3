"""Fixed-capacity cache layers (evictkit.fixed_cache): while decoding, one buffer per layer, written in place."""

import pytest
import torch
from generation import prompt_ids

import evictkit
from evictkit.fixed_cache import FixedLayer
from evictkit.hf import DynamicLayer, cache_arg, new_cache
from evictkit.specs.tiny import tiny_model


def _kv(b=2, h=3, n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)


def _dynamic(keys, values):
    layer = DynamicLayer()
    layer.update(keys, values)
    return layer


def test_updates_and_compactions_write_in_place_and_match_a_dynamic_layer():
    keys, values = _kv()
    fixed, plain = FixedLayer(keys, values, capacity=9), _dynamic(keys, values)
    buffer = fixed.keys.data_ptr()
    for step in range(4):
        k, v = _kv(n=1, seed=step + 1)
        got, want = fixed.update(k, v), plain.update(k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert fixed.get_seq_length() == plain.get_seq_length() == 9 and fixed.keys.data_ptr() == buffer
    kept = torch.tensor([0, 2, 7, 8])
    fixed.store(fixed.keys[:, :, kept].clone(), fixed.values[:, :, kept].clone(), headroom=5)
    assert fixed.get_seq_length() == 4 and fixed.keys.data_ptr() == buffer  # in place: 4 + 5 fit in 9
    assert torch.equal(fixed.keys, plain.keys[:, :, kept]) and torch.equal(fixed.values, plain.values[:, :, kept])


def test_capacity_grows_when_a_forward_brings_more_than_the_room_left():
    keys, values = _kv()
    fixed = FixedLayer(keys, values, capacity=6)
    k, v = _kv(n=4, seed=3)
    fixed.update(k, v)  # 9 > 6: grown by 64 slots at least (a quarter for large layers), not one at a time
    assert fixed.capacity == 6 + 64 and torch.equal(fixed.keys[:, :, 5:], k) and torch.equal(fixed.keys[:, :, :5], keys)
    buffer = fixed.keys.data_ptr()
    fixed.update(*_kv(n=1, seed=5))
    assert fixed.keys.data_ptr() == buffer and fixed.get_seq_length() == 10


def test_a_compaction_gives_back_room_it_no_longer_needs():
    keys, values = _kv(n=9)
    fixed = FixedLayer(keys, values, capacity=9)
    fixed.store(keys[:, :, :4].clone(), values[:, :, :4].clone(), headroom=1)  # 5 spare slots > 2 x 1
    assert fixed.capacity == 5 and torch.equal(fixed.keys, keys[:, :, :4])
    fixed.store(keys[:, :, 1:4].clone(), values[:, :, 1:4].clone(), headroom=1)  # 2 spare slots: kept
    assert fixed.capacity == 5 and fixed.get_seq_length() == 3


@pytest.mark.parametrize("op,arg", [("reorder_cache", torch.tensor([1, 1])), ("batch_repeat_interleave", 2),
                                    ("batch_select_indices", torch.tensor([1])), ("crop", -2)])
def test_inherited_operations_that_replace_the_tensors_keep_working(op, arg):
    keys, values = _kv()
    fixed, plain = FixedLayer(keys, values, capacity=8), _dynamic(keys, values)
    getattr(fixed, op)(arg)
    getattr(plain, op)(arg)
    k, v = _kv(b=plain.keys.shape[0], n=1, seed=9)
    got, want = fixed.update(k, v), plain.update(k, v)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_reset_empties_the_layer_and_keeps_the_buffer():
    keys, values = _kv()
    fixed = FixedLayer(keys, values, capacity=8)
    fixed.reset()
    assert fixed.get_seq_length() == 0 and fixed.capacity == 8
    k, v = _kv(n=2, seed=4)
    assert torch.equal(fixed.update(k, v)[0], k)


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


@pytest.mark.parametrize("chunk", [None, 16])
def test_a_decoding_sequence_keeps_one_buffer_per_layer(model, chunk):
    """A prefill leaves transformers' plain layers (each compacted to its budget); the first decode
    step holds each in a FixedLayer, and later decode steps (phase='both', slack 3: evictions
    every few steps) write into it without a new buffer."""
    ids, budget, slack = prompt_ids(70), 24, 3
    with torch.no_grad(), evictkit.compress(model, "snapkv", budget=budget, window=4, phase="both", slack=slack,
                                            prefill_chunk=chunk):
        cache = new_cache(model)
        logits = model(ids, **cache_arg(model, cache)).logits[:, -1]
        assert all(type(layer) is DynamicLayer and layer.get_seq_length() == budget for layer in cache.layers)
        logits = model(logits.argmax(-1)[:, None], **cache_arg(model, cache)).logits[:, -1]
        assert all(isinstance(layer, FixedLayer) and layer.capacity == budget + 1 + slack + 1
                   for layer in cache.layers)
        buffers = [layer._k.data_ptr() for layer in cache.layers]
        for _ in range(12):
            logits = model(logits.argmax(-1)[:, None], **cache_arg(model, cache)).logits[:, -1]
        assert [layer._k.data_ptr() for layer in cache.layers] == buffers
        assert all(layer.get_seq_length() <= budget + slack for layer in cache.layers)
