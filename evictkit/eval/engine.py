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
changes the forward itself during prefill); it then gets its own prefill. That attribute is an
evaluation setting, read here (`can_share`), not a member of the policy contract.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import attrs
import torch
from torch import nn

from evictkit.attention import attention_weights, project_queries
from evictkit.compress import Compression
from evictkit.contract import Policy, declared
from evictkit.hf import attention_modules, cache_kwarg, is_sliding, new_cache
from evictkit.layout import real_counts
from evictkit.prefill_attention import PrefillScope, PrefillStats
from evictkit.prefill_contract import PrefillAttention
from evictkit.ragged_cache import RaggedLayer, dense_kv
from evictkit.stats import CompressionStats, LayerStats


def copy_cache(cache):
    """A cache that shares the K/V tensors but not the layer objects: cache updates and the
    compaction core replace tensors instead of writing into them, so the source stays intact."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    return out


def cache_bytes(cache) -> int:
    """Bytes of the K and V entries every layer of a transformers Cache holds (a fixed-capacity
    layer's free slots, at most max(chunk, slack + 1) per layer and head, are not counted; nor are
    a ragged layer's free rows, whose [M, D] storage holds its entries with room after each head)."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                rows = int(layer.counts.sum()) if isinstance(layer, RaggedLayer) else t.numel() // t.shape[-1]
                total += rows * t.shape[-1] * t.element_size()
    return total


@attrs.define
class Prefill:
    """The shared full-attention prefill of one prompt."""

    cache: Any
    inputs: dict[int, dict]  # layer -> the attention module's hidden_states, position_embeddings, position_ids
    logits: torch.Tensor  # [B, V] at the last prompt position
    length: int
    seconds: float
    pad: tuple[int, ...] = ()  # a left-padded batch's leading padding per row (() for one prompt)
    mask: torch.Tensor | None = None  # its 2-D attention mask [B, length]
    prefill_stats: PrefillStats | None = None  # what a sparse prefill attention computed (None: dense)

    @property
    def batch(self) -> int:
        return max(1, len(self.pad))


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


class _Dense(contextlib.AbstractContextManager):
    """Dense prefill: nothing to install, nothing counted."""

    stats: PrefillStats | None = None

    def __exit__(self, *exc: object) -> None:
        return None


def prefill_scope(model: nn.Module, method: PrefillAttention | None, policy: Policy | None = None):
    """The block serving the prompt's forward with `method` (None or a dense method: nothing
    installed, `stats` None). Only the prompt's forward runs inside it: the question and the answer
    that follow are the model's own attention, as they are decode steps of the compressed context."""
    if method is None or method.dense:
        return _Dense()
    return PrefillScope(model, method, policy=policy)


@torch.no_grad()
def shared_prefill(model: nn.Module, ids: Sequence[int], device: torch.device | str = "cpu",
                   method: PrefillAttention | None = None) -> Prefill:
    """Prefill `ids` without eviction (its attention computed by `method`, None: the model's own),
    keeping each attention module's inputs for replay."""
    x = torch.tensor([list(ids)], device=device)
    inputs: dict[int, dict] = {}
    handles = _capture(model, inputs)
    t0 = time.perf_counter()
    try:
        cache = new_cache(model)
        with prefill_scope(model, method) as scope:
            out = _forward(model, x, cache, 0)
    finally:
        for h in handles:
            h.remove()
    return Prefill(cache=cache, inputs=inputs, logits=out.logits[:, -1].float(), length=x.shape[1],
                   seconds=time.perf_counter() - t0, prefill_stats=scope.stats)


def replay(comp: Compression, cache, inputs: dict[int, dict]) -> None:
    """Apply `comp`'s prefill step to a cache filled by a full-attention prefill (see Compression.replay)."""
    comp.replay(cache, inputs)


def kept_positions(comp: Compression) -> dict[int, torch.Tensor]:
    """True positions held by each managed layer now: {layer: [B, H_kv, K]}."""
    return comp.kept_positions()


def can_share(policy: Policy) -> bool:
    """False when the policy's class (or a base below Policy) sets `shared_prefill = False`."""
    for klass in type(policy).__mro__:
        if klass is Policy:
            break
        if "shared_prefill" in vars(klass):
            return bool(vars(klass)["shared_prefill"])
    return True


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
    prefill: PrefillStats | None = None  # the sparse prefill attention's (None: dense)


def _uniform(cache) -> bool:
    lengths = {layer.get_seq_length() for layer in cache.layers if not is_sliding(layer)}
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
        if is_sliding(layer):
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
                eos: frozenset[int], query_aware: bool, recon_ref: ReconReference | None = None,
                method: PrefillAttention | None = None) -> Outcome:
    """Run one (policy, budget) on one sample; `pre` is the shared prefill (None: its own), made
    under `method`, the prompt's prefill attention (None: the model's own), as its own prefill is."""
    prompt = list(sample.context_ids) + (list(sample.question_ids) if query_aware else [])
    question = [] if query_aware else list(sample.question_ids)
    res = Outcome()
    comp = Compression(model, policy, budget)
    with comp:
        t0 = time.perf_counter()
        if pre is not None and can_share(policy):
            cache = copy_cache(pre.cache)
            replay(comp, cache, pre.inputs)
            logits, res.prefill = pre.logits, pre.prefill_stats
        else:
            cache = new_cache(model)
            # not Compression(prefill_attention=...): its scope spans the block, so the question's
            # forward (several tokens) would be served too; here it stays the model's own attention
            with torch.no_grad(), prefill_scope(model, method, policy) as scope:
                logits = _forward(model, torch.tensor([prompt], device=device), cache, 0).logits[:, -1].float()
            res.prefill = scope.stats
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


