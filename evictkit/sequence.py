"""One sequence under `evictkit.compress`: what a prompt's life needs, from its first forward on.

A `Sequence` starts when a new prompt does (a forward on an empty cache, a replay, or a layer that
sees its cache start again). It holds the prompt's length when known before its first forward
(evictkit's own chunker), the padding of a left-padded batch, whether the sequence has decoded,
whether continuations count as decode (`as_decode`), and the per-layer states. Its `step` runs
after each managed layer's attention: it follows beam search's row moves, runs the per-layer
step (evictkit.step, or evictkit.rows for a left-padded batch), writes the K/V back and keeps the
books (stats, peaks, events) in one place, with the phase the step decided.

The budgets a prompt gets per layer are the pure function `schedule`, so harnesses read them
without a compress block.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any, cast

import attrs
import torch
from torch import nn

from evictkit import cross_layer, padded, ragged, rows
from evictkit.budget import check_budget, resolve_checked
from evictkit.contract import Policy
from evictkit.fixed_cache import hold_for_decoding, store_padded
from evictkit.hf import Forward, attention_modules, attn_implementation, cache_in, is_sliding, new_cache
from evictkit.layout import view_of
from evictkit.ragged_cache import RaggedStore
from evictkit.stats import CompressionStats, EvictEvent, LayerStats
from evictkit.step import Guard, LayerState, StepConfig, evict_step, follow_rows, needs_step, phase_of, track


def schedule(policy: Policy, budget: int | float, prompt_length: int, layers: Seq[int]) -> list[int]:
    """Entries per KV head for each of `layers` (the layer indices of a model's attention modules,
    in order) for a prompt of this length: the budget resolved for the prompt, then the policy's
    `layer_budget` per layer. Raises ValueError when the budget is too small for the policy."""
    budget = check_budget(budget)
    if isinstance(budget, int):
        policy.check_budget(budget)
    base = resolve_checked(policy, budget, prompt_length)
    return [policy.layer_budget(base, li, len(layers), prompt_length) for li in layers]


def schedule_for(model: nn.Module, policy: Policy, budget: int | float, prompt_length: int) -> list[int]:
    """`schedule` for every attention module of `model`, as `evictkit.compress` gives them."""
    return schedule(policy, budget, prompt_length, [m.layer_idx for m in attention_modules(model)])


def left_padding(mask: object, q: int) -> torch.Tensor | None:
    """Padding tokens among a forward's q new tokens, per row [B] (None: no padding), from a
    2-D attention mask whose last q columns are the new tokens. Within them a row must be padded
    on the left (earlier columns may hold the padding of earlier forwards); anything else is refused."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    new = mask[:, -q:].long()
    if bool(new.all()):
        return None
    if bool((new.cummax(dim=1).values != new).any()):
        raise ValueError(
            "evictkit.compress supports left-padded batches only (the attention_mask of a forward's new tokens "
            "has a 0 after a 1): set tokenizer.padding_side = 'left' before tokenizing the batch"
        )
    return (new == 0).sum(dim=1)


def _row_positions(seen: torch.Tensor, new_real: torch.Tensor) -> torch.Tensor:
    """[B, q] true positions of a padded forward's new tokens: each row counts on from its own
    `seen` [B] over its real tokens (`new_real` [B, q], 1 = real); padding gets a neighbour's."""
    return (seen.to(new_real.device)[:, None] + new_real.long().cumsum(-1) - 1).clamp(min=0)


@attrs.define
class Settings:
    """What a compress block fixes for every sequence it runs."""

    step: StepConfig
    budget: int | float
    layers: tuple[int, ...]  # layer_idx of every attention module, in order: a schedule's index
    schedule: Callable[[int], list[int]]  # prompt length -> per-layer budgets (memoized by the block)
    guard: Guard
    store: RaggedStore
    stats: CompressionStats
    observers: Any  # the pluggy hook caller of `evictkit_after_evict`, set when the block is entered
    last_layer: int | None = None  # the last managed layer: a cross-layer policy's cut follows its step

    @property
    def name(self) -> str:
        return self.step.policy.name


