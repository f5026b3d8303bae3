"""The seam to transformers: the names evictkit reads from it, in one place.

transformers renames what evictkit touches from release to release (the forward's cache argument
became `cache` in 5.24; `past_key_values` is deprecated there and due to go in 5.40). Code that
needs such a name asks this module, so a new transformers release is answered here: the cache
argument, making a cache and a cache layer, the attention modules, the attention implementation
(reading it, and pointing a config at a function of evictkit's own), and binding a forward's
arguments. The tested range is pyproject.toml's (README, "Supported versions"; `make test-oldest`
runs the oldest).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

#: the cache argument's names, newest first
CACHE_KWARGS = ("cache", "past_key_values")

_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


# --- the cache ---------------------------------------------------------------------------------
def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model.forward` takes the cache: `cache` (transformers >= 5.24) or
    `past_key_values` (earlier 5.x). A name that is absent from the signature would be swallowed
    by `**kwargs` without error, so this reads the signature rather than the version."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(model: nn.Module, cache: Any) -> dict[str, Any]:
    """`{name: cache}` to pass to `model(...)` on any supported transformers: `model(ids, **cache_arg(model, c))`."""
    return {cache_kwarg(model): cache}


def cache_of(output: Any) -> Any:
    """A model output's cache, under whichever name this transformers gives it (`cache` from 5.24;
    reading `past_key_values` there logs a deprecation warning)."""
    for name in CACHE_KWARGS:
        if name in output:
            return output[name]
    return None


def cache_in(kwargs: dict[str, Any]) -> Any:
    """The cache among a forward's (or an attention module's) keyword arguments, or None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def mask_query_length(arg: Any) -> int:
    """The query length a cache layer's `get_mask_sizes` is asked about: transformers >= 5.24
    passes it as an int, earlier 5.x passes the forward's `cache_position` tensor."""
    return int(arg.shape[0]) if isinstance(arg, torch.Tensor) else int(arg)


def new_cache(model: nn.Module) -> DynamicCache:
    """An empty cache of the kind `generate()` makes for `model`."""
    return DynamicCache(config=model.config)  # type: ignore[arg-type]  # nn.Module does not type .config


def dense_layer(keys: Any, values: Any) -> DynamicLayer:
    """A plain cache layer holding `keys`/`values` [B, H_kv, T, D]."""
    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


# --- the model's attention modules -------------------------------------------------------------
# list[Any]: their layer_idx, head_dim, config and projections are attributes nn.Module's typing does not know
def attention_modules(model: nn.Module) -> list[Any]:
    """The decoder attention modules evictkit can hook, ordered by layer index.

    A module qualifies when it has `layer_idx`, `head_dim` and q/k/v/o projections (the
    transformers layout of Llama, Mistral, Qwen2/3, Gemma 1-3 and most decoder-only models).
    """
    check_model(model)
    found: list[Any] = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and isinstance(getattr(m, "head_dim", None), int)
        and all(isinstance(getattr(m, p, None), nn.Module) for p in _ATTN_PARTS)
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module evictkit understands: it needs modules with "
            "layer_idx, head_dim and q_proj/k_proj/v_proj/o_proj (Llama, Mistral, Qwen2/3, Gemma layouts)"
        )
    found.sort(key=lambda m: m.layer_idx)
    if len({m.layer_idx for m in found}) != len(found):
        raise ValueError(f"{type(model).__name__}: several attention modules share a layer_idx")
    return found


def check_model(model: object) -> None:
    """Raise ValueError unless `model` is a torch module (a transformers model), saying what was given."""
    if isinstance(model, nn.Module):
        return
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    looks_like = ""
    if isinstance(model, str):
        looks_like = f" (a name: load the model first, `model, tok = evictkit.load_model({model!r})`)"
    elif hasattr(model, "encode") and hasattr(model, "decode"):
        looks_like = " (that looks like a tokenizer: pass the model, e.g. `model, tok = evictkit.load_model(...)`)"
    raise ValueError(
        f"evictkit.compress needs a transformers model (a torch.nn.Module such as AutoModelForCausalLM's), "
        f"got {kind}{looks_like}"
    )


def sliding_layers(model: nn.Module) -> set[int]:
    """Layer indices that use sliding-window attention (left alone by evictkit)."""
    config = getattr(model, "config", None)
    config = getattr(config, "get_text_config", lambda: config)() if config is not None else None
    types = getattr(config, "layer_types", None) or []
    return {i for i, t in enumerate(types) if "sliding" in str(t)}


