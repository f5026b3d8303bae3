"""evictkit.hf, the seam to transformers: the same answers on every supported transformers."""

import pytest
import torch

from evictkit import hf
from evictkit.specs.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


def test_a_forward_call_puts_the_cache_under_this_transformers_name(model):
    forward = hf.Forward(model)
    assert forward.cache_kwarg == hf.cache_kwarg(model)
    ids, cache = torch.ones(1, 3, dtype=torch.long), hf.new_cache(model)
    stale = "past_key_values" if forward.cache_kwarg == "cache" else "cache"
    args, kwargs = forward.call((ids,), {stale: object()}, cache=cache, position_ids=torch.arange(3)[None])
    bound = forward.arguments(args, kwargs)
    assert bound[forward.cache_kwarg] is cache and stale not in bound
    assert torch.equal(bound["input_ids"], ids) and bound["position_ids"].tolist() == [[0, 1, 2]]
    out = model(*args, **kwargs)
    assert hf.cache_of(out) is cache and cache.get_seq_length() == 3


def test_the_cache_is_found_under_either_name():
    cache = object()
    assert hf.cache_in({"cache": cache}) is cache
    assert hf.cache_in({"past_key_values": cache, "cache": None}) is cache
    assert hf.cache_in({}) is None


def test_an_attention_function_is_registered_for_the_block_only_even_on_error(model):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config, before = model.config, hf.attn_implementation(model)
    with pytest.raises(RuntimeError, match="inside"):
        with hf.attention_function(config, "evictkit_test_attn", hf.own_attention(model, before), masks_like=before):
            assert hf.attn_implementation(model) == "evictkit_test_attn"
            assert "evictkit_test_attn" in ALL_ATTENTION_FUNCTIONS
            model(torch.ones(1, 4, dtype=torch.long))  # the model runs through it
            raise RuntimeError("inside")
    assert hf.attn_implementation(model) == before
    assert "evictkit_test_attn" not in ALL_ATTENTION_FUNCTIONS


def test_a_mask_size_query_is_read_as_an_int_or_a_cache_position():
    assert hf.mask_query_length(5) == 5
    assert hf.mask_query_length(torch.arange(7, 12)) == 5  # transformers before 5.24: cache_position
