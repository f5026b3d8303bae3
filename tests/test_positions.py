"""RoPE re-rotation (evictkit.positions): exact composition, the transformers layout, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from evictkit.positions import check_position_mode, rope_inv_freq, rotate, shift_to_slots


def _inv_freq(dim: int, base: float = 10000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _hf_rotate(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """transformers' own RoPE (x: [1, H, T, D], pos: [T]), in float64."""
    freqs = pos.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)[None]  # [1, T, D]
    out, _ = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
    return out


def test_rotation_composes_to_the_direct_rotation():
    torch.manual_seed(0)
    inv = _inv_freq(16)
    raw = torch.randn(1, 3, 6, 16, dtype=torch.float64)
    old = torch.tensor([0, 5, 17, 300, 1024, 4000])
    new = torch.tensor([0, 1, 2, 3, 4, 5])
    at_old = _hf_rotate(raw, old, inv)
    direct = _hf_rotate(raw, new, inv)
    delta = (new - old).expand(1, 3, 6)
    moved = rotate(at_old, delta, inv)
    torch.testing.assert_close(moved, direct, rtol=0, atol=1e-9)
    # and rotating from zero is transformers' RoPE itself
    torch.testing.assert_close(rotate(raw, old.expand(1, 3, 6), inv), at_old, rtol=0, atol=1e-9)


def test_partial_rotary_leaves_the_tail_alone():
    torch.manual_seed(1)
    inv = _inv_freq(8)  # rotates the first 8 of 12 dims
    keys = torch.randn(2, 2, 5, 12, dtype=torch.float64)
    out = rotate(keys, torch.full((2, 2, 5), 3), inv)
    assert torch.equal(out[..., 8:], keys[..., 8:])
    expected = _hf_rotate(keys[..., :8].reshape(1, 4, 5, 8), torch.full((5,), 3), inv).reshape(2, 2, 5, 8)
    torch.testing.assert_close(out[..., :8], expected, rtol=0, atol=1e-12)


def test_fp32_keys_keep_their_dtype():
    keys = torch.randn(1, 1, 4, 8)
    out = rotate(keys, torch.tensor([[[-1, -2, -3, 0]]]), _inv_freq(8).float())
    assert out.dtype == torch.float32 and out.shape == keys.shape
    assert torch.equal(out[..., 3, :], keys[..., 3, :])  # delta 0 moves nothing


def test_shift_to_slots_moves_each_key_from_its_old_slot():
    torch.manual_seed(2)
    inv = _inv_freq(8)
    raw = torch.randn(1, 2, 10, 8, dtype=torch.float64)
    cached = _hf_rotate(raw, torch.arange(10), inv)  # pos-shift invariant: slot == position
    idx = torch.tensor([[0, 1, 6, 9], [0, 2, 3, 8]]).unsqueeze(0)
    kept = torch.gather(cached, 2, idx[..., None].expand(1, 2, 4, 8))
    out = shift_to_slots(kept, idx, inv)
    expected = _hf_rotate(torch.gather(raw, 2, idx[..., None].expand(1, 2, 4, 8)), torch.arange(4), inv)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_mode_names_and_model_support():
    check_position_mode("absolute")
    check_position_mode("shift")
    with pytest.raises(ValueError, match="positions"):
        check_position_mode("pos_shift")

    from models import tiny_model

    model = tiny_model("llama")
    assert torch.equal(rope_inv_freq(model), model.model.rotary_emb.inv_freq.float())
    model.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        rope_inv_freq(model)
    with pytest.raises(ValueError, match="rotary embedding"):
        rope_inv_freq(torch.nn.Linear(2, 2))
