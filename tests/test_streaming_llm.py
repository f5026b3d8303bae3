"""StreamingLLM: positional selection, the laws on tiny models, and the pos-shift mode."""

from __future__ import annotations

import pytest
import torch
from generation import assert_generation_unchanged, generate_with_snapshots, prompt_ids
from models import tiny_model
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import evictkit
from evictkit.hf import cache_arg, cache_of

PROMPT, NEW = 24, 10


def _ids(n: int = PROMPT, seed: int = 0) -> torch.Tensor:
    return prompt_ids(n, seed)


def _generate(model, ids, new=NEW, **compress):
    """Greedy tokens, per-step logits, and the true positions each layer held after each forward."""
    out, snaps, _ = generate_with_snapshots(model, ids, "streaming_llm", new, **compress)
    return out.sequences, torch.stack(out.logits), snaps


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("positions", ["absolute", "shift"])
def test_keeps_sinks_and_recent_every_step(arch, positions):
    model = tiny_model(arch)
    budget, sinks = 10, 3
    _, _, snaps = _generate(model, _ids(), budget=budget, sinks=sinks, positions=positions)
    assert len(snaps) == NEW
    for step, snap in enumerate(snaps):
        seen = PROMPT + step
        expected = torch.cat([torch.arange(sinks), torch.arange(seen - (budget - sinks), seen)])
        for pos in snap.values():
            assert pos.shape[-1] == budget
            assert torch.equal(pos[0, 0], expected) and bool((pos == pos[:, :1]).all())


def test_slack_bounds_the_size():
    model = tiny_model("llama")
    _, _, snaps = _generate(model, _ids(), budget=10, slack=4, sinks=2)
    sizes = [next(iter(s.values())).shape[-1] for s in snaps]
    assert sizes[0] == 10 and max(sizes) <= 14 and len(set(sizes)) > 1


@pytest.mark.parametrize("positions", ["absolute", "shift"])
def test_no_op_when_the_budget_holds_everything(positions):
    model = tiny_model("qwen2")
    assert_generation_unchanged(model, _ids(), "streaming_llm", NEW, budget=PROMPT + NEW, positions=positions)


def test_shift_gives_new_tokens_the_cache_length():
    model = tiny_model("llama", layers=2)
    seen: list[tuple[int, list[int]]] = []

    def before(module, args, kwargs):
        layer = cache_of(kwargs).layers[module.layer_idx]
        held = layer.keys.shape[2] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
        seen.append((held, kwargs["position_ids"][0].tolist()))

    handle = model.model.layers[1].self_attn.register_forward_pre_hook(before, with_kwargs=True)
    try:
        tokens, _, _ = _generate(model, _ids(), budget=8, positions="shift")
    finally:
        handle.remove()
    assert tokens.shape[1] == PROMPT + NEW
    assert seen[0] == (0, list(range(PROMPT)))
    assert len(seen) == NEW and all(held == 8 and pos == [8] for held, pos in seen[1:])


def _rope(model, x: torch.Tensor, pos: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    cos, sin = model.model.rotary_emb(x, pos.view(1, -1))
    out, _ = apply_rotary_pos_emb(x, x, cos, -sin if inverse else sin)
    return out


def test_shift_matches_the_reference_pre_rope_cache():
    """The reference (streaming-llm pos_shift) caches pre-RoPE keys and rotates the whole cache to
    0..T-1 before every forward. Rebuild that by hand and compare every step's logits."""
    model = tiny_model("llama", layers=2, dtype=torch.float64)
    ids, budget, sinks = _ids(), 9, 2
    tokens, logits, _ = _generate(model, ids, budget=budget, sinks=sinks, positions="shift")

    n_layers = len(model.model.layers)
    raw_k: list[torch.Tensor] = []
    raw_v: list[torch.Tensor] = []
    for step in range(NEW):
        cache = DynamicCache(config=model.config)
        length = raw_k[0].shape[2] if raw_k else 0
        for li in range(n_layers if raw_k else 0):
            cache.update(_rope(model, raw_k[li], torch.arange(length)), raw_v[li], li)
        chunk = ids if step == 0 else tokens[:, PROMPT + step - 1 : PROMPT + step]
        pos = torch.arange(length, length + chunk.shape[1]).unsqueeze(0)
        out = model(input_ids=chunk, position_ids=pos, **cache_arg(model, cache), use_cache=True)
        torch.testing.assert_close(out.logits[:, -1].float(), logits[step], rtol=0, atol=1e-5)
        total = length + chunk.shape[1]
        keep = torch.arange(total) if total <= budget else torch.cat(
            [torch.arange(sinks), torch.arange(total - (budget - sinks), total)]
        )
        raw_k = [_rope(model, cache.layers[li].keys, torch.arange(total), inverse=True)[:, :, keep]
                 for li in range(n_layers)]
        raw_v = [cache.layers[li].values[:, :, keep] for li in range(n_layers)]


def test_bad_parameters_name_themselves():
    with pytest.raises(ValueError, match="positions"):
        evictkit.policy("streaming_llm", positions="pos_shift")
    with pytest.raises(ValueError, match="sinks"):
        evictkit.policy("streaming_llm", sinks=-1)
    assert evictkit.policy("streaming_llm").positions == "absolute"
