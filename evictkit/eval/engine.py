"""One sample under many (policy, budget) variants, with the prompt's prefill computed once.

Why sharing is exact: `evictkit.compress` evicts from layer l's cache right after layer l's
attention, and the rest of that forward never reads layer l's cache again. The prefill's hidden
states are therefore those of a full-attention forward whatever the policy, and only the kept
cache differs. So the prompt is prefilled once without eviction, each attention module's
inputs (hidden_states, position_embeddings, position_ids) are kept, and for each variant a
fresh `Compression` replays its own after-attention step on a copy of the full cache, layer
by layer, exactly as if the prefill had run under it. The question and the answer then run
under that same context with true positions. `tests/test_eval_engine.py` checks, for every
registered policy, that this equals a direct run under `evictkit.compress`.

A policy can opt out with a class attribute `shared_prefill = False` (for a policy that
changes the forward itself during prefill); it then gets its own prefill.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
import torch
from torch import nn

from evictkit.attention import attention_weights, project_queries
from evictkit.compress import Compression
from evictkit.contract import Policy
from evictkit.models import attention_modules
from evictkit.ragged_cache import dense_kv


def cache_kwarg(model: nn.Module) -> str:
    """The model's name for the cache argument (`cache` in transformers >= 5.24)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def new_cache(model: nn.Module):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)  # type: ignore[arg-type]  # nn.Module does not type .config


def copy_cache(cache):
    """A cache that shares the K/V tensors but not the layer objects: cache updates and the
    compaction core replace tensors instead of writing into them, so the source stays intact."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


def cache_bytes(cache) -> int:
    """Bytes held by the K and V tensors of every layer of a transformers Cache."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@attrs.define
class Prefill:
    """The shared full-attention prefill of one prompt."""

    cache: Any
    inputs: dict[int, dict]  # layer -> the attention module's hidden_states, position_embeddings, position_ids
    logits: torch.Tensor  # [B, V] at the last prompt position
    length: int
    seconds: float


def _forward(model: nn.Module, ids: torch.Tensor, cache, start: int, keep_logits: int = 1):
    positions = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
    kwargs = {cache_kwarg(model): cache, "use_cache": True, "position_ids": positions}
    if keep_logits:
        kwargs["logits_to_keep"] = keep_logits
    return model(input_ids=ids, **kwargs)


def _capture(model: nn.Module, store: dict[int, dict]) -> list:
    def grab(module, args, kwargs):
        store[module.layer_idx] = {
            "hidden_states": kwargs.get("hidden_states", args[0] if args else None),
            "position_embeddings": kwargs.get("position_embeddings"),
            "position_ids": kwargs.get("position_ids"),
        }

    return [m.register_forward_pre_hook(grab, with_kwargs=True) for m in attention_modules(model)]


@torch.no_grad()
def shared_prefill(model: nn.Module, ids: Sequence[int], device: torch.device | str = "cpu") -> Prefill:
    """Prefill `ids` at full attention, keeping each attention module's inputs for replay."""
    x = torch.tensor([list(ids)], device=device)
    inputs: dict[int, dict] = {}
    handles = _capture(model, inputs)
    t0 = time.perf_counter()
    try:
        cache = new_cache(model)
        out = _forward(model, x, cache, 0)
    finally:
        for h in handles:
            h.remove()
    return Prefill(cache=cache, inputs=inputs, logits=out.logits[:, -1].float(), length=x.shape[1],
                   seconds=time.perf_counter() - t0)


def replay(comp: Compression, cache, inputs: dict[int, dict]) -> None:
    """Apply `comp`'s prefill step to a cache filled by a full-attention prefill (see Compression.replay)."""
    comp.replay(cache, inputs)


def kept_positions(comp: Compression) -> dict[int, torch.Tensor]:
    """True positions held by each managed layer now: {layer: [B, H_kv, K]}."""
    return comp.kept_positions()


def can_share(policy: Policy) -> bool:
    return type(policy).shared_prefill


