"""Position modes for cached keys, and the RoPE re-rotation behind StreamingLLM's pos-shift.

- "absolute" (default): keys stay rotated at their true positions; new tokens get their true
  positions. Eviction leaves gaps in the position sequence.
- "shift" (StreamingLLM's pos-shift, also LaCache's): every cached key sits at its cache index
  0..T-1 and a new token gets position = cache length. The reference caches pre-RoPE keys and
  re-rotates all of them at every forward; evictkit keeps post-RoPE keys and, after each
  compaction, rotates every kept key by (new slot - old slot). RoPE rotations compose
  (R(a) R(b) = R(a + b)), so this is exact up to one rounding per eviction that moves the key.

Supported: the transformers `rotate_half` RoPE layout with a static `inv_freq` (default,
linear, llama3 and yarn rope types; partial rotary dims included). Rope types whose frequencies
depend on the sequence length (dynamic, longrope) are refused: re-rotation would not be exact.
"""

from __future__ import annotations

import torch
from torch import nn

POSITION_MODES = ("absolute", "shift")
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def check_position_mode(mode: object, param: str = "positions") -> None:
    """Raise ValueError unless `mode` is one of POSITION_MODES."""
    if mode not in POSITION_MODES:
        raise ValueError(f"{param}={mode!r}: must be one of {', '.join(map(repr, POSITION_MODES))}")


def rope_inv_freq(model: nn.Module) -> torch.Tensor:
    """The inverse frequencies `[D_rot / 2]` (fp32) of `model`'s single rotary embedding.

    Raises ValueError when the model has no standard rotary embedding, several different ones,
    or one whose frequencies change with the sequence length.
    """
    found: list[torch.Tensor] = []
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if not isinstance(inv_freq, torch.Tensor):
            continue
        rope_type = getattr(module, "rope_type", "default")
        if rope_type not in _STATIC_ROPE:
            raise ValueError(
                f"positions='shift' needs a RoPE whose frequencies do not depend on the length; "
                f"{type(module).__name__} uses rope_type={rope_type!r} (supported: {', '.join(_STATIC_ROPE)})"
            )
        if not any(torch.equal(inv_freq, f) for f in found):
            found.append(inv_freq)
    if len(found) != 1:
        raise ValueError(
            f"positions='shift' needs exactly one standard rotary embedding (a module with `inv_freq`); "
            f"{type(model).__name__} has {len(found)}"
        )
    return found[0].detach().float()


def rotate(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate RoPE'd `keys` by `delta` positions (the transformers `rotate_half` layout).

    keys: [B, H, K, D]; delta: [B, H, K] integer offsets (new position - old position);
    inv_freq: [D_rot / 2], D_rot <= D (dims past D_rot are not rotated, as in partial RoPE).
    Returns a new tensor of keys' dtype; the arithmetic runs in fp32 (fp64 for fp64 keys), and
    the angles in fp64 so large offsets lose nothing.
    """
    half = inv_freq.shape[-1]
    rot = 2 * half
    work = torch.float64 if keys.dtype == torch.float64 else torch.float32
    angle = delta.to(device=keys.device, dtype=torch.float64)[..., None] * inv_freq.to(
        device=keys.device, dtype=torch.float64
    )
    cos, sin = angle.cos().to(work), angle.sin().to(work)  # [B, H, K, D_rot / 2]
    x = keys[..., :rot].to(work)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(keys.dtype)
    if rot == keys.shape[-1]:
        return rotated
    return torch.cat([rotated, keys[..., rot:]], dim=-1)


def shift_to_slots(keys: torch.Tensor, idx: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """After compaction in "shift" mode: the kept key now in slot j sat in slot idx[j] (and was
    rotated at that position); rotate it to position j.

    keys: compacted [B, H, K, D]; idx: [B, H, K] the kept indices. Returns [B, H, K, D].
    """
    slots = torch.arange(idx.shape[-1], device=idx.device)
    delta = slots - idx
    if not bool(delta.any()):
        return keys
    return rotate(keys, delta, inv_freq)
