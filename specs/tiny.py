"""Tiny random transformers models and attention modules for the laws (built from config, no downloads).

The conformance kit cannot import the project's tests/, and a third-party package has no tests/
of ours, so it carries its own small builders. Weights are seeded and built under a forked RNG,
so building a model never disturbs the caller's random state.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

#: architectures the end-to-end laws draw from (RoPE attention in the transformers layout)
ARCHS = ("llama", "qwen2", "mistral")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _config(arch: str, *, layers: int, heads: int, kv_heads: int, head_dim: int, vocab: int):
    from transformers import GemmaConfig, LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "gemma": GemmaConfig}
    if arch not in classes:
        raise ValueError(f"arch={arch!r}: must be one of {', '.join(classes)}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    config = classes[arch](
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=8192,
        # no eos: generate() runs the requested number of tokens on a random model
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    if arch == "mistral":
        config.sliding_window = None  # a sliding layer would be left alone by evictkit
    return config


def tiny_model(
    arch: str = "llama",
    *,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    vocab: int = 128,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn: str = "sdpa",
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A randomly initialised causal LM in eval mode (hidden size heads * head_dim, MLP twice
    that), on `device`. Weights depend on the seed only, not on the device: they are drawn on CPU."""
    from transformers import GemmaForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    config = _config(arch, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=vocab)
    config._attn_implementation = attn
    model_cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM,
                 "gemma": GemmaForCausalLM}[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(device=device, dtype=dtype).eval()


@functools.lru_cache(maxsize=16)
def cached_tiny_model(arch: str, layers: int, heads: int, kv_heads: int, head_dim: int, dtype: str) -> nn.Module:
    """`tiny_model` shared between examples (evictkit.compress leaves no trace on a model)."""
    return tiny_model(arch, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPES[dtype])


@functools.lru_cache(maxsize=64)
def tiny_attention(heads: int, kv_heads: int, head_dim: int, layer_idx: int, dtype: str) -> tuple[nn.Module, nn.Module]:
    """A Llama attention module and its rotary embedding, for building synthetic Observations.

    returns (attention, rope): `rope(x, position_ids [B, q])` gives (cos, sin) [B, q, head_dim].
    """
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = _config("llama", layers=max(layer_idx + 1, 1), heads=heads, kv_heads=kv_heads, head_dim=head_dim, vocab=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234 + layer_idx)
        attention = LlamaAttention(config, layer_idx).to(DTYPES[dtype]).eval()
        rope = LlamaRotaryEmbedding(config).eval()
    attention.requires_grad_(False)
    return attention, rope
