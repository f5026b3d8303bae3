"""`dense`: the model's own attention for prefill (the default; installs nothing).

`evictkit.prefill_attention(model, "dense")` and `compress(..., prefill_attention="dense")` leave
the model's attention implementation alone, so prefill is bit-identical to no prefill attention.
`attend` (used by the laws and the benchmarks, never by a model) is SDPA, causal with offset S - q.
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from evictkit import PrefillAttention, PrefillOutput, hookimpl


@attrs.frozen
class Dense(PrefillAttention):
    """Dense causal attention: every causal (query, key) pair. Density 1. No parameters."""

    name: ClassVar[str] = "dense"
    summary: ClassVar[str] = "the model's own dense attention (default; installs nothing)"
    dense: ClassVar[bool] = True

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scale: float) -> PrefillOutput:
        B, Hq, q, _ = query.shape
        S = key.shape[2]
        gqa = Hq != key.shape[1]
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if q == S:  # the fused causal kernel, as the model's own sdpa runs a one-shot prefill
            out = sdpa(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            slots = torch.arange(S, device=query.device)
            causal = slots[None, :] <= slots[S - q:, None]
            out = sdpa(query, key, value, attn_mask=causal, scale=scale, enable_gqa=gqa)
        pairs = B * Hq * (q * (S - q) + q * (q + 1) // 2)
        return PrefillOutput(out, pairs, pairs)


@hookimpl
def evictkit_register_prefill_attention(register):
    register(Dense)
