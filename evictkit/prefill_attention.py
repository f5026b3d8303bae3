"""Prefill attention in a model: a registered `PrefillAttention` serves the prefill forwards of a block.

`evictkit.use_prefill_attention(model, "vertical_slash", **params)` (alone) or
`evictkit.compress(model, policy, budget=..., prefill_attention="vertical_slash")` (with eviction)
enter a `PrefillScope`. It registers one attention function per wrapped implementation with
transformers' `AttentionInterface` under a name of evictkit's own (`evictkit_prefill_sdpa`,
`evictkit_prefill_eager`) and points the model's config at it for the duration, through
evictkit.hf (restored on exit, exceptions included; nothing is patched). The function sends a
forward to the plugin only when it is a prefill forward the plugin can serve:

- more than one query token (decode steps run the model's own attention, unchanged);
- the mask is plain causal (no padding, no sliding window: `_plain_causal`), no softcap, no
  attention sinks, no dropout; everything else runs the model's own attention.

Chunked prefill: a chunk's queries are the last q of the S cached slots; the plugin sees the whole
retained cache as keys (causal offset S - q). After an eviction the slots are no longer token
positions, so a pattern laid out by distance (window, slash) is laid out in slots there.

Ragged layers: a policy whose per-head counts differ (capability tag `ragged_heads`, AdaKV) is
refused with a prefill attention: its layers need the varlen attention or per-head masks over the
model's own implementation, and transformers points a config at one function. Every other policy
keeps equal counts, so `ragged_layout` never comes into play.

Policies are unaffected in what they read: every policy recomputes the attention it scores from
the layer's hidden states (window queries, all queries) over all keys, densely, so its scores are
exact given the hidden states; only layers >= 1 see different hidden states, because earlier layers'
attention was sparse.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack
from typing import Any, cast

import attrs
import torch
from torch import nn

from evictkit.contract import Policy, capabilities
from evictkit.hf import attention_function, attention_modules, attn_implementation, own_attention
from evictkit.prefill_contract import PrefillAttention
from evictkit.registry import build_prefill_attention

#: attention implementations a prefill attention can stand in front of
SUPPORTED_IMPLS = ("sdpa", "eager")

# attention module -> the scope serving it (weak: nothing is set on the user's model)
_SCOPES: weakref.WeakKeyDictionary[nn.Module, PrefillScope] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@attrs.define
class PrefillStats:
    """What the prefill attention did: per layer, the pairs computed and the causal pairs of the
    forwards it served; `fallbacks` counts multi-token forwards it handed to the model's own attention."""

    computed: dict[int, int] = attrs.field(factory=dict)
    causal: dict[int, int] = attrs.field(factory=dict)
    forwards: int = 0
    fallbacks: int = 0

    def add(self, layer: int, computed: int, causal: int) -> None:
        self.computed[layer] = self.computed.get(layer, 0) + computed
        self.causal[layer] = self.causal.get(layer, 0) + causal
        self.forwards += 1

    def density(self, layer: int | None = None) -> float:
        """Computed / causal pairs, over every layer (None) or one; 1.0 when nothing was served."""
        if layer is not None:
            return self.computed.get(layer, 0) / self.causal[layer] if self.causal.get(layer) else 1.0
        total = sum(self.causal.values())
        return sum(self.computed.values()) / total if total else 1.0

    def summary(self) -> str:
        return f"prefill attention: density {self.density():.3f} over {self.forwards} layer forwards " \
               f"({self.fallbacks} handed to the model's own attention)"


def resolve(method: str | PrefillAttention | None, params: dict[str, Any] | None = None) -> PrefillAttention | None:
    """A prefill attention from a name (with `params`) or an instance; None for None."""
    if method is None:
        if params:
            raise ValueError(f"prefill_params {sorted(params)} given without a prefill_attention")
        return None
    if isinstance(method, str):
        method = build_prefill_attention(method, **(params or {}))
    elif not isinstance(method, PrefillAttention):
        raise ValueError(f"prefill_attention must be a registered name, an evictkit.PrefillAttention or None, "
                         f"got {type(method).__name__}")
    elif params:
        raise ValueError("prefill_params can only be given with a prefill attention name, not an instance")
    return method