# --- left-padded batches (evictkit eval --batch-size) -----------------------------------------
#
# A batch of samples runs as one left-padded batch: the core steps every row alone on its view of
# the shared cache (evictkit.rows), so each row gets what its sample gets alone. The harness adds
# per-row positions and masks for the forwards after the prompt, per-row stopping, and per-row
# views of what a row alone reports (kept positions, sizes, bytes). Rows need not run the same
# forwards after the prompt: questions and continuations of different lengths are left-padded
# among a forward's new tokens (the core's interior padding), and a row that has finished
# generating is fed as padding (mask 0), so the core no longer scores or evicts it; a row with
# no real token in a forward is not stepped, as alone it would run no forward.


def batchable(policy: Policy) -> bool:
    """Whether the core runs `policy` on a left-padded batch (positions='shift' renumbers the cache
    and does not: such a variant runs its samples one at a time)."""
    return declared(policy).positions != "shift"


def sample_prompt(sample, query_aware: bool) -> list[int]:
    """What the prefill of `sample` holds: the context, and the question when query-aware."""
    return list(sample.context_ids) + (list(sample.question_ids) if query_aware else [])


def left_pad(prompts: Sequence[Sequence[int]], device, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, longest] token ids and 2-D attention mask, every row right-aligned (left padding)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[b, L - len(p):] = 1
    return ids.to(device), mask.to(device)


def _prefill_rows(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache):
    # each row's first real token is position 0, as when the row runs alone
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                 **{cache_kwarg(model): cache})


