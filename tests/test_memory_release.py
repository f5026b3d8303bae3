"""evictkit hands the heap's freed pages back to the OS during prefill (after each layer's step and
between prefill forwards, evictkit.memory), never during decode, and not at all with
release_memory=False."""

import importlib

import pytest
import torch

import evictkit
from evictkit.memory import release_freed_memory
from evictkit.specs.tiny import tiny_model

compress_module = importlib.import_module("evictkit.compress")  # the module: evictkit.compress is the function


def test_release_freed_memory_runs_where_glibc_has_it():
    import ctypes
    import sys

    has = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")
    assert release_freed_memory() is has


@pytest.mark.parametrize("release", [True, False])
def test_released_after_each_prefill_chunk_and_never_while_decoding(monkeypatch, release):
    calls = []
    monkeypatch.setattr(compress_module, "release_freed_memory", lambda: calls.append(1) or True)
    model = tiny_model(layers=2)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with evictkit.compress(model, "snapkv", budget=16, window=4, prefill_chunk=16, release_memory=release):
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    # chunks of 8, 16, 16 (aligned to the end): a release after each of the 2 layers' steps in the
    # chunks that continue the sequence (4; the first chunk starts it), and before chunks 2 and 3
    # and before the first decode step (3); the 4 later decode steps follow a one-token forward and
    # release nothing
    assert len(calls) == (7 if release else 0)


def test_a_one_shot_prompt_is_released_after_its_forward_not_layer_by_layer(monkeypatch):
    calls = []
    monkeypatch.setattr(compress_module, "release_freed_memory", lambda: calls.append(1) or True)
    model = tiny_model(layers=2)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    with evictkit.compress(model, "snapkv", budget=16, window=4):
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert len(calls) == 1  # before the first decode step only


def test_release_memory_must_be_a_bool():
    with pytest.raises(ValueError, match="release_memory=1: must be True"):
        evictkit.compress(tiny_model(layers=1), "snapkv", budget=16, window=4, release_memory=1)