@attrs.define
class Outcome:
    """What one variant produced (before scoring)."""

    tokens: list[int] = attrs.field(factory=list)
    kept: dict[int, torch.Tensor] = attrs.field(factory=dict)  # positions once the prompt is compressed
    cache_bytes: int = 0  # K/V bytes right after the context was compressed
    evict_s: float = 0.0
    decode_s: float = 0.0
    nll: float | None = None
    recon: list[float] | None = None
    stats: Any = None  # the Compression's CompressionStats


def _uniform(cache) -> bool:
    lengths = {layer.get_seq_length() for layer in cache.layers if not getattr(layer, "is_sliding", False)}
    return len(lengths) <= 1


@torch.no_grad()
def greedy(model: nn.Module, cache, seen: int, question: Sequence[int], logits: torch.Tensor, max_new: int,
           eos: frozenset[int], device, on_ready: Callable[[], None] | None = None) -> list[int]:
    """Process `question` against the cache, then decode greedily with true positions."""
    if question:
        # transformers sizes one causal mask for all layers from the first layer's length, so a
        # multi-token forward breaks when the layers hold different numbers of entries
        # (PyramidKV, LaCache); one token at a time needs no mask.
        step = len(question) if _uniform(cache) else 1
        for i in range(0, len(question), step):
            chunk = list(question[i : i + step])
            out = _forward(model, torch.tensor([chunk], device=device), cache, seen)
            logits, seen = out.logits[:, -1], seen + len(chunk)
    if on_ready is not None:
        on_ready()
    tokens: list[int] = []
    for step in range(max_new):
        nxt = int(logits[0].argmax())
        if nxt in eos:
            break
        tokens.append(nxt)
        if step == max_new - 1:
            break
        out = _forward(model, torch.tensor([[nxt]], device=device), cache, seen)
        logits, seen = out.logits[:, -1], seen + 1
    return tokens


@torch.no_grad()
def teacher_forced_nll(model: nn.Module, cache, seen: int, first_logits: torch.Tensor, targets: Sequence[int],
                       device) -> float:
    """Mean negative log-likelihood of `targets` continuing the (compressed) prompt."""
    tgt = torch.tensor([list(targets)], device=device)
    logits = first_logits[:, None, :].float()
    if len(targets) > 1:
        out = _forward(model, tgt[:, :-1], cache, seen, keep_logits=0)
        logits = torch.cat([logits, out.logits.float()], dim=1)
    nll = torch.nn.functional.cross_entropy(logits[0], tgt[0], reduction="mean")
    return float(nll)


@attrs.define
class ReconReference:
    """Full-cache attention outputs of the continuation's queries, per managed layer."""

    queries: dict[int, torch.Tensor]  # [B, H_q, N, D]
    cont_kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # the continuation's own K/V [B, H_kv, N, D]
    outputs: dict[int, torch.Tensor]  # o_proj(attention) [B, N, C]
    query_positions: torch.Tensor  # [B, N]


