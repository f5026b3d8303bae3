"""`evictkit.compress`: forward hooks that evict from a transformers cache, and remove themselves.

One hook runs after each decoder layer's attention. It reads the cache layer that attention
just updated, lets the policy observe it, and when the layer holds more than its budget (plus
`slack` while decoding) asks the policy which entries to keep and compacts K, V and every
per-token side tensor (true positions, policy state) in one call of the compaction core.
A pre-forward hook on the model refuses left-padded batches and, for hand-written decode
loops, supplies the true `position_ids` when none are passed. A pre-forward hook on each
attention module gives a compacted layer an attention mask of its own length, hiding the
per-head padding of ragged layers (evictkit.ragged).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from evictkit import ragged, rows
from evictkit.budget import check_budget, resolve_checked
from evictkit.contract import PHASES, Policy, declared
from evictkit.debug import guard_from_env
from evictkit.models import attention_modules, sliding_layers
from evictkit.positions import check_position_mode, rope_inv_freq
from evictkit.ragged_cache import SUPPORTED_IMPLS, RaggedLayer, newest_keys, use_varlen_attention
from evictkit.stats import CompressionStats, EvictEvent, LayerStats
from evictkit.step import LayerState, StepConfig, evict_step, follow_rows, needs_step, track

PHASE_CHOICES = ("prefill", "decode", "both")

# attention module -> the compress block whose hooks are on it. Weak keys: nothing is set on the
# user's model, and a model dropped inside a block is not kept alive. The lock also guards
# `Compression._owner`, the thread a block serves.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Compression] = weakref.WeakKeyDictionary()
_ACTIVE_LOCK = threading.Lock()


class Compression:
    """The context manager returned by `evictkit.compress`. `stats` holds the achieved sizes."""

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        budget: int | float,
        *,
        phase: str | None = None,
        slack: int = 0,
        prefill_chunk: int | None = None,
        ragged_layout: str = "varlen",
    ) -> None:
        if ragged_layout not in RAGGED_LAYOUTS:
            raise ValueError(f"ragged_layout={ragged_layout!r}: must be one of {', '.join(RAGGED_LAYOUTS)} (how "
                             "layers whose KV heads keep different counts are stored)")
        self.ragged_layout = ragged_layout
        self._varlen = contextlib.ExitStack()  # evictkit's attention implementation, while a layer is ragged
        self._varlen_on = False
        self._ragged_caches: list[Any] = []  # weak references to caches holding RaggedLayers
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk={prefill_chunk!r}: must be None (no chunking) or an int >= 1 "
                             "(tokens per prefill forward)")
        self.prefill_chunk = prefill_chunk
        self._chunking = False  # inside the forwards the chunker runs itself
        self._known_prompt: int | None = None  # the whole prompt's length, while the chunker runs it
        self._prompt_known = False  # whether the current sequence's schedule came from its whole prompt
        self._decoded = False  # whether the current sequence has had a one-token forward
        self._as_decode = False  # inside `as_decode()`
        self._new_pad: torch.Tensor | None = None  # [B] padding tokens among the current forward's new ones
        self._pad_before: torch.Tensor | None = None  # [B] padding of the whole prompt the chunker runs
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be an evictkit.Policy or a registered name, got {type(policy).__name__}")
        self.budget = check_budget(budget)
        if isinstance(self.budget, int):
            policy.check_budget(self.budget)
        if phase is None:
            self.phases = tuple(policy.phases)
        elif phase in PHASE_CHOICES:
            self.phases = PHASES if phase == "both" else (phase,)
        else:
            raise ValueError(
                f"phase={phase!r}: must be one of {', '.join(PHASE_CHOICES)} (or None for the policy's own)")
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(
                f"slack={slack!r}: must be an int >= 0 (extra entries allowed before a decode-time eviction)")
        self.model = model
        self.policy = policy
        self.slack = slack
        self.modules = attention_modules(model)
        self.n_layers = len(self.modules)
        self._sliding = sliding_layers(model)
        self._needs = declared(policy)  # needs(), with a legacy subclass's old declarations folded in
        mode = self._needs.positions
        check_position_mode(mode, f"policy {policy.name!r}: needs().positions")
        self._inv_freq = None  # set in "shift" mode: kept keys are re-rotated to their cache slots
        if mode == "shift":
            if self._sliding:
                raise ValueError("positions='shift' is not supported on models with sliding-window layers")
            self._inv_freq = rope_inv_freq(model)
        self._layers: dict[int, LayerState] = {}
        self._schedules: dict[int, list[int]] = {}
        self._guard = guard_from_env()  # EVICTKIT_DEBUG_READONLY=1: checksums around every policy call
        self._step = StepConfig(policy=policy, needs=self._needs, phases=self.phases, slack=slack,
                                inv_freq=self._inv_freq)
        self._handles: list[Any] = []
        self._owner: tuple[int, str] | None = None  # (ident, name) of the thread the block serves
        self._signature = inspect.signature(model.forward)
        self.stats = CompressionStats(skipped_layers=sorted(self._sliding))

    # --- context manager -------------------------------------------------------------------
    def __enter__(self) -> Compression:
        if self._handles:
            raise RuntimeError("this evictkit.compress context is already active")
        from evictkit.registry import get_registry

        self._observers = get_registry().pm.hook.evictkit_after_evict
        with _ACTIVE_LOCK:
            # two blocks' hooks on one layer would each compact the cache behind the other's back
            other = next((_ACTIVE[m] for m in self.modules if m in _ACTIVE), None)
            if other is not None:
                raise RuntimeError(other._busy(f"a second evictkit.compress block (policy {self.policy.name!r}) "
                                               "cannot start"))
            for m in self.modules:
                _ACTIVE[m] = self
            self._entered_in = threading.current_thread().name
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
            for module in self.modules:
                if module.layer_idx in self._sliding:
                    continue
                self._handles.append(module.register_forward_hook(self._after_attention, with_kwargs=True))
                self._handles.append(module.register_forward_pre_hook(self._before_attention, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._unragged()
        self._varlen.close()
        self._varlen_on = False
        with _ACTIVE_LOCK:
            for m in self.modules:
                if _ACTIVE.get(m) is self:
                    del _ACTIVE[m]
            self._owner = None

    def _unragged(self) -> None:
        """Give every cache the block made ragged its padded layout back: outside the block the
        model's own attention reads the cache again (its mask does not hide per-head padding, so
        decode inside the block, as the README says)."""
        for ref in self._ragged_caches:
            cache = ref()
            for i, layer in enumerate(getattr(cache, "layers", ())):
                if isinstance(layer, RaggedLayer):
                    keys, values, _ = layer.padded()
                    cache.layers[i] = _dense_layer(keys, values)
        self._ragged_caches.clear()

    def _store(self, cache: Any, li: int, module: Any, st: LayerState, keys: torch.Tensor,
               values: torch.Tensor) -> None:
        """Write a step's K/V back: ragged (flattened, one length per head) when the layer's heads
        differ and the varlen path serves this model, else in the padded layout."""
        layer = cache.layers[li]
        impl = getattr(module.config, "_attn_implementation", None)
        if st.pad is not None and self.ragged_layout == "varlen" and (
                impl in SUPPORTED_IMPLS or (isinstance(impl, str) and impl.startswith("evictkit_varlen_"))):
            if not self._varlen_on:  # the first ragged layer of this block
                self._varlen.enter_context(use_varlen_attention(module.config))
                self._varlen_on = True
            if not any(ref() is cache for ref in self._ragged_caches):
                self._ragged_caches.append(weakref.ref(cache))
            cache.layers[li] = RaggedLayer.from_padded(keys, values, st.pad)
        elif isinstance(layer, RaggedLayer):
            cache.layers[li] = _dense_layer(keys, values)
        else:
            layer.keys, layer.values = keys, values

    def _busy(self, what: str) -> str:
        """Why `what` is refused while this block is active on its model (nesting, threads)."""
        where = f"entered in thread {self._entered_in!r}"
        if self._owner is not None:
            where += f", running sequences in thread {self._owner[1]!r}"
        return (
            f"{what}: {type(self.model).__name__} is already under evictkit.compress with policy "
            f"{self.policy.name!r} (budget={self.budget!r}; {where}). One compress block per model at a time, "
            "used by one thread at a time: blocks cannot be nested, and other threads cannot share the model "
            "while a block is active. Leave the active `with` block first, serialize the threads (one lock "
            "around each whole `with` block), or give each thread its own copy of the model."
        )

    # --- public views for harnesses ------------------------------------------------------------
    def kept_positions(self) -> dict[int, torch.Tensor]:
        """True positions of the entries each managed layer holds now: {layer: [B, H_kv, K]}
        (-1 on the padding slots of ragged layers)."""
        return {li: st.positions for li, st in sorted(self._layers.items()) if st.positions is not None}

    def replay(self, cache: Any, inputs: dict[int, dict], padding: torch.Tensor | None = None) -> None:
        """Apply this compression's step to a cache filled by a full-attention forward run outside it.

        `inputs[layer_idx]` holds the keyword arguments that layer's attention module received
        (hidden_states, position_embeddings, position_ids, ...). One full prefill can then be
        shared by many (policy, budget) variants, each replayed on its own copy of the cache
        (evictkit.eval does this). Must run inside the `with` block.
        padding: for a left-padded batch, the padding tokens leading each row [B] (what the
        forward's attention mask held); every row is then stepped alone, as in that forward.
        """
        if not self._handles:
            raise RuntimeError("Compression.replay() must run inside its `with` block")
        if padding is not None:
            padding = torch.as_tensor(padding, dtype=torch.long).reshape(-1)
            rows = next(iter(inputs.values()))["hidden_states"].shape[0] if inputs else padding.shape[0]
            if padding.shape[0] != rows:
                raise ValueError(f"replay(padding=...): {padding.shape[0]} rows of padding for a batch of {rows}")
        # the model pre-hook sets this from the mask in a live forward; a replay has no forward
        previous, self._new_pad = self._new_pad, padding
        try:
            for module in self.modules:
                if module.layer_idx in self._sliding:
                    continue
                kwargs = dict(inputs[module.layer_idx])
                kwargs["cache"] = cache
                self._after_attention(module, (), kwargs, None)
        finally:
            self._new_pad = previous

    @contextlib.contextmanager
    def as_decode(self) -> Iterator[None]:
        """Inside, a forward that continues the sequence is a decode step whatever its length:
        the prompt's compressed context is kept and the new tokens are appended, evicted only by
        a policy's decode phase (the query-agnostic protocol: the question is not compressed with
        the context). Outside, a continuation of several tokens is a prefill chunk."""
        previous, self._as_decode = self._as_decode, True
        try:
            yield
        finally:
            self._as_decode = previous

    # --- budgets ---------------------------------------------------------------------------
    def schedule(self, prompt_length: int) -> list[int]:
        """Entries per KV head for each managed layer, for a prompt of this length."""
        if prompt_length not in self._schedules:
            base = resolve_checked(self.policy, self.budget, prompt_length)
            self._schedules[prompt_length] = [
                self.policy.layer_budget(base, m.layer_idx, self.n_layers, prompt_length) for m in self.modules
            ]
        return self._schedules[prompt_length]

    # --- hooks -----------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # The per-layer state is one sequence's: the first thread to run a forward owns the block
        # until it exits, and a forward from any other thread is refused before anything changes.
        me = threading.get_ident()
        with _ACTIVE_LOCK:
            if self._owner is None:
                self._owner = (me, threading.current_thread().name)
            owner = self._owner
        if owner[0] != me:
            raise RuntimeError(self._busy(f"a forward from thread {threading.current_thread().name!r} is refused"))
        bound = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:  # e.g. a deprecated `past_key_values`
                bound.update(bound.pop(name, None) or {})
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if tokens is None:
            return None
        q = tokens.shape[1]
        self._new_pad = _left_padding(bound.get("attention_mask"), q)
        cache = bound.get("cache", bound.get("past_key_values"))
        empty = cache is None or cache.get_seq_length() == 0
        if self.prefill_chunk is not None and q > self.prefill_chunk and not self._chunking:
            return self._run_chunks(self.prefill_chunk, args, kwargs, bound, tokens, cache, empty)
        if empty:
            self.schedule(self._known_prompt or q)  # validate the budgets before anything is computed
        rows = None if empty else next((s.rows for s in self._layers.values() if s.rows is not None), None)
        if self._new_pad is not None or rows is not None:  # a left-padded batch (evictkit.rows)
            if self._inv_freq is not None:
                raise ValueError(f"policy {self.policy.name!r} with positions='shift' does not support padded batches")
            if bound.get("position_ids") is not None or "position_ids" not in self._signature.parameters:
                return None
            if rows is None:  # each row's first real token is position 0, as generate() numbers it
                start = -(bound["attention_mask"].long() == 0).sum(-1)
            else:  # each row continues from its own true length
                start = torch.tensor([0 if r is None else r.seen for r in rows])
            positions = start.to(tokens.device)[:, None] + torch.arange(q, device=tokens.device)
            kwargs = dict(kwargs)
            kwargs["position_ids"] = positions.clamp(min=0)
            return args, kwargs
        if empty:
            return None
        seen = next((s.seen for s in self._layers.values() if s.positions is not None), None)
        if self._inv_freq is not None and seen is not None:
            # pos-shift: new tokens are numbered from the cache length, whatever the caller passed
            lengths = {s.positions.shape[-1] for s in self._layers.values() if s.positions is not None}
            if len(lengths) != 1:
                raise RuntimeError(f"positions='shift' needs equal cache lengths across layers, got {sorted(lengths)}")
            start = lengths.pop()
            call = self._signature.bind_partial(*args, **kwargs)
            call.arguments["position_ids"] = torch.arange(start, start + q, device=tokens.device).unsqueeze(0)
            return call.args, call.kwargs
        if bound.get("position_ids") is None and seen is not None and "position_ids" in self._signature.parameters:
            # The model would number new tokens from the compacted cache length; give them their true positions.
            kwargs = dict(kwargs)
            kwargs["position_ids"] = torch.arange(seen, seen + q, device=tokens.device).unsqueeze(0)
            return args, kwargs
        return None

    def _run_chunks(self, c: int, args: tuple, kwargs: dict, bound: dict, tokens: torch.Tensor, cache: Any,
                    empty: bool) -> tuple[tuple, dict]:
        """Split one long forward into `prefill_chunk`-token forwards: every chunk but the last runs
        here, each followed by the eviction step; the caller's forward then runs the last chunk.
        The caller gets the last chunk's outputs (all that generate() reads)."""
        n = tokens.shape[1]
        if bound.get("use_cache") is False:
            raise ValueError("prefill_chunk needs the KV cache: do not pass use_cache=False")
        key = "input_ids" if bound.get("input_ids") is not None else "inputs_embeds"
        cache_kw = "cache" if "cache" in self._signature.parameters else "past_key_values"
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)  # type: ignore[arg-type]  # nn.Module does not type .config
        if empty:
            self._known_prompt = n
            self._pad_before = _left_padding(bound.get("attention_mask"), n)
            self.schedule(n)  # validate the budgets before anything is computed
        seen = 0 if empty else next((s.seen for s in self._layers.values() if s.positions is not None), 0)
        given = bound.get("position_ids")
        mask = bound.get("attention_mask") if isinstance(bound.get("attention_mask"), torch.Tensor) else None
        padded = mask is not None and not bool(mask.all())
        if given is not None:
            positions = given
        elif mask is not None and padded and empty:  # a new left-padded batch: rows count from their first token
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
        else:
            positions = torch.arange(seen, seen + n, device=tokens.device).unsqueeze(0)
        extra = {"logits_to_keep": 1} if "logits_to_keep" in self._signature.parameters else {}
        # aligned to the end: the first chunk takes the remainder, so each row of a left-padded
        # batch is cut at the same distances from its end as it is alone (the batch law), and the
        # last chunk, whose queries score the final eviction, is always whole
        bounds = [0, *range(n % c or c, n + 1, c)]
        self._chunking = True
        try:
            for start, end in zip(bounds[:-2], bounds[1:-1]):
                if mask is not None and padded:  # each chunk needs the padding in its mask; all ones needs none
                    extra["attention_mask"] = mask[:, : seen + end]
                self.model(**{key: tokens[:, start:end], cache_kw: cache, "use_cache": True,
                              "position_ids": positions[..., start:end]}, **extra)
        finally:
            self._chunking = False
            self._known_prompt = self._pad_before = None
        last = bounds[-2]
        call = self._signature.bind_partial(*args, **kwargs)
        call.arguments.pop("past_key_values" if cache_kw == "cache" else "cache", None)
        call.arguments[key] = tokens[:, last:]
        call.arguments[cache_kw] = cache
        call.arguments["position_ids"] = positions[..., last:]
        if isinstance(mask, torch.Tensor):
            call.arguments["attention_mask"] = mask[:, : seen + n]
        self._new_pad = _left_padding(call.arguments.get("attention_mask"), n - last)  # the last chunk's
        return call.args, call.kwargs

    # module: Any, a transformers attention module: layer_idx, head_dim, o_proj are attributes nn.Module does not type
    def _after_attention(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None:
            return
        li = module.layer_idx
        layer = cache.layers[li]
        if getattr(layer, "is_sliding", False):
            if li not in self.stats.skipped_layers:
                self.stats.skipped_layers.append(li)
            return
        hidden = cast(torch.Tensor, kwargs.get("hidden_states", args[0] if args else None))
        is_ragged = isinstance(layer, RaggedLayer)
        T, q = (layer.get_seq_length() if is_ragged else layer.keys.shape[2]), hidden.shape[1]
        st = self._layers.get(li)
        if st is not None and T > q:  # beam search may have reordered the rows since the last step
            follow_rows(st, newest_keys(layer, q) if is_ragged else layer.keys[:, :, T - q - 1])
        if (T == q and self._new_pad is not None) or (st is not None and st.rows is not None and T != q):
            self._after_attention_rows(module, layer, st, hidden, kwargs)
            return
        if T == q or st is None:  # a new sequence
            if T != q:
                raise RuntimeError(
                    f"layer {li}: the cache already held {T - q} entries when evictkit.compress first saw it; "
                    "start the sequence (prefill) inside the `with` block"
                )
            st = self._layers[li] = LayerState(
                budget=self.schedule(self._known_prompt or T)[self.modules.index(module)])
            self._prompt_known = self._known_prompt is not None
            self._decoded = False
            stats = self._layer_stats(li)
            stats.prompt_length, stats.budget, stats.evictions, stats.peak = T, st.budget, 0, 0
        elif st.positions is None or st.positions.shape[-1] != T - q:
            raise RuntimeError(
                f"layer {li}: the cache holds {T - q} earlier entries but evictkit tracked "
                f"{0 if st.positions is None else st.positions.shape[-1]}; it was changed outside evictkit"
            )
        elif q > 1 and isinstance(self.budget, float) and not (self._prompt_known or self._decoded or self._as_decode):
            raise ValueError(
                f"budget={self.budget} is a fraction of the prompt, but this prompt arrives in chunks whose total "
                "evictkit cannot know (transformers' prefill_chunk_size, or a loop of forwards): give an int budget, "
                "or let evictkit chunk the prompt with evictkit.compress(..., prefill_chunk=N)"
            )
        stats = self._layer_stats(li)
        # in "shift" mode position_ids are cache slots; the step counts the true positions itself
        position_ids = None if self._inv_freq is not None else kwargs.get("position_ids")
        if is_ragged and not needs_step(self._step, st, q, as_decode=self._as_decode):
            # nothing reads the entries: keep the ragged layer as update() left it
            track(self._step, st, module=module, hidden_states=hidden,
                  position_embeddings=kwargs["position_embeddings"], position_ids=position_ids,
                  n_kv_heads=layer.shape[1], device=layer.keys.device)
            phase, evicted = ("prefill" if q > 1 and not self._as_decode else "decode"), False
        else:
            keys, values = (layer.padded()[:2]) if is_ragged else (layer.keys, layer.values)
            result = evict_step(
                self._step, st, module=module, layer_idx=li, n_layers=self.n_layers, keys=keys, values=values,
                hidden_states=hidden, position_embeddings=kwargs["position_embeddings"], position_ids=position_ids,
                as_decode=self._as_decode, guard=self._guard,
            )
            phase, evicted = result.phase, result.selection is not None
            if evicted or not is_ragged:
                self._store(cache, li, module, st, result.keys, result.values)
        layer = cache.layers[li]
        if isinstance(layer, RaggedLayer):
            size, entries = layer.get_seq_length(), layer.real_entries()
            st.last_keys = newest_keys(layer)
        else:
            size = layer.keys.shape[2]
            entries = ragged.real_entries(st.pad, layer.keys.shape[1], size)
            st.last_keys = layer.keys[:, :, -1].clone()
        if evicted:
            stats.evictions += 1
            if self._observers.get_hookimpls():
                self._observers(event=EvictEvent(policy=self.policy.name, layer=li, phase=phase, before=T, after=size,
                                                 budget=st.budget))
        stats.size, stats.entries = size, entries
        stats.peak = max(stats.peak, stats.size)
        if phase == "prefill" and not self._decoded:  # the prompt, in one forward or in chunks
            stats.prompt_length = max(stats.prompt_length, st.seen)
            stats.after_prefill = stats.size
        else:
            self._decoded = True

    # module: Any, as in _after_attention
    def _after_attention_rows(self, module: Any, layer: Any, st: LayerState | None, hidden: torch.Tensor,
                              kwargs: dict) -> None:
        """A left-padded batch: each row stepped alone on its view of the layer (evictkit.rows)."""
        li = module.layer_idx
        T, q = layer.keys.shape[2], hidden.shape[1]
        new_pad = self._new_pad.tolist() if self._new_pad is not None else [0] * layer.keys.shape[0]
        stats = self._layer_stats(li)
        index = self.modules.index(module)
        if self._inv_freq is not None:
            raise ValueError(f"policy {self.policy.name!r} with positions='shift' does not support padded batches")
        if st is None or T == q:  # a new sequence
            st = self._layers[li] = LayerState(budget=0)
            st.rows, st.offsets = rows.start_rows(layer.keys.shape[0])
            self._prompt_known, self._decoded = self._known_prompt is not None, False
            stats.prompt_length, stats.budget, stats.evictions, stats.peak = 0, 0, 0, 0
        known, pad_before = self._known_prompt, self._pad_before

        def row_budget(b: int, length: int) -> int:
            if known is not None and pad_before is not None:  # the chunker saw the row's whole prompt
                length = known - int(pad_before[b])
            return self.schedule(length)[index]

        keys, values, evicted = rows.rows_step(
            self._step, st, module=module, layer_idx=li, n_layers=self.n_layers, keys=layer.keys,
            values=layer.values, hidden_states=hidden, position_embeddings=kwargs["position_embeddings"],
            position_ids=kwargs.get("position_ids"), new_pad=new_pad, row_budget=row_budget,
            as_decode=self._as_decode, guard=self._guard,
        )
        layer.keys, layer.values = keys, values
        st.last_keys = keys[:, :, -1].clone()
        started = [r for r in st.rows or () if r is not None]
        st.budget = max((r.budget for r in started), default=0)
        phase = "decode" if q == 1 and T != q else "prefill"
        if evicted:
            stats.evictions += 1
            if self._observers.get_hookimpls():
                self._observers(event=EvictEvent(policy=self.policy.name, layer=li, phase=phase, before=T,
                                                 after=keys.shape[2], budget=st.budget))
        stats.budget = st.budget
        stats.size = keys.shape[2]
        stats.entries = rows.real_entries(st)
        stats.peak = max(stats.peak, stats.size)
        if phase == "prefill" and not self._decoded:
            stats.prompt_length = max((r.seen for r in started), default=0)
            stats.after_prefill = stats.size
        else:
            self._decoded = True

    def _before_attention(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Give a compacted layer a mask of its own size: per-head padding hidden on ragged layers,
        and the right length where layers differ in length (the model sizes one mask for all)."""
        st = self._layers.get(module.layer_idx)
        if st is None or st.positions is None:
            return None
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or hidden is None or module.layer_idx >= len(cache.layers):
            return None
        if isinstance(cache.layers[module.layer_idx], RaggedLayer):
            return None  # evictkit's varlen attention reads each head's own entries: no mask
        past = cache.layers[module.layer_idx].get_seq_length()
        if past != st.positions.shape[-1]:  # a new sequence starts: nothing of ours applies
            return None
        mask, q = kwargs.get("attention_mask"), hidden.shape[1]
        # a padded batch's own mask hides the slots where its padding was, wherever entries are now
        if st.pad is None and st.rows is None and not (
                isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] != past + q):
            return None
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = ragged.attention_mask(
            st.pad, past, q, batch=hidden.shape[0], n_heads=module.o_proj.weight.shape[1] // module.head_dim,
            like=mask, attn_impl=getattr(module.config, "_attn_implementation", None), dtype=hidden.dtype,
            device=hidden.device, new_pad=self._new_pad if st.rows is not None else None,
        )
        return args, kwargs

    def _layer_stats(self, li: int) -> LayerStats:
        for s in self.stats.layers:
            if s.layer == li:
                return s
        s = LayerStats(layer=li)
        self.stats.layers.append(s)
        self.stats.layers.sort(key=lambda x: x.layer)
        return s


#: how layers whose KV heads keep different counts are stored: "varlen" (evictkit.ragged_cache:
#: each head its own length, varlen attention; sdpa and eager models) or "padded" (left-padded to
#: the longest head, per-head masks: evictkit.ragged)
RAGGED_LAYOUTS = ("varlen", "padded")


def _dense_layer(keys: torch.Tensor, values: torch.Tensor) -> Any:
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


def _left_padding(mask: object, q: int) -> torch.Tensor | None:
    """Padding tokens among a forward's q new tokens, per row [B] (None: no padding), from a
    2-D attention mask; refuses anything but left padding."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or bool(mask.all()):
        return None
    m = mask.long()
    if bool((m.cummax(dim=1).values != m).any()):
        raise ValueError(
            "evictkit.compress supports left-padded batches only (the attention_mask has a 0 after a 1): "
            "set tokenizer.padding_side = 'left' before tokenizing the batch"
        )
    return (m[:, -q:] == 0).sum(dim=1) if m.shape[1] >= q else (m == 0).sum(dim=1)


def compress(model: nn.Module, policy: Policy | str, budget: int | float, *, phase: str | None = None,
             slack: int = 0, prefill_chunk: int | None = None, ragged_layout: str = "varlen",
             **params: Any) -> Compression:
    """Evict from `model`'s KV cache under `policy` while the returned context is active.

    policy: a policy instance, or a registered name with its parameters as keyword arguments
    budget: int >= 1 entries per layer per KV head (window and sinks included), or a float
        in (0, 1]: that fraction of the prompt
    phase: "prefill", "decode" or "both"; None = the policy's own phases
    slack: while decoding, evict only when a layer exceeds budget + slack (0 = every step)
    prefill_chunk: split any forward of more than this many tokens into chunks of it, evicting
        after each, so the cache holds at most budget + prefill_chunk entries per layer per KV head;
        the chunks are aligned to the prompt's end (the first takes the remainder), and the forward
        returns the last chunk's outputs only (None: no chunking). transformers'
        own `generate(..., prefill_chunk_size=N)` and hand-written loops of forwards are chunked
        prefill too, without this option.
    ragged_layout: where a policy keeps different counts per KV head (AdaKV): "varlen" stores
        each head with exactly its own entries and attends with evictkit's varlen attention (sdpa
        and eager models; left-padded batches and positions='shift' keep the padded layout);
        "padded" left-pads every head to the longest one and hides the padding with masks.
    """
    if isinstance(policy, str):
        from evictkit.registry import build_policy

        policy = cast(Policy, build_policy(policy, **params))
    elif params:
        raise ValueError(f"parameters {sorted(params)} can only be given with a policy name, not an instance")
    return Compression(model, policy, budget, phase=phase, slack=slack, prefill_chunk=prefill_chunk,
                       ragged_layout=ragged_layout)