class Sequence:
    """One prompt's life under a compress block (see the module's docstring)."""

    def __init__(self, run: Settings, *, prompt: int | None = None, pad_before: torch.Tensor | None = None,
                 new_pad: torch.Tensor | None = None, as_decode: bool = False) -> None:
        self.run = run
        self.layers: dict[int, LayerState] = {}
        self.prompt = prompt  # the whole prompt's length, when evictkit's chunker knew it before the first chunk
        self.pad_before = pad_before  # [B] padding of that whole prompt, while the chunker runs it
        # a forward of this sequence had padding (a cross-layer policy steps unpadded batches as padded
        # ones too: those need no mask of evictkit's, and the model's own keeps its logits bit-exact);
        # set with every forward's padding, by `new_pad`'s setter
        self.saw_padding = pad_before is not None
        self.new_pad = new_pad  # [B] padding tokens among the current forward's new ones (None: none)
        self.as_decode = as_decode  # continuations are decode steps (Compression.as_decode)
        self.decoded = False  # a forward after the prompt has run
        self.chunking = False  # inside the forwards evictkit's chunker runs itself
        self.pending: dict[int, cross_layer.Deferred] = {}  # a cross-layer policy's layers, this forward

    @property
    def new_pad(self) -> torch.Tensor | None:
        return self._new_pad

    @new_pad.setter
    def new_pad(self, pad: torch.Tensor | None) -> None:
        self._new_pad = pad
        self.saw_padding = self.saw_padding or pad is not None

    # --- forwards ------------------------------------------------------------------------------
    def seen(self) -> int | None:
        """Tokens of the sequence so far (the next token's true position); None before any."""
        return next((s.seen for s in self.layers.values() if s.positions is not None), None)

    def rows_seen(self, empty: bool, batch: int) -> torch.Tensor:
        """[B] real tokens each row has seen so far (the next one's true position)."""
        if not empty:
            st = next((s for s in self.layers.values() if s.row_seen is not None), None)
            if st is not None:
                return cast(torch.Tensor, st.row_seen).cpu()
            rows_ = self.rows()
            if rows_ is not None:
                return torch.tensor([0 if r is None else r.seen for r in rows_])
        return torch.full((batch,), 0 if empty else (self.seen() or 0), dtype=torch.long)

    def rows(self) -> list[LayerState | None] | None:
        """A left-padded batch's per-row states, when it is stepped row by row (None: it is not)."""
        return next((s.rows for s in self.layers.values() if s.rows is not None), None)

    def padded(self) -> bool:
        """Whether this sequence is a left-padded batch (stepped as one or row by row)."""
        return any(s.rows is not None or s.row_seen is not None for s in self.layers.values())

    def position_ids(self, bound: dict, tokens: torch.Tensor, empty: bool, forward: Forward) -> torch.Tensor | None:
        """True `position_ids` for a forward that would number its tokens wrongly (None: leave it):
        each row of a padded batch from its own first token, a continuation from the true length
        (the model would count from the compacted cache), and in "shift" mode from the cache length."""
        q, device = tokens.shape[1], tokens.device
        shift = self.run.step.inv_freq is not None
        if self.new_pad is not None or (not empty and self.padded()):  # a left-padded batch
            if shift:
                raise ValueError(f"policy {self.run.name!r} with positions='shift' does not support padded batches")
            if bound.get("position_ids") is not None or not forward.takes("position_ids"):
                return None
            mask = bound.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                new_real = mask[:, -q:]
            elif self.new_pad is not None:
                new_real = torch.arange(q, device=device) >= self.new_pad.to(device)[:, None]
            else:  # a batch stepped as a padded one with no padding now (a cross-layer policy's)
                new_real = torch.ones(tokens.shape[0], q, dtype=torch.bool, device=device)
            return _row_positions(self.rows_seen(empty, new_real.shape[0]), new_real)
        seen = None if empty else self.seen()
        if seen is None:
            return None
        if shift:  # pos-shift: new tokens are numbered from the cache length, whatever the caller passed
            lengths = {s.positions.shape[-1] for s in self.layers.values() if s.positions is not None}
            if len(lengths) != 1:
                raise RuntimeError(f"positions='shift' needs equal cache lengths across layers, got {sorted(lengths)}")
            start = lengths.pop()
            return torch.arange(start, start + q, device=device).unsqueeze(0)
        if bound.get("position_ids") is None and forward.takes("position_ids"):
            return torch.arange(seen, seen + q, device=device).unsqueeze(0)
        return None

    def run_chunks(self, model: nn.Module, forward: Forward, c: int, args: tuple, kwargs: dict, bound: dict,
                   tokens: torch.Tensor, cache: Any, empty: bool) -> tuple[tuple, dict]:
        """Split one long forward into `c`-token forwards: every chunk but the last runs here, each
        followed by the eviction step; the caller's forward then runs the last chunk, and gets its
        outputs (all that generate() reads)."""
        n = tokens.shape[1]
        if bound.get("use_cache") is False:
            raise ValueError("prefill_chunk needs the KV cache: do not pass use_cache=False")
        key = "input_ids" if bound.get("input_ids") is not None else "inputs_embeds"
        if cache is None:
            cache = new_cache(model)
        if empty:
            self.prompt, self.pad_before = n, left_padding(bound.get("attention_mask"), n)
            self.run.schedule(n)  # validate the budgets before anything is computed
        seen = 0 if empty else (self.seen() or 0)
        given = bound.get("position_ids")
        mask = bound.get("attention_mask") if isinstance(bound.get("attention_mask"), torch.Tensor) else None
        padded = mask is not None and not bool(mask.all())
        if given is not None:
            positions = given
        elif mask is not None and padded:  # each row counts on from its own length over its real tokens
            positions = _row_positions(self.rows_seen(empty, mask.shape[0]), mask[:, -n:])
        else:
            positions = torch.arange(seen, seen + n, device=tokens.device).unsqueeze(0)
        extra = {"logits_to_keep": 1} if forward.takes("logits_to_keep") else {}
        # aligned to the end: the first chunk takes the remainder, so each row of a left-padded
        # batch is cut at the same distances from its end as it is alone (the batch law), and the
        # last chunk, whose queries score the final eviction, is always whole
        bounds = [0, *range(n % c or c, n + 1, c)]
        self.chunking = True
        try:
            for start, end in zip(bounds[:-2], bounds[1:-1]):
                if mask is not None and padded:  # each chunk needs the padding in its mask; all ones needs none
                    extra["attention_mask"] = mask[:, : mask.shape[1] - n + end]
                model(**{key: tokens[:, start:end], forward.cache_kwarg: cache, "use_cache": True,
                         "position_ids": positions[..., start:end]}, **extra)
        finally:
            # the caller's forward runs the last chunk as any forward: a row starting in it is whole there
            self.chunking, self.pad_before = False, None
        last = bounds[-2]
        changes: dict[str, Any] = {key: tokens[:, last:], "cache": cache, "position_ids": positions[..., last:]}
        if isinstance(mask, torch.Tensor):
            changes["attention_mask"] = mask
        self.new_pad = left_padding(changes.get("attention_mask", bound.get("attention_mask")), n - last)
        return forward.call(args, kwargs, **changes)

    def attention_kwargs(self, module: Any, args: tuple, kwargs: dict) -> dict | None:
        """An attention module's keyword arguments with a mask of its layer's own size (None: the
        model's own mask serves): per-head padding hidden, each row's padding in a left-padded
        batch, and the right length where layers differ in length (the model sizes one mask for
        all from layer 0)."""
        st = self.layers.get(module.layer_idx)
        if st is None or st.positions is None:
            return None
        cache = cache_in(kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or hidden is None or module.layer_idx >= len(cache.layers):
            return None
        view = view_of(cache.layers[module.layer_idx], st.pad)
        if not view.masked and self.new_pad is not None:
            # padding among the new tokens must be masked, and the varlen attention takes no mask:
            # the layer goes back to the padded storage (a padded batch's rows keep it)
            cache.layers[module.layer_idx] = view.padded_layer()
            view = view_of(cache.layers[module.layer_idx], st.pad)
        if not view.masked:
            return None  # evictkit's varlen attention reads each head's own entries: no mask
        past = view.slots
        if past != st.positions.shape[-1]:  # a new sequence starts: nothing of ours applies
            return None
        mask, q = kwargs.get("attention_mask"), hidden.shape[1]
        # a padded batch's own mask hides the slots where its padding was, wherever entries are now
        stepped_as_padded = st.row_seen is not None and self.saw_padding
        if st.pad is None and st.rows is None and not stepped_as_padded and self.new_pad is None and not (
                isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] != past + q):
            return None
        return {**kwargs, "attention_mask": ragged.attention_mask(
            st.pad, past, q, batch=hidden.shape[0], n_heads=module.o_proj.weight.shape[1] // module.head_dim,
            like=mask, attn_impl=attn_implementation(module), dtype=hidden.dtype, device=hidden.device,
            new_pad=self.new_pad,
        )}

    def restarts(self, module: Any, args: tuple, kwargs: dict) -> bool:
        """Whether a layer this sequence has stepped holds only this forward's tokens again: a new
        prompt that the model pre-hook did not see start (a forward of a submodule alone)."""
        cache = cache_in(kwargs)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or hidden is None or module.layer_idx not in self.layers:
            return False
        return cache.layers[module.layer_idx].get_seq_length() == hidden.shape[1]

    # --- the step after a layer's attention ----------------------------------------------------
    def step(self, module: Any, args: tuple, kwargs: dict) -> None:
        """The eviction step of one managed layer after its attention (`kwargs` are the attention
        module's: hidden_states, position_embeddings, position_ids, the cache); after the last
        managed layer, a cross-layer policy's allocation and cut (evictkit.cross_layer)."""
        self._step(module, args, kwargs)
        if self.pending and module.layer_idx == self.run.last_layer:
            self.allocate(cache_in(kwargs))

    def allocate(self, cache: Any) -> None:
        """A cross-layer policy's cut after a prefill forward: every deferred layer's budgets
        allocated at once, then each layer cut to them."""
        pending, self.pending = self.pending, {}
        run = self.run
        if cache is None:
            return
        static = {li: run.layers.index(li) for li in pending}

        def totals(b: int, lis: list[int]) -> int:  # what the static schedule keeps over these layers
            length = self._row_length(b, int(cast(torch.Tensor, self.layers[lis[0]].row_seen)[b]))
            return sum(run.schedule(length)[static[li]] for li in lis)

        lis = cross_layer.allocate(run.step, run.guard, self.layers, pending, cache, totals)
        for li in lis:
            st, deferred = self.layers[li], pending[li]
            evicted = cross_layer.cut(run.step, run.guard, st, deferred, cache, li, len(run.layers))
            after = view_of(cache.layers[li], st.pad)
            st.last_keys = after.newest_keys().clone()
            self._record(li, st, phase="prefill", evicted=evicted or deferred.evicted, before=deferred.before,
                         size=after.slots, entries=after.real_entries(), seen=st.seen)

    def _step(self, module: Any, args: tuple, kwargs: dict) -> None:
        cache = cache_in(kwargs)
        if cache is None:
            return
        run, li = self.run, module.layer_idx
        layer = cache.layers[li]
        if is_sliding(layer):
            if li not in run.stats.skipped_layers:
                run.stats.skipped_layers.append(li)
            return
        hidden = cast(torch.Tensor, kwargs.get("hidden_states", args[0] if args else None))
        st = self.layers.get(li)
        view = view_of(layer, None if st is None else st.pad)
        T, q = view.slots, hidden.shape[1]
        if st is not None and T > q:  # beam search may have reordered the rows since the last step
            follow_rows(st, view.newest_keys(q))
        is_padded = (T == q and self.new_pad is not None) or (
            st is not None and T != q and (st.rows is not None or st.row_seen is not None or self.new_pad is not None))
        # a cross-layer policy's layers are cut together after the last one: always the padded step
        if (is_padded or run.step.needs.cross_layer) and run.step.needs.padding and (
                st is None or T == q or st.rows is None):
            self._padded_step(module, cache, st, hidden, kwargs)
            return
        if st is not None and T != q and st.rows is None and self.new_pad is not None:
            rows.split_rows(st)  # a batch stepped as one gets padding among its new tokens
        if is_padded:
            self._rows_step(module, cache, st, hidden, kwargs)
            return
        if T == q or st is None:  # the layer's first forward of this sequence
            if T != q:
                raise RuntimeError(
                    f"layer {li}: the cache already held {T - q} entries when evictkit.compress first saw it; "
                    "start the sequence (prefill) inside the `with` block"
                )
            st = self._start_layer(li, budget=run.schedule(self.prompt or T)[run.layers.index(li)])
        elif st.positions is None or st.positions.shape[-1] != T - q:
            raise RuntimeError(
                f"layer {li}: the cache holds {T - q} earlier entries but evictkit tracked "
                f"{0 if st.positions is None else st.positions.shape[-1]}; it was changed outside evictkit"
            )
        elif q > 1 and isinstance(run.budget, float) and not (
                self.prompt is not None or self.decoded or self.as_decode):
            raise ValueError(
                f"budget={run.budget} is a fraction of the prompt, but this prompt arrives in chunks whose total "
                "evictkit cannot know (transformers' prefill_chunk_size, or a loop of forwards): give an int budget, "
                "or let evictkit chunk the prompt with evictkit.compress(..., prefill_chunk=N)"
            )
        # in "shift" mode position_ids are cache slots; the step counts the true positions itself
        position_ids = None if run.step.inv_freq is not None else kwargs.get("position_ids")
        if view.costly_to_read and not needs_step(run.step, st, q, as_decode=self.as_decode):
            # nothing reads the entries: keep the layer as update() left it
            phase = track(run.step, st, module=module, hidden_states=hidden,
                          position_embeddings=kwargs["position_embeddings"], position_ids=position_ids,
                          n_kv_heads=view.n_kv_heads, device=hidden.device, as_decode=self.as_decode)
            evicted = False
        else:
            keys, values = view.kv()
            result = evict_step(
                run.step, st, module=module, layer_idx=li, n_layers=len(run.layers), keys=keys, values=values,
                hidden_states=hidden, position_embeddings=kwargs["position_embeddings"], position_ids=position_ids,
                as_decode=self.as_decode, guard=run.guard,
            )
            phase, evicted = result.phase, result.selection is not None
            # a head-padded layer is stored again even when nothing was evicted: the varlen layout
            # takes it back after a block's exit gave it the padded one (RaggedStore.close)
            if evicted or (st.pad is not None and not view.costly_to_read):
                run.store.store(cache, li, module, st.pad, result.keys, result.values, self._headroom(q))
        if q == 1 and not evicted:
            hold_for_decoding(cache, li, run.step.slack + 1)
        after = view_of(cache.layers[li], st.pad)
        st.last_keys = after.newest_keys().clone()
        self._record(li, st, phase=phase, evicted=evicted, before=T, size=after.slots, entries=after.real_entries(),
                     seen=st.seen)

    def _padded_step(self, module: Any, cache: Any, st: LayerState | None, hidden: torch.Tensor,
                     kwargs: dict) -> None:
        """A left-padded batch of a policy that honours padding: stepped as one (evictkit.padded)."""
        run, li = self.run, module.layer_idx
        if run.step.inv_freq is not None:
            raise ValueError(f"policy {run.name!r} with positions='shift' does not support padded batches")
        keys, values = view_of(cache.layers[li], None if st is None else st.pad).kv()
        stored = keys
        B, _, T, _ = keys.shape
        q = hidden.shape[1]
        if st is None or T == q:  # the layer's first forward of this sequence
            st = self._start_layer(li, budget=0)
        if st.row_seen is None:  # a batch stepped as one so far, every row started
            padded.start(st, B, st.seen, st.budget, keys.device)
        new_pad = self.new_pad if self.new_pad is not None else torch.zeros(B, dtype=torch.long)
        keys, values, phase, evicted = padded.padded_step(
            run.step, st, module=module, layer_idx=li, n_layers=len(run.layers), keys=keys, values=values,
            hidden_states=hidden, position_embeddings=kwargs["position_embeddings"],
            position_ids=kwargs.get("position_ids"), new_pad=new_pad, row_budget=self._row_budget(li),
            as_decode=self.as_decode, guard=run.guard,
            defer=self._defer(module) if run.step.needs.cross_layer else None,
        )
        if keys is not stored:
            store_padded(cache, li, keys, values, self._headroom(q))
        elif q == 1:
            hold_for_decoding(cache, li, run.step.slack + 1)
        after = view_of(cache.layers[li], st.pad)
        st.last_keys = after.newest_keys().clone()
        deferred = self.pending.get(li)
        if deferred is not None:  # the books after the cut: sizes are those the forward leaves
            deferred.before, deferred.evicted = T, evicted
            return
        self._record(li, st, phase=phase, evicted=evicted, before=T, size=after.slots,
                     entries=after.real_entries(), seen=st.seen)

    def _defer(self, module: Any) -> Callable[[Any, torch.Tensor], None]:
        """A cross-layer policy's layer at a prefill forward: keep its signal for the allocation."""
        run = self.run

        def defer(obs: Any, rows_: torch.Tensor) -> None:
            signal = run.guard.call("layer_signal()", run.step.policy.layer_signal, obs)
            B = obs.keys.shape[0]
            if not isinstance(signal, torch.Tensor) or signal.shape != (B,):
                raise ValueError(f"policy {run.name!r}: layer_signal() must return a tensor [B] = [{B}], got "
                                 f"{type(signal).__name__} {tuple(getattr(signal, 'shape', ()))}")
            self.pending[module.layer_idx] = cross_layer.Deferred(module, signal, obs.rows, rows_)

        return defer

    def _row_length(self, b: int, length: int) -> int:
        """Row b's prompt length: the whole prompt's when evictkit's chunker knew it, else `length`."""
        if self.prompt is not None and self.pad_before is not None:
            return self.prompt - int(self.pad_before[b])
        return length

    def _row_budget(self, li: int) -> Callable[[int, int], int]:
        """row_budget(b, length): row b's budget in layer li for a prompt of `length` real tokens
        (the whole prompt's, when evictkit's chunker knew it)."""
        run = self.run
        index = run.layers.index(li)

        def row_budget(b: int, length: int) -> int:
            return run.schedule(self._row_length(b, length))[index]

        return row_budget

    def _rows_step(self, module: Any, cache: Any, st: LayerState | None, hidden: torch.Tensor, kwargs: dict) -> None:
        """A left-padded batch of a policy that has not declared `Needs.padding`: each row stepped
        alone on its view of the layer (evictkit.rows)."""
        run, li = self.run, module.layer_idx
        layer = cache.layers[li]
        T, q = layer.keys.shape[2], hidden.shape[1]
        new_pad = self.new_pad.tolist() if self.new_pad is not None else [0] * layer.keys.shape[0]
        if run.step.inv_freq is not None:
            raise ValueError(f"policy {run.name!r} with positions='shift' does not support padded batches")
        if st is None or T == q:  # the layer's first forward of this sequence
            st = self._start_layer(li, budget=0)
            st.rows, st.offsets = rows.start_rows(layer.keys.shape[0])
            warnings.warn(
                f"policy {run.name!r} does not declare Needs(padding=True), so evictkit steps its padded batches "
                "row by row (slower, and its kernel launches grow with the rows); once its scores ignore padding, "
                "return Needs(..., padding=True) from needs() and run the kit's 'padding' law "
                "(docs/writing-a-policy.md)", DeprecationWarning, stacklevel=2)
        row_budget = self._row_budget(li)

        phase = phase_of(st, q, self.as_decode)
        keys, values, evicted = rows.rows_step(
            run.step, st, module=module, layer_idx=li, n_layers=len(run.layers), keys=layer.keys,
            values=layer.values, hidden_states=hidden, position_embeddings=kwargs["position_embeddings"],
            position_ids=kwargs.get("position_ids"), new_pad=new_pad, row_budget=row_budget,
            as_decode=self.as_decode, guard=run.guard,
        )
        if keys is not layer.keys:
            store_padded(cache, li, keys, values, self._headroom(q))
        elif q == 1:
            hold_for_decoding(cache, li, run.step.slack + 1)
        after = view_of(cache.layers[li], st.pad)
        st.last_keys = after.newest_keys().clone()
        started = [r for r in st.rows or () if r is not None]
        st.budget = max((r.budget for r in started), default=0)
        self._record(li, st, phase=phase, evicted=evicted, before=T, size=after.slots,
                     entries=after.real_entries(), seen=max((r.seen for r in started), default=0))

    def _headroom(self, q: int) -> int | None:
        """Room a layer compacted by a forward of q tokens keeps: None after a prefill forward (a
        plain layer: evictkit.fixed_cache.store_padded says why), slack + 1 after a decode step."""
        return None if q > 1 else self.run.step.slack + 1

    # --- the books -----------------------------------------------------------------------------
    def _start_layer(self, li: int, budget: int) -> LayerState:
        st = self.layers[li] = LayerState(budget=budget)
        self.decoded = False
        stats = self._stats(li)
        stats.prompt_length, stats.budget, stats.evictions, stats.peak = 0, budget, 0, 0
        return st

    def _record(self, li: int, st: LayerState, *, phase: str, evicted: bool, before: int, size: int, entries: int,
                seen: int) -> None:
        """The one bookkeeping path after a layer's step: sizes, peak, the prompt's numbers, and
        the observers' event, all with the phase the step decided."""
        run, stats = self.run, self._stats(li)
        if evicted:
            stats.evictions += 1
            if run.observers is not None and run.observers.get_hookimpls():
                run.observers(event=EvictEvent(policy=run.name, layer=li, phase=phase, before=before, after=size,
                                               budget=st.budget))
        stats.budget, stats.size, stats.entries = st.budget, size, entries
        stats.peak = max(stats.peak, size)
        if phase == "prefill" and not self.decoded:  # the prompt, in one forward or in chunks
            stats.prompt_length = max(stats.prompt_length, seen)
            stats.after_prefill = size
        else:
            self.decoded = True

    def _stats(self, li: int) -> LayerStats:
        layers = self.run.stats.layers
        for s in layers:
            if s.layer == li:
                return s
        s = LayerStats(layer=li)
        layers.append(s)
        layers.sort(key=lambda x: x.layer)
        return s


__all__ = ["Sequence", "Settings", "left_padding", "schedule", "schedule_for"]