def _attend(module: Any, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, qpos: torch.Tensor,
            kpos: torch.Tensor) -> torch.Tensor:
    B, Hq, N, D = q.shape
    Hkv = keys.shape[1]
    scaling = float(getattr(module, "scaling", D**-0.5))
    softcap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    w = attention_weights(q, keys, qpos, kpos, scaling, softcap)  # [B, Hq, N, T] fp32
    w = w.view(B, Hkv, Hq // Hkv, N, -1)
    out = torch.matmul(w, values.float()[:, :, None])  # [B, Hkv, g, N, D]
    out = out.reshape(B, Hq, N, D).transpose(1, 2).reshape(B, N, Hq * D)
    return module.o_proj(out.to(module.o_proj.weight.dtype)).float()


@torch.no_grad()
def recon_reference(model: nn.Module, pre: Prefill, targets: Sequence[int], device) -> ReconReference:
    cache = copy_cache(pre.cache)
    inputs: dict[int, dict] = {}
    handles = _capture(model, inputs)
    try:
        _forward(model, torch.tensor([list(targets)], device=device), cache, pre.length)
    finally:
        for h in handles:
            h.remove()
    T, N = pre.length, len(targets)
    qpos = torch.arange(T, T + N, device=device).unsqueeze(0)
    ref = ReconReference({}, {}, {}, qpos)
    for module in attention_modules(model):
        li = module.layer_idx
        layer = cache.layers[li]
        if getattr(layer, "is_sliding", False):
            continue
        cos, sin = inputs[li]["position_embeddings"]
        q = project_queries(module, inputs[li]["hidden_states"], cos, sin)
        keys, values = layer.keys, layer.values
        kpos = torch.arange(T + N, device=device).expand(keys.shape[0], keys.shape[1], T + N)
        ref.queries[li] = q
        ref.cont_kv[li] = (keys[:, :, T:], values[:, :, T:])
        ref.outputs[li] = _attend(module, q, keys, values, qpos, kpos)
    return ref


@torch.no_grad()
def recon_errors(model: nn.Module, cache, kept: dict[int, torch.Tensor], ref: ReconReference) -> list[float]:
    """Per managed layer: ||o - o_full|| / ||o_full|| of the continuation's attention output when
    the context part of the cache is the compressed one (the continuation's own K/V, queries and
    inputs are the full-cache ones, so each layer's error is its own, not propagated)."""
    errors = []
    modules = {m.layer_idx: m for m in attention_modules(model)}
    for li, q in ref.queries.items():
        ctx_keys, ctx_values = dense_kv(cache.layers[li])
        ck, cv = ref.cont_kv[li]
        keys = torch.cat([ctx_keys, ck], dim=2)
        values = torch.cat([ctx_values, cv], dim=2)
        ctx_pos = kept[li]
        # padding slots of ragged layers (per-head budgets) carry position -1: hide them from every query
        ctx_pos = torch.where(ctx_pos < 0, torch.full_like(ctx_pos, torch.iinfo(ctx_pos.dtype).max), ctx_pos)
        kpos = torch.cat([ctx_pos, ref.query_positions[:, None, :].expand(ck.shape[0], ck.shape[1], -1)], dim=-1)
        out = _attend(modules[li], q, keys, values, ref.query_positions, kpos)
        full = ref.outputs[li]
        errors.append(float((out - full).norm() / full.norm().clamp_min(1e-12)))
    return errors


def run_variant(model: nn.Module, policy: Policy, budget: int | float, sample, pre: Prefill | None, *, device,
                eos: frozenset[int], query_aware: bool, recon_ref: ReconReference | None = None) -> Outcome:
    """Run one (policy, budget) on one sample; `pre` is the shared prefill (None: its own)."""
    prompt = list(sample.context_ids) + (list(sample.question_ids) if query_aware else [])
    question = [] if query_aware else list(sample.question_ids)
    res = Outcome()
    comp = Compression(model, policy, budget)
    with comp:
        t0 = time.perf_counter()
        if pre is not None and can_share(policy):
            cache = copy_cache(pre.cache)
            replay(comp, cache, pre.inputs)
            logits = pre.logits
        else:
            cache = new_cache(model)
            with torch.no_grad():
                logits = _forward(model, torch.tensor([prompt], device=device), cache, 0).logits[:, -1].float()
        res.evict_s = time.perf_counter() - t0
        res.cache_bytes = cache_bytes(cache)
        t0 = time.perf_counter()
        # the question and the answer continue the compressed context: decode steps, not chunks
        with comp.as_decode():
            _finish(model, comp, cache, sample, prompt, question, logits, res, device, eos, recon_ref)
        res.decode_s = time.perf_counter() - t0
    res.stats = comp.stats
    return res


def _finish(model: nn.Module, comp: Compression, cache, sample, prompt: list[int], question: list[int],
            logits: torch.Tensor, res: Outcome, device, eos: frozenset[int],
            recon_ref: ReconReference | None) -> None:
    """What follows the prompt: the question, then greedy decoding, teacher forcing or recon."""
    if sample.metric == "ppl":
        res.kept = kept_positions(comp)
        res.nll = teacher_forced_nll(model, cache, len(prompt), logits, sample.continuation_ids, device)
    elif sample.metric == "recon":
        res.kept = kept_positions(comp)
        res.recon = recon_errors(model, cache, res.kept, cast(ReconReference, recon_ref))  # set for "recon" samples
    else:
        def snapshot() -> None:
            res.kept = kept_positions(comp)

        res.tokens = greedy(model, cache, len(prompt), question, logits, sample.max_new_tokens, eos, device,
                            on_ready=snapshot)


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 50.0))