def is_sliding(layer: Any) -> bool:
    """Whether a cache layer is a sliding-window one."""
    return bool(getattr(layer, "is_sliding", False))


# --- the attention implementation --------------------------------------------------------------
def attn_implementation(obj: Any) -> str | None:
    """The attention implementation a config (or a module's config) names: "sdpa", "eager", ..."""
    config = getattr(obj, "config", obj)
    impl = getattr(config, "_attn_implementation", None)
    return impl if isinstance(impl, str) else None


def own_attention(module: Any, impl: str) -> Callable[..., Any]:
    """The attention function `module` runs under `impl` (eager is each modeling file's own)."""
    # transformers.modeling_utils costs seconds to import: only a block that goes ragged needs it
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if impl == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


_LOCK = threading.Lock()
_USERS: dict[str, int] = {}  # registered name -> active blocks using it


@contextlib.contextmanager
def attention_function(config: Any, name: str, fn: Callable[..., Any], masks_like: str) -> Iterator[None]:
    """Register `fn` as attention implementation `name`, its masks built as `masks_like`'s, and
    point `config` at it for the duration; on exit (exceptions included) restore the config and
    unregister.

    Public API only. The function goes in the shared `ALL_ATTENTION_FUNCTIONS` through its
    mapping interface (set, then deleted when the last block using it exits); models read that
    instance. The mask function is registered with `AttentionMaskInterface.register`: transformers
    builds masks only for names in its class-wide mapping, which has no public removal, so it
    stays registered, naming transformers' own mask function of `masks_like`, and nothing points
    at it once the config is restored.
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    previous = config._attn_implementation
    with _LOCK:
        if _USERS.get(name, 0) == 0:
            ALL_ATTENTION_FUNCTIONS[name] = fn
            if name not in ALL_MASK_ATTENTION_FUNCTIONS:
                AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[masks_like])
        _USERS[name] = _USERS.get(name, 0) + 1
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous
        with _LOCK:
            _USERS[name] -= 1
            if _USERS[name] == 0:
                del ALL_ATTENTION_FUNCTIONS[name]
                del _USERS[name]


# --- binding a forward's arguments -------------------------------------------------------------
class Forward:
    """A model's forward signature: read the arguments a forward got, and call it with changes."""

    def __init__(self, model: nn.Module) -> None:
        self.signature = inspect.signature(model.forward)
        self.cache_kwarg = "cache" if "cache" in self.signature.parameters else "past_key_values"
        self._var = next((n for n, p in self.signature.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD),
                         None)  # the `**kwargs` parameter's name

    def takes(self, name: str) -> bool:
        return name in self.signature.parameters

    def arguments(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Every argument by name, those caught by `**kwargs` (e.g. a deprecated `past_key_values`) included."""
        bound = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        if self._var is not None:
            bound.update(bound.pop(self._var, None) or {})
        return bound

    def call(self, args: tuple, kwargs: dict, **changes: Any) -> tuple[tuple, dict]:
        """(args, kwargs) for the forward with `changes` applied; `cache=` goes under this
        transformers' name, and the other name is dropped."""
        call = self.signature.bind_partial(*args, **kwargs)
        if "cache" in changes:
            cache = changes.pop("cache")
            extra = call.arguments.get(self._var) if self._var else None
            for name in CACHE_KWARGS:
                call.arguments.pop(name, None)
                if isinstance(extra, dict):
                    extra.pop(name, None)
            changes[self.cache_kwarg] = cache
        call.arguments.update(changes)
        return call.args, call.kwargs


__all__ = ["CACHE_KWARGS", "DynamicCache", "DynamicLayer", "Forward", "attention_function", "attention_modules",
           "attn_implementation", "cache_arg", "cache_in", "cache_kwarg", "cache_of", "check_model", "dense_layer",
           "is_sliding", "mask_query_length", "new_cache", "own_attention", "sliding_layers"]


def rotary_class(module: nn.Module, who: str) -> type:
    """The rotary embedding class an attention module's modeling file defines (`LlamaAttention` ->
    `LlamaRotaryEmbedding`, or the file's only one); ValueError naming `who` when there is none."""
    space = sys.modules[type(module).__module__]
    cls = getattr(space, type(module).__name__.replace("Attention", "RotaryEmbedding"), None)
    if cls is None:
        found = [v for k, v in vars(space).items() if k.endswith("RotaryEmbedding") and isinstance(v, type)]
        cls = found[0] if len(found) == 1 else None
    if cls is None:
        raise ValueError(f"{who}: no rotary embedding class beside {type(module).__name__} in {space.__name__}; "
                         "it needs RoPE attention in the transformers style")
    return cls
