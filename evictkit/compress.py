"""`evictkit.compress`: forward hooks that evict from a transformers cache, and remove themselves.

This module is the wiring: hooks go on and come off here. What happens inside lives elsewhere:
options are checked in evictkit.options, the one-block-one-thread rule is evictkit.claims,
transformers' names are in evictkit.hf, a prompt's life (positions, chunks, the per-layer step,
stats) is evictkit.sequence, the step itself evictkit.step, and each storage layout a view of
evictkit.layout.

Hooks: a pre-forward hook on the model starts a new `Sequence` when a prompt starts, notes a
batch's padding (left padding within each forward's new tokens; right padding is refused), splits long forwards with
`prefill_chunk`, and supplies true `position_ids`; a forward hook after each managed attention
module runs the sequence's step; a pre-forward hook on each attention module gives a compacted
layer a mask of its own size (per-head and per-row padding hidden, evictkit.ragged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn

from evictkit.claims import Claim
from evictkit.contract import Policy
from evictkit.debug import guard_from_env
from evictkit.hf import Forward, attention_modules, cache_in, sliding_layers
from evictkit.memory import release_freed_memory
from evictkit.options import PHASE_CHOICES, Options
from evictkit.prefill_attention import PrefillAttention, PrefillScope, resolve
from evictkit.ragged_cache import RAGGED_LAYOUTS, RaggedStore
from evictkit.sequence import Sequence, Settings, left_padding, schedule
from evictkit.stats import CompressionStats
from evictkit.step import LayerState


class Compression:
    """The context manager returned by `evictkit.compress`. `stats` holds the achieved sizes."""

    def __init__(self, model: nn.Module, policy: Policy, budget: int | float, *, phase: str | None = None,
                 slack: int = 0, prefill_chunk: int | None = None, ragged_layout: str = "varlen",
                 prefill_attention: str | PrefillAttention | None = None,
                 prefill_params: dict[str, Any] | None = None, release_memory: bool = True) -> None:
        opts = Options.check(model, policy, budget, phase=phase, slack=slack, prefill_chunk=prefill_chunk,
                             ragged_layout=ragged_layout, release_memory=release_memory)
        self.release_memory, self._last_q = release_memory, 0
        self._trim_layers = False  # this forward is a prefill chunk that continues a sequence
        method = resolve(prefill_attention, prefill_params)  # checks the name and parameters
        #: the prefill attention's scope (its `stats`: densities per layer), None for the model's own
        self.prefill = PrefillScope(model, method, policy=policy) if method is not None else None
        self.model, self.policy, self.budget, self.phases = model, policy, opts.budget, opts.phases
        self.slack, self.prefill_chunk, self.ragged_layout = slack, prefill_chunk, ragged_layout
        self._store = RaggedStore(ragged_layout)
        self.modules = attention_modules(model)
        self.n_layers = len(self.modules)
        self._sliding = sliding_layers(model)
        self._schedules: dict[int, list[int]] = {}
        self._step = opts.step_config()
        self._handles: list[Any] = []
        self._claim = Claim(self.modules, lambda: (
            f"{type(model).__name__} is already under evictkit.compress with policy {policy.name!r} "
            f"(budget={self.budget!r})"))
        self._forward = Forward(model)
        self.stats = CompressionStats(skipped_layers=sorted(self._sliding))
        self._settings = Settings(
            step=self._step, budget=self.budget, layers=tuple(m.layer_idx for m in self.modules),
            schedule=self.schedule, guard=guard_from_env(),  # EVICTKIT_DEBUG_READONLY=1: checksums around calls
            store=self._store, stats=self.stats, observers=None,
            last_layer=max((m.layer_idx for m in self.modules if m.layer_idx not in self._sliding), default=None))
        self._seq: Sequence | None = None  # the sequence running now

    # --- context manager -------------------------------------------------------------------
    def __enter__(self) -> Compression:
        if self._handles:
            raise RuntimeError("this evictkit.compress context is already active")
        from evictkit.registry import get_registry

        self._settings.observers = get_registry().pm.hook.evictkit_after_evict
        self._claim.take(f"policy {self.policy.name!r}")
        try:
            if self.prefill is not None:
                self.prefill.__enter__()
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
        self._store.close()
        if self.prefill is not None:
            self.prefill.close()
        self._claim.release()

    # --- sequences -------------------------------------------------------------------------
    def _start(self, **kwargs: Any) -> Sequence:
        """A new prompt: a new Sequence (continuations stay decode steps inside `as_decode()`)."""
        as_decode = self._seq is not None and self._seq.as_decode
        self._seq = Sequence(self._settings, as_decode=as_decode, **kwargs)
        return self._seq

    @property
    def _layers(self) -> dict[int, LayerState]:
        """The running sequence's per-layer states (tests and harnesses read them)."""
        return self._seq.layers if self._seq is not None else {}

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
        seq = self._start(new_pad=padding)  # the forward it stands for started a prompt
        try:
            for module in self.modules:
                if module.layer_idx in self._sliding:
                    continue
                seq.step(module, (), {**inputs[module.layer_idx], "cache": cache})
        finally:
            seq.new_pad = None  # the next forward's pre-hook reads its own mask

    @contextlib.contextmanager
    def as_decode(self) -> Iterator[None]:
        """Inside, a forward that continues the sequence is a decode step whatever its length:
        the prompt's compressed context is kept and the new tokens are appended, evicted only by
        a policy's decode phase (the query-agnostic protocol: the question is not compressed with
        the context). Outside, a continuation of several tokens is a prefill chunk."""
        seq = self._seq or self._start()
        previous, seq.as_decode = seq.as_decode, True
        try:
            yield
        finally:
            cast(Sequence, self._seq).as_decode = previous  # a prompt started inside inherited True

    def schedule(self, prompt_length: int) -> list[int]:
        """Entries per KV head for each managed layer, for a prompt of this length
        (`evictkit.sequence.schedule`, memoized)."""
        if prompt_length not in self._schedules:
            self._schedules[prompt_length] = schedule(self.policy, self.budget, prompt_length,
                                                      [m.layer_idx for m in self.modules])
        return self._schedules[prompt_length]

    # --- hooks -----------------------------------------------------------------------------
    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._claim.serve_this_thread()  # the per-layer state is one sequence's (evictkit.claims)
        bound = self._forward.arguments(args, kwargs)
        tokens = bound.get("input_ids")
        if tokens is None:
            tokens = bound.get("inputs_embeds")
        if tokens is None:
            return None
        q = tokens.shape[1]
        if self.release_memory and self._last_q > 1:  # after a prefill forward: evictkit.memory says why
            release_freed_memory()
        self._last_q = q
        cache = cache_in(bound)
        empty = cache is None or cache.get_seq_length() == 0
        # a one-shot prompt's forward is not trimmed layer by layer: its peak is the forward's own
        # (the trim would make the next layer fault the pages back in: 5% of a 4k prefill)
        self._trim_layers = self.release_memory and q > 1 and not empty
        new_pad = left_padding(bound.get("attention_mask"), q)
        seq = self._seq
        if seq is None or (empty and not seq.chunking):  # a new prompt (the chunker's first chunk is not)
            seq = self._start()
        seq.new_pad = new_pad
        if self.prefill_chunk is not None and q > self.prefill_chunk and not seq.chunking:
            last_chunk = seq.run_chunks(self.model, self._forward, self.prefill_chunk, args, kwargs, bound,
                                        tokens, cache, empty)
            self._trim_layers = self.release_memory  # the caller's forward runs the last chunk
            return last_chunk
        if empty:
            self.schedule(seq.prompt or q)  # validate the budgets before anything is computed
        positions = seq.position_ids(bound, tokens, empty, self._forward)
        return None if positions is None else self._forward.call(args, kwargs, position_ids=positions)

    # module: Any, a transformers attention module: layer_idx, head_dim, o_proj are attributes nn.Module does not type
    def _after_attention(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        seq = self._seq
        if seq is None or seq.restarts(module, args, kwargs):
            # a prompt the model pre-hook did not see start (a forward of the module alone, a submodule's)
            seq = self._start(new_pad=None if seq is None else seq.new_pad)
        seq.step(module, args, kwargs)
        if self._trim_layers:
            release_freed_memory()  # a chunk's freed buffers, before the next layer's: evictkit.memory

    def _before_attention(self, module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Give a compacted layer a mask of its own size (`Sequence.attention_kwargs`)."""
        new = None if self._seq is None else self._seq.attention_kwargs(module, args, kwargs)
        return None if new is None else (args, new)


def compress(model: nn.Module, policy: Policy | str, budget: int | float, *, phase: str | None = None,
             slack: int = 0, prefill_chunk: int | None = None, ragged_layout: str = "varlen",
             prefill_attention: str | PrefillAttention | None = None, prefill_params: dict[str, Any] | None = None,
             release_memory: bool = True, **params: Any) -> Compression:
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
    prefill_attention: a registered prefill attention ("a_shape", "tri_shape", "vertical_slash",
        "xattention", a plugin's) or an instance, serving every prefill forward (chunks included)
        over the full K/V before the policy evicts; decode runs the model's own attention. None
        or "dense": the model's own attention; policies tagged ragged_heads (AdaKV) are refused with
        a sparse one (docs/sparse-prefill.md)
    prefill_params: the prefill attention's parameters, with a name
    release_memory: before a forward that follows a prefill forward, and after each managed
        layer's step in a prefill chunk that continues a sequence, hand the heap's freed pages back
        to the OS (glibc malloc_trim; evictkit.memory says why; about 1% of a chunked 8k prefill);
        a one-shot prompt's forward and decode steps never pay for it; False: never
    """
    if isinstance(policy, str):
        from evictkit.registry import build_policy

        policy = cast(Policy, build_policy(policy, **params))
    elif params:
        raise ValueError(f"parameters {sorted(params)} can only be given with a policy name, not an instance")
    return Compression(model, policy, budget, phase=phase, slack=slack, prefill_chunk=prefill_chunk,
                       ragged_layout=ragged_layout, prefill_attention=prefill_attention,
                       prefill_params=prefill_params, release_memory=release_memory)


__all__ = ["PHASE_CHOICES", "RAGGED_LAYOUTS", "Compression", "compress"]