def _forward_rows(model: nn.Module, ids: torch.Tensor, cache, mask: torch.Tensor, seen: torch.Tensor,
                  real: torch.Tensor | None = None, keep_logits: int = 1):
    """[B, q] new tokens, left-padded per row by `real` [B, q] (1 = a real token; None: all real),
    row b numbered on from its own true length seen[b] [B]. Returns (output, grown mask, grown seen).
    The mask grows by the new tokens' columns as generate() grows it, padding as 0, so the core
    sees the batch's padding as it does there; padding takes its neighbour's position (masked)."""
    if real is None:
        real = torch.ones_like(ids)
    real = real.to(device=ids.device, dtype=mask.dtype)
    mask = torch.cat([mask, real], dim=1)
    seen = seen.to(ids.device)
    positions = (seen[:, None] + real.cumsum(-1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {cache_kwarg(model): cache, "use_cache": True, "position_ids": positions,
                              "attention_mask": mask}
    if keep_logits:
        kwargs["logits_to_keep"] = keep_logits
    return model(input_ids=ids, **kwargs), mask, seen + real.sum(-1)


@torch.no_grad()
def shared_prefill_batch(model: nn.Module, prompts: Sequence[Sequence[int]], device) -> Prefill:
    """`shared_prefill` of a left-padded batch of prompts (one forward)."""
    ids, mask = left_pad(prompts, device)
    inputs: dict[int, dict] = {}
    handles = _capture(model, inputs)
    t0 = time.perf_counter()
    try:
        cache = new_cache(model)
        out = _prefill_rows(model, ids, mask, cache)
    finally:
        for h in handles:
            h.remove()
    L = ids.shape[1]
    return Prefill(cache=cache, inputs=inputs, logits=out.logits[:, -1].float(), length=L,
                   seconds=time.perf_counter() - t0, pad=tuple(L - len(p) for p in prompts), mask=mask)


def _row_sizes(kept: dict[int, torch.Tensor]) -> list[list[int]]:
    """Per row, per managed layer: the entries per KV head the row holds (its view's length, the
    most real entries of any of its heads), which is the layer's length when the row runs alone."""
    per_layer = [real_counts(pos).amax(-1).tolist() for pos in kept.values()]
    return [list(col) for col in zip(*per_layer)]


class _RowSizes:
    """Each row's layer sizes after every forward that row would have run alone (its CompressionStats).

    Why the harness counts these and does not read `Compression.stats`: the core books each layer
    of the batch (its length is the longest row's), while a row alone reports its own length; and
    a row that stopped decoding alone would not have run the forwards the batch still runs for
    the others. Both are per-row views the core does not keep. (The phase the core books is right
    for a batched question under `as_decode()` since it is decided in one place, evictkit.step.)
    """

    def __init__(self, comp: Compression, batch: int) -> None:
        self.comp = comp
        self.kept = comp.kept_positions()
        self.layers = list(self.kept)
        self.now = _row_sizes(self.kept) if self.kept else [[] for _ in range(batch)]
        self.after_prefill = [list(s) for s in self.now]
        self.peak = [list(s) for s in self.now]

    def update(self, active: Sequence[bool]) -> None:
        self.kept = self.comp.kept_positions()
        sizes = _row_sizes(self.kept) if self.kept else [[] for _ in active]
        for b, on in enumerate(active):
            if on:  # a row that stopped alone would not have run this forward
                self.now[b] = sizes[b]
                self.peak[b] = [max(p, s) for p, s in zip(self.peak[b], sizes[b])]

    def row_kept(self, b: int) -> dict[int, torch.Tensor]:
        """Row b's kept positions as alone: the last `size` slots of its row (the rest is batch padding)."""
        return {li: pos[b:b + 1, :, pos.shape[-1] - n:] for (li, pos), n in zip(self.kept.items(), self.now[b])}

    def stats(self, b: int) -> CompressionStats:
        return CompressionStats(layers=[
            LayerStats(layer=li, after_prefill=a, size=s, peak=p)
            for li, a, s, p in zip(self.layers, self.after_prefill[b], self.now[b], self.peak[b])
        ])


def _row_bytes(cache, kept: dict[int, torch.Tensor], b: int, sizes: dict[int, int], length: int) -> int:
    """K/V bytes row b holds alone: its own length on managed layers, min(layer, prompt) on the others
    (a sliding layer of the batch holds the longest prompt's window); a layer stored flattened
    ([N, D], evictkit.ragged_cache) holds exactly the row's real entries."""
    total = 0
    for li, layer in enumerate(cache.layers):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() == 4:
                total += sizes.get(li, min(t.shape[2], length)) * t.shape[1] * t.shape[3] * t.element_size()
            elif li in kept:
                total += int(real_counts(kept[li][b:b + 1]).sum()) * t.shape[-1] * t.element_size()
    return total


def run_variant_batch(model: nn.Module, policy: Policy, budget: int | float, samples: Sequence, pre: Prefill | None,
                      *, device, eos: frozenset[int], query_aware: bool) -> list[Outcome] | None:
    """`run_variant` on a left-padded batch of samples (questions, continuations and max_new_tokens
    may differ); `pre` is their `shared_prefill_batch` (None: a prefill of its own). One Outcome per
    sample, what `run_variant` gives it alone. None when the rows would feed their question differently
    alone (some rows' layers hold equal lengths, others' not; see `greedy`): run those samples alone."""
    prompts = [sample_prompt(s, query_aware) for s in samples]
    B = len(samples)
    outs = [Outcome() for _ in samples]
    comp = Compression(model, policy, budget)
    with comp:
        t0 = time.perf_counter()
        if pre is not None and can_share(policy):
            cache = copy_cache(pre.cache)
            comp.replay(cache, pre.inputs, padding=torch.tensor(pre.pad))
            logits, mask = pre.logits, cast(torch.Tensor, pre.mask)  # set by shared_prefill_batch
        else:
            ids, mask = left_pad(prompts, device)
            cache = new_cache(model)
            with torch.no_grad():
                logits = _prefill_rows(model, ids, mask, cache).logits[:, -1].float()
        evict_s = time.perf_counter() - t0
        track = _RowSizes(comp, B)
        for b, res in enumerate(outs):
            res.cache_bytes = _row_bytes(cache, track.kept, b, dict(zip(track.layers, track.now[b])), len(prompts[b]))
        t0 = time.perf_counter()
        with comp.as_decode(), torch.no_grad():
            ok = _finish_batch(model, samples, prompts, query_aware, cache, mask, logits, outs, track, device, eos)
        decode_s = time.perf_counter() - t0
    if not ok:
        return None
    for b, res in enumerate(outs):
        res.evict_s, res.decode_s, res.stats = evict_s / B, decode_s / B, track.stats(b)
    return outs


def _finish_batch(model: nn.Module, samples: Sequence, prompts: list[list[int]], query_aware: bool, cache,
                  mask: torch.Tensor, logits: torch.Tensor, outs: list[Outcome], track: _RowSizes, device,
                  eos: frozenset[int]) -> bool:
    """`_finish` for every row of a batch; False when the rows cannot share the question's forwards."""
    B = len(samples)
    seen = torch.tensor([len(p) for p in prompts], device=device)
    metric = samples[0].metric
    if metric == "recon":
        raise ValueError("recon samples run one at a time (their reference is per sample)")
    if metric == "ppl":
        _teacher_forced_batch(model, samples, cache, mask, seen, logits, outs, track, device)
        return True
    questions = [[] if query_aware else list(s.question_ids) for s in samples]
    if any(questions):
        uniform = [len(set(sizes)) <= 1 for sizes in track.now]  # what `greedy` checks, per row
        if not all(uniform) and any(uniform):
            return False
        ids, real = left_pad(questions, device)
        step = ids.shape[1] if all(uniform) else 1
        for i in range(0, ids.shape[1], step):
            chunk = real[:, i:i + step]
            out, mask, seen = _forward_rows(model, ids[:, i:i + step], cache, mask, seen, chunk)
            fed = chunk[:, -1].bool()  # left padding: a row with a real token has one last
            logits = torch.where(fed[:, None], out.logits[:, -1], logits)
            track.update(fed.tolist())
    for b, res in enumerate(outs):
        res.kept = track.row_kept(b)
    limits = [s.max_new_tokens for s in samples]
    active = [n > 0 for n in limits]
    for _ in range(max(limits, default=0)):
        nxt = logits.argmax(-1)
        for b in range(B):
            if not active[b]:
                continue
            token = int(nxt[b])
            if token in eos:
                active[b] = False
                continue
            outs[b].tokens.append(token)
            active[b] = len(outs[b].tokens) < limits[b]  # alone, the last token is not fed back
        if not any(active):
            break
        # a row that has stopped is fed as padding: alone it runs no more forwards, so the core
        # neither steps (scores, evicts) it nor lets the others attend to the slot
        fed = torch.tensor(active, device=device)
        ids = torch.where(fed, nxt, torch.zeros_like(nxt))[:, None]
        out, mask, seen = _forward_rows(model, ids, cache, mask, seen, fed[:, None])
        logits = torch.where(fed[:, None], out.logits[:, -1], logits)
        track.update(active)
    return True


def _teacher_forced_batch(model: nn.Module, samples: Sequence, cache, mask: torch.Tensor, seen: torch.Tensor,
                          logits: torch.Tensor, outs: list[Outcome], track: _RowSizes, device) -> None:
    """`teacher_forced_nll` for every row: the continuations but their last token, left-padded, in
    one forward; row b's logits are its prompt's last and its own real positions."""
    for b, res in enumerate(outs):
        res.kept = track.row_kept(b)
    targets = [list(s.continuation_ids) for s in samples]
    fed = [t[:-1] for t in targets]
    width = max(len(t) for t in fed)
    out_logits = None
    if width:
        ids, real = left_pad(fed, device)
        out, mask, seen = _forward_rows(model, ids, cache, mask, seen, real, keep_logits=0)
        out_logits = out.logits.float()
        track.update(real.any(-1).tolist())
    for b, res in enumerate(outs):
        row = logits[b:b + 1].float()
        if out_logits is not None and fed[b]:
            row = torch.cat([row, out_logits[b, width - len(fed[b]):]], dim=0)
        tgt = torch.tensor(targets[b], device=row.device)
        res.nll = float(torch.nn.functional.cross_entropy(row, tgt, reduction="mean"))