class PrefillScope:
    """The context manager that serves `model`'s prefill forwards with `method`; `stats` is a `PrefillStats`.
    A dense method (`method.dense`) installs nothing: the model's own attention runs, bit for bit."""

    def __init__(self, model: nn.Module, method: PrefillAttention, *, policy: Any = None) -> None:
        if isinstance(policy, Policy) and not method.dense and capabilities(policy)["ragged_heads"]:
            raise ValueError(
                f"policy {policy.name!r} keeps different counts per KV head (tag ragged_heads), which needs the "
                f"model's own attention for its per-head masks; prefill attention {method.name!r} replaces it "
                "inside the block: use a policy with equal per-head counts, or no prefill_attention")
        self.model = model
        self.method = method
        self.modules = attention_modules(model)
        self.stats = PrefillStats()
        self._stack = ExitStack()

    def __enter__(self) -> PrefillScope:
        if self.method.dense:
            return self
        configs = {id(m.config): m.config for m in self.modules}
        with _LOCK:
            busy = [m for m in self.modules if m in _SCOPES]
            if busy:
                raise RuntimeError(f"{type(self.model).__name__} already has a prefill attention "
                                   f"({_SCOPES[busy[0]].method.name!r}): scopes cannot be nested")
            for config in configs.values():
                impl = attn_implementation(config)
                if impl not in SUPPORTED_IMPLS:
                    raise ValueError(f"prefill attention {self.method.name!r} needs the model's attn_implementation "
                                     f"to be one of {', '.join(SUPPORTED_IMPLS)}, got {impl!r}")
            for m in self.modules:
                _SCOPES[m] = self
        try:
            for config in configs.values():
                impl = cast(str, attn_implementation(config))  # one of SUPPORTED_IMPLS, checked above
                self._stack.enter_context(attention_function(config, f"evictkit_prefill_{impl}", _function(impl),
                                                             masks_like=impl))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Restore the model's attention (idempotent)."""
        self._stack.close()
        with _LOCK:
            for m in self.modules:
                if _SCOPES.get(m) is self:
                    del _SCOPES[m]


def use_prefill_attention(model: nn.Module, method: str | PrefillAttention = "dense", **params: Any) -> PrefillScope:
    """Serve `model`'s prefill forwards with `method` (a registered name with `params`, or an
    instance) while the returned context is active; no eviction. Dense installs nothing."""
    return PrefillScope(model, resolve(method, params) or build_prefill_attention("dense"))


def _plain_causal(mask: torch.Tensor | None, q: int, S: int) -> bool:
    """Whether a transformers attention mask (None, bool "attend", or additive float) is exactly
    causal with offset S - q. Every mask transformers builds is causal AND something (padding,
    window), so a row that admits all S - q + r + 1 causal slots admits exactly them."""
    if mask is None:
        return True
    if mask.shape[-2:] != (q, S):
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    expected = torch.arange(S - q + 1, S + 1, device=mask.device)
    return bool((allowed.sum(-1) == expected).all())


def _serves(module: Any, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None,
            kwargs: dict[str, Any]) -> bool:
    if query.dim() != 4 or key.dim() != 4 or query.shape[2] < 2:
        return False
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:  # the mask is not plain causal over this cache
        return False
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("dropout", 0.0):
        return False
    return _plain_causal(mask, query.shape[2], key.shape[2])


def _function(impl: str) -> Any:
    """The registered attention function for models whose own implementation is `impl`."""

    def attend(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        scope = _SCOPES.get(module)
        if scope is None or query.shape[2] < 2:
            return own_attention(module, impl)(module, query, key, value, attention_mask, *args, **kwargs)
        if not _serves(module, query, key, attention_mask, kwargs):
            scope.stats.fallbacks += 1
            return own_attention(module, impl)(module, query, key, value, attention_mask, *args, **kwargs)
        scale = kwargs.get("scaling")
        res = scope.method.attend(query, key, value,
                                  scale=float(scale) if scale is not None else query.shape[-1] ** -0.5)
        scope.stats.add(module.layer_idx, res.computed, res.causal)
        return res.out.transpose(1, 2).contiguous(), None  # [B, q, H_q, D], as transformers' functions return

    return attend


__all__ = ["SUPPORTED_IMPLS", "PrefillScope", "PrefillStats", "resolve", "use_prefill_attention"]
