"""An lm-evaluation-harness model backend: lm-eval's own HF backend with an evictkit policy active.

    evictkit lm-eval --model evictkit --device cpu --tasks boolq \\
        --model_args pretrained=smollm2,policy=snapkv,budget=256,window=16

Importing this module registers the backend with lm-eval's registry as "evictkit" (lm-eval
0.4.x finds backends nowhere else; `evictkit lm-eval` imports it, and an lm-eval that reads
the `lm_eval.models` entry-point group finds it through evictkit's entry point).

Model arguments: everything lm-eval's `hf` backend takes, plus
    policy   a registered policy name (`evictkit list`), required
    budget   entries per layer per KV head (int >= 1) or a fraction of the prompt (float in
             (0, 1]; note that `budget=1` is one entry and `budget=1.0` the whole prompt), required
    phase    prefill, decode or both (default: the policy's own phases)
    slack    decode-time slack (default 0)
    chunk    scored tokens fed per forward after the context prefill (default 0: all at once)
    any parameter of the policy, e.g. `window=16` for snapkv.
`pretrained` is a local Hugging Face directory, a hub id, or an evictkit built-in model name
(`smollm2`, `gemma3-270m`, loaded with `evictkit.load_model`).

How eviction meets each request type (every request is a fresh sequence: one
`evictkit.compress` block per model call):
- generate_until: `generate()` runs under the policy; the prompt is compressed after prefill
  and decoding evicts as in `evictkit generate`.
- loglikelihood: a single forward pass would score the continuation at full attention (prefill
  evicts only after each layer has attended). So the context is prefilled first, then the
  scored tokens (the context's last token and the continuation minus its last token) are fed
  over the compressed cache as decode steps, in one forward or `chunk` tokens at a time. When
  every layer's budget already holds the whole input, nothing can be evicted and one forward
  runs, exactly as lm-eval's `hf` backend does.
- loglikelihood_rolling: its windows have a one-token context, so the first `chunk` tokens are
  the prefill and the rest are fed `chunk` at a time as decode steps (decode-phase policies evict
  as the text goes on); with `chunk=0` a window is one forward and eviction cannot change its score.

Batches (`batch_size=N`, an int; `auto` is refused): every row of a batch gets what its request
gets alone (evictkit's batch law), so scores equal batch 1's up to the rounding of padded batched
matmuls. lm-eval pads its loglikelihood inputs on the right; the backend feeds them to the model
left-padded instead: every row's context in one left-padded prefill, then each row's scored
tokens (or its next `chunk` of them) as one left-padded decode forward, a row with nothing left
fed as padding (not stepped). A row whose whole input fits its budget is prefilled whole, as its
single forward runs alone. generate_until decodes lm-eval's left-padded batch greedily itself
(`generate()`'s tokens, with lm-eval's own stop criteria judged per row) and feeds a row that has
finished as padding, so the core stops scoring and evicting it; sampling, or a generation config
with a logits processor, goes through `generate()`, where finished rows decode on to the last.
`last_stats` and `cache_summary()` count one call per batch (the core's layers, whose length is the
longest row's).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch

import evictkit
from evictkit import CompressionStats, Policy, params_of
from evictkit.budget import check_budget
from evictkit.compress import PHASE_CHOICES
from evictkit.hf import attention_modules, cache_arg, new_cache
from evictkit.models import MODELS
from evictkit.sequence import schedule_for

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError(f"evictkit's lm-eval backend needs lm-eval ({exc}): pip install 'evictkit[lm-eval]'") from exc

__all__ = ["EvictkitLM", "split_model_args"]

_HF_ARGS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}
# HFLM forwards unknown keyword arguments to from_pretrained; these few are passed on, any
# other unknown name is taken for a policy parameter so that a typo is refused before loading.
_HF_LOAD_ARGS = frozenset({"attn_implementation", "low_cpu_mem_usage", "load_in_8bit", "load_in_4bit"})
# generation-config fields that add a logits processor or stopping rule to greedy `generate()`;
# when the model's config sets any, batched generation goes through `generate()` itself
_PROCESSOR_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "min_new_tokens", "suppress_tokens", "begin_suppress_tokens", "forced_bos_token_id",
                     "forced_eos_token_id", "sequence_bias", "exponential_decay_length_penalty", "renormalize_logits",
                     "stop_strings", "max_time", "num_beams", "penalty_alpha", "low_memory", "guidance_scale",
                     "epsilon_cutoff", "eta_cutoff")


def split_model_args(policy: object, kwargs: dict[str, Any]) -> tuple[Policy, dict[str, Any]]:
    """Build the policy from the model arguments; return it and the arguments meant for HFLM.

    A name that is a parameter of the policy goes to the policy (also where HFLM has an argument
    of the same name); HFLM's arguments and a few from_pretrained ones go to HFLM; anything else
    is refused as an unknown policy parameter. Raises ValueError naming the argument.
    """
    if not isinstance(policy, str) or not policy:
        raise ValueError(
            f"policy={policy!r}: give a registered policy name in the model arguments, e.g. policy=snapkv "
            f"(registered: {', '.join(evictkit.policies())})"
        )
    cls = evictkit.policies().get(policy)
    fields = params_of(cls) if cls is not None else {}
    params = {k: v for k, v in kwargs.items() if k in fields or (k not in _HF_ARGS and k not in _HF_LOAD_ARGS)}
    rest = {k: v for k, v in kwargs.items() if k not in params}
    return evictkit.policy(policy, **params), rest


def _check_settings(policy: Policy, budget: object, phase: object, slack: object, chunk: object) -> int | float:
    """Validate budget, phase, slack and chunk the way evictkit.compress will (before any loading)."""
    if budget is None:
        raise ValueError("budget is required in the model arguments, e.g. budget=256 (entries per layer per KV head)")
    budget = check_budget(budget)
    if isinstance(budget, int):
        policy.check_budget(budget)
    if phase is not None and phase not in PHASE_CHOICES:
        raise ValueError(f"phase={phase!r}: must be one of {', '.join(PHASE_CHOICES)} (or unset for the policy's own)")
    for name, value in (("slack", slack), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: must be an int >= 0")
    return budget


def _check_batch_size(batch_size: object) -> int:
    """lm-eval passes the batch size as an int or a string; "auto" probes memory with batches this
    backend would not run as they come, so it is refused."""
    text = str(batch_size)
    if isinstance(batch_size, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"batch_size={batch_size!r}: give an int >= 1 (rows per left-padded batch); "
                         "'auto' is not supported by the evictkit backend")
    return int(text)


@register_model("evictkit")
class EvictkitLM(HFLM):
    """lm-eval's HF backend with `evictkit.compress(model, policy, budget, ...)` around every
    forward and generate call. `last_stats` holds the last call's CompressionStats and
    `cache_summary()` the largest cache sizes seen over all calls (also in the results' config)."""

    def __init__(
        self,
        pretrained: Any,
        policy: str | None = None,
        budget: int | float | None = None,
        phase: str | None = None,
        slack: int = 0,
        chunk: int = 0,
        batch_size: int | str | None = 1,
        **kwargs: Any,
    ) -> None:
        # everything is validated before the model is loaded
        self._policy, kwargs = split_model_args(policy, kwargs)
        self._budget = _check_settings(self._policy, budget, phase, slack, chunk)
        self._phase, self._slack, self._chunk = phase, slack, chunk
        self._batch = _check_batch_size(batch_size)
        self._builtin = pretrained if isinstance(pretrained, str) and pretrained in MODELS else None
        if self._builtin:
            pretrained, kwargs = self._load_builtin(self._builtin, kwargs)
        self._scored: dict[tuple[int, ...], int] = {}
        self.last_stats: CompressionStats | None = None
        self._tally = {"calls": 0, "calls_with_eviction": 0, "max_prompt": 0, "max_after_prefill": 0, "max_peak": 0}
        super().__init__(pretrained=pretrained, batch_size=self._batch, **kwargs)
        if self.backend != "causal":
            raise ValueError(f"the evictkit backend needs a decoder-only (causal) model, got backend={self.backend!r}")
        attention_modules(self.model)  # a model evictkit cannot hook fails here, not at the first request

    @staticmethod
    def _load_builtin(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
        """Load an evictkit built-in model (and its tokenizer, unless one is given) on the device."""
        dtype = kwargs.pop("dtype", "auto")
        model, tok = evictkit.load_model(name, dtype=None if dtype in (None, "auto") else getattr(torch, str(dtype)))
        device = kwargs.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs.setdefault("tokenizer", tok)
        return model.to(device), kwargs

    # --- the settings, in lm-eval's results ------------------------------------------------------
    def evictkit_config(self) -> dict[str, Any]:
        """Policy, budget and options of this backend (written to results["config"]["evictkit"])."""
        return {
            "version": evictkit.__version__,
            "policy": self._policy.name,
            "budget": self._budget,
            "policy_params": {name: getattr(self._policy, name) for name in params_of(type(self._policy))},
            "phase": self._phase or "+".join(self._policy.phases) or "none",
            "slack": self._slack,
            "chunk": self._chunk,
            "batch_size": self._batch,
            "cache": self.cache_summary(),
        }

    def get_model_info(self) -> dict:
        if self._builtin:  # no hub id to look up a revision for
            info = {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self.model.dtype),
                    "model_revision": f"evictkit built-in {self._builtin}", "model_sha": ""}
        else:
            info = super().get_model_info()
        return {**info, "evictkit": self.evictkit_config()}

    def cache_summary(self) -> dict[str, int]:
        """Over all calls so far: how many ran, how many evicted, and the largest prompt, size after
        prefill and size after any forward (entries per layer per KV head)."""
        return dict(self._tally)

    def _record(self, stats: CompressionStats) -> None:
        self.last_stats = stats
        t = self._tally
        t["calls"] += 1
        t["calls_with_eviction"] += any(s.evictions for s in stats.layers)
        for s in stats.layers:
            t["max_prompt"] = max(t["max_prompt"], s.prompt_length)
            t["max_after_prefill"] = max(t["max_after_prefill"], s.after_prefill)
            t["max_peak"] = max(t["max_peak"], s.peak)

    def _compression(self) -> evictkit.Compression:
        return evictkit.compress(self.model, self._policy, self._budget, phase=self._phase, slack=self._slack)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    # --- the wrapped calls -----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # _model_call sees only the input ids; remember how many trailing positions each input has
        # scored, so that it can prefill the context and feed the scored part over the compressed cache.
        # Inputs shared by several requests (lm-eval's one-token-continuation grouping) take the
        # longest continuation, the request lm-eval runs for the group.
        window = self.max_length + 1
        scored: dict[tuple[int, ...], int] = {}
        for _, context, continuation in requests:
            key = tuple((context + continuation)[-window:][:-1])
            scored[key] = max(scored.get(key, 0), len(continuation))
        self._scored = scored
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._scored = {}

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
        if inps.shape[0] != 1:
            return self._batch_call(inps)
        total = inps.shape[1]
        scored = min(self._scored.get(tuple(inps[0].tolist()), 0), total)
        first, step = self._plan(total, scored)
        with self._compression() as run:
            if first >= total:
                # nothing to split, or nothing can be evicted: the very forward lm-eval's hf backend runs
                logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            else:
                logits = self._split_forward(run, inps, first, step)
        self._record(run.stats)
        return logits

    def _plan(self, total: int, scored: int) -> tuple[int, int]:
        """(prefill length, scored tokens per later forward) of one input of `total` tokens whose
        last `scored` are scored; prefill == total: one forward (nothing to split, or nothing can
        be evicted, as every layer's budget holds the whole input)."""
        step = self._chunk or scored or total
        first = total - scored or min(step, total)  # the prefill: the context, or a first chunk
        if first >= total or min(schedule_for(self.model, self._policy, self._budget, first)) >= total:
            return total, step
        return first, step

    def _split_forward(self, run: evictkit.Compression, inps: torch.Tensor, first: int, step: int) -> torch.Tensor:
        """Prefill inps[:, :first], then feed the rest `step` tokens at a time over the cache as
        decode steps (evictkit.compress gives the new tokens their true positions)."""
        kwargs = {**cache_arg(self.model, new_cache(self.model)), "use_cache": True}
        # Where evictkit.compress takes a multi-token continuation for a prefill chunk, `as_decode`
        # makes it a decode step: the scored tokens are not compressed with the context.
        as_decode = getattr(run, "as_decode", contextlib.nullcontext)
        with torch.no_grad(), self._autocast():
            parts = [self.model(inps[:, :first], **kwargs).logits]
            with as_decode():
                for start in range(first, inps.shape[1], step):
                    parts.append(self.model(inps[:, start : start + step], **kwargs).logits)
        return torch.cat(parts, dim=1)

    def _row_length(self, row: torch.Tensor) -> int:
        """Real tokens of a row of lm-eval's right-padded (zeros) batch: the longest prefix that is
        an input of this call's requests, with nothing but padding after it."""
        tokens = row.tolist()
        for n in range(len(tokens), 0, -1):
            if tuple(tokens[:n]) in self._scored:
                return n
            if tokens[n - 1] != 0:
                break
        raise ValueError("the evictkit backend found a batched input that is none of this call's requests")

    def _batch_call(self, inps: torch.Tensor) -> torch.Tensor:
        """`_model_call` on lm-eval's right-padded batch, run as a left-padded one: every row's
        prefill in one forward, then its scored tokens (`step` at a time) in shared forwards, each
        row's part left-padded; logits [B, T, V] back in lm-eval's right-padded layout."""
        B, T = inps.shape
        rows = []  # (real tokens, prefill length, step) per row
        for b in range(B):
            n = self._row_length(inps[b])
            first, step = self._plan(n, min(self._scored[tuple(inps[b, :n].tolist())], n))
            rows.append((n, first, step))
        device = inps.device

        def padded(parts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
            width = max(len(p) for p in parts)
            ids = torch.zeros(B, width, dtype=torch.long, device=device)
            real = torch.zeros(B, width, dtype=torch.long, device=device)
            for b, p in enumerate(parts):
                if p:
                    ids[b, width - len(p):] = torch.tensor(p, device=device)
                    real[b, width - len(p):] = 1
            return ids, real

        tokens = [inps[b, :n].tolist() for b, (n, _, _) in enumerate(rows)]
        chunks = [[t[s:s + step] for s in range(first, n, step)] for t, (n, first, step) in zip(tokens, rows)]
        logits: torch.Tensor | None = None
        kwargs = {**cache_arg(self.model, new_cache(self.model)), "use_cache": True}
        with self._compression() as run, torch.no_grad(), self._autocast():
            ids, mask = padded([t[:first] for t, (_, first, _) in zip(tokens, rows)])
            out = self.model(ids, attention_mask=mask, **kwargs).logits
            logits = out.new_zeros(B, T, out.shape[-1])
            for b, (_, first, _) in enumerate(rows):
                logits[b, :first] = out[b, out.shape[1] - first:]
            filled = [first for _, first, _ in rows]
            with run.as_decode():
                for k in range(max(len(c) for c in chunks)):
                    ids, real = padded([c[k] if k < len(c) else [] for c in chunks])
                    mask = torch.cat([mask, real], dim=1)
                    out = self.model(ids, attention_mask=mask, **kwargs).logits
                    for b, c in enumerate(chunks):
                        if k < len(c):
                            logits[b, filled[b]:filled[b] + len(c[k])] = out[b, out.shape[1] - len(c[k]):]
                            filled[b] += len(c[k])
        self._record(run.stats)
        return logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs):
        mask = generation_kwargs.get("attention_mask")
        with self._compression() as run:
            if context.shape[0] > 1 and self._greedy(generation_kwargs):
                out = self._greedy_rows(context, mask, max_length, stop)
            else:
                out = super()._model_generate(context, max_length, stop, **generation_kwargs)
        self._record(run.stats)
        return out

    def _greedy(self, generation_kwargs: dict[str, Any]) -> bool:
        """Whether `generate()` would decode greedily with nothing but lm-eval's stop criteria: no
        sampling, no other generation argument, and no logits processor in the model's own
        generation config (then `_greedy_rows` gives its tokens)."""
        rest = {k: v for k, v in generation_kwargs.items() if k not in ("attention_mask", "temperature", "do_sample")}
        if rest or generation_kwargs.get("do_sample") or generation_kwargs.get("temperature", 0.0) not in (0, 0.0):
            return False
        config = self.model.generation_config
        defaults = type(config)()
        return all(getattr(config, name, None) == getattr(defaults, name, None) for name in _PROCESSOR_FIELDS)

    def _greedy_rows(self, context: torch.Tensor, mask: torch.Tensor | None, max_length: int,
                     stop: list[str]) -> torch.Tensor:
        """Greedy decoding of a left-padded batch in which a row that has finished (its end-of-text
        token, or one of lm-eval's stop sequences, judged by lm-eval's own criteria) is fed as
        padding from then on: the core no longer scores or evicts it, and every other row gets the
        tokens `generate()` gives it. Returns [B, context + steps] ids, pad after a row's end."""
        from lm_eval.models.utils_hf import stop_sequences_criteria

        B, n = context.shape
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        criteria = stop_sequences_criteria(self.tokenizer, stop, n, B)
        mask = torch.ones_like(context) if mask is None else mask.to(context.device)
        kwargs = {**cache_arg(self.model, new_cache(self.model)), "use_cache": True}
        done = torch.zeros(B, dtype=torch.bool, device=context.device)
        ids = context
        with torch.no_grad(), self._autocast():
            logits = self.model(context, attention_mask=mask, **kwargs).logits[:, -1]
            for _ in range(max(max_length - n, 0)):
                token = torch.where(done, pad, logits.argmax(-1))
                ids = torch.cat([ids, token[:, None]], dim=1)
                finished = done.clone()
                for b in range(B):
                    finished[b] |= int(token[b]) in eos_ids
                for criterion in criteria:
                    criterion(ids, None)
                    finished |= torch.tensor(criterion.done_tracker, device=done.device)
                done = finished
                if bool(done.all()) or ids.shape[1] >= max_length:
                    break
                mask = torch.cat([mask, (~done).long()[:, None]], dim=1)  # a finished row is padding
                logits = self.model(token[:, None], attention_mask=mask, **kwargs).logits[:, -1]
        return ids
