"""`Observation.from_tensors` (the constructor engines such as vLLM use: post-RoPE queries, no
transformers module) shows a policy what the hook-built Observation shows it, so the same policy
selects the same entries."""

from __future__ import annotations

import pytest
import torch

import evictkit
from evictkit.attention import project_queries
from evictkit.observation import Observation
from evictkit.specs.tiny import tiny_attention

B, HQ, HKV, D, T, LAYER = 1, 4, 2, 16, 40, 1


def _pair(window: int) -> tuple[Observation, Observation]:
    module, rope = tiny_attention(HQ, HKV, D, LAYER, "float32")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, HQ * D, generator=g)
    keys, values = torch.randn(B, HKV, T, D, generator=g), torch.randn(B, HKV, T, D, generator=g)
    pos = torch.arange(T).expand(B, T)
    cos, sin = rope(hidden, pos)
    common = dict(layer_idx=LAYER, n_layers=2, phase="prefill", keys=keys, values=values,
                  positions=pos[:, None].expand(B, HKV, T), state={}, scratch={}, query_positions=pos,
                  window=window, phases=("prefill",))
    hooked = Observation(module=module, hidden_states=hidden, position_embeddings=(cos, sin), **common)
    with torch.no_grad():
        queries = project_queries(module, hidden, cos, sin)
    built = Observation.from_tensors(
        keys=keys, values=values, queries=queries, query_positions=pos, scaling=module.scaling, layer_idx=LAYER,
        n_layers=2, window=window, o_proj_weight=module.o_proj.weight,
    )
    return hooked, built


def test_views_match():
    hooked, built = _pair(window=8)
    assert (built.q_len, built.n_heads, built.n_kv_heads, built.head_dim) == (T, HQ, HKV, D)
    assert built.scaling == hooked.scaling and built.softcap == hooked.softcap
    torch.testing.assert_close(built.positions, hooked.positions)
    torch.testing.assert_close(built.queries, hooked.queries)
    torch.testing.assert_close(built.window_queries, hooked.window_queries)
    torch.testing.assert_close(built.window_positions, hooked.window_positions)
    torch.testing.assert_close(built.window_attention, hooked.window_attention)
    assert built.o_proj_weight is hooked.o_proj_weight


@pytest.mark.parametrize("name", ["streaming_llm", "snapkv", "h2o_prefill", "tova", "pyramidkv", "restkv", "random"])
def test_same_selection(name):
    windowed = name in ("snapkv", "h2o_prefill", "pyramidkv", "restkv")
    policy = evictkit.policy(name, **({"window": 8} if windowed else {}))
    hooked, built = _pair(window=policy.needs().window)
    policy.observe(hooked)
    policy.observe(built)
    with torch.no_grad():
        assert torch.equal(policy.select(hooked, 16), policy.select(built, 16))


def test_without_o_proj_weight_says_so():
    _, built = _pair(window=1)
    bare = Observation.from_tensors(keys=built.keys, values=built.values, queries=built.queries,
                                    query_positions=built.query_positions, scaling=1.0, layer_idx=0, n_layers=1,
                                    window=1)
    assert bare.positions.shape == (B, HKV, T)
    with pytest.raises(ValueError, match="o_proj_weight"):
        _ = bare.o_proj_weight
