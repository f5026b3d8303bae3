"""Suite 3: decoding after eviction, on SmolLM2-135M (CPU, fp32; --device and --bench-model choose
others, see suite 2).

A 4k-token prompt is prefilled (untimed) under each decode-phase policy
(streaming_llm, h2o, tova, lacache: whatever is registered with a "decode" phase, plus ReST-KV
forced to evict at decode too, `phase="both"`, with its carried and its window decode modes) at budgets 128
and 512 with slack 0 (evict every step, as the papers) and 16 (evict once the cache is 16 over
budget: amortised compaction), and once with the full cache for the whole module. Then
single-token decode steps are timed, each continuing its sequence; before each step one step on
the full cache is timed too, so "vs full" is a paired ratio that survives the machine's load
drifting between tests. Recorded: ms per token (median, and mean, which carries the amortised evictions
of slack > 0), the K/V bytes after prefill and their peak after any step (bytes of every layer's
K and V tensors; the transient +1 entry inside a step is not counted), and the bytes saved
against the full cache. Process memory is not measured on CPU: the K/V bytes are what eviction
changes. On CUDA every timed step ends with a device sync.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import pytest
import torch
from benchutil import prompt_ids, run_timed
from conftest import DECODE_VARIANTS, sync, synced

import evictkit
from evictkit.eval.engine import cache_bytes
from evictkit.hf import cache_kwarg, cache_of


@pytest.fixture(scope="module")
def full_cache(sizes, device, model_and_tokenizer):
    """The prompt prefilled once with the full cache (no evictkit): every test times one step on it
    before each of its own steps, so its ratio to the full cache is paired round by round."""
    model, tok = model_and_tokenizer
    with torch.inference_mode():
        out = model(prompt_ids(tok, sizes.decode_ctx).to(device), use_cache=True, logits_to_keep=1)
    return {"cache": cache_of(out), "tok": out.logits[:, -1:].argmax(-1)}


@pytest.mark.benchmark(group="decode")
def test_decode(benchmark, sizes, report, device, model_and_tokenizer, full_cache, decode_case):
    name, budget, slack = decode_case
    model, tok = model_and_tokenizer
    ids = prompt_ids(tok, sizes.decode_ctx).to(device)
    if name == "full":
        comp = None
    else:
        base, params, options = DECODE_VARIANTS.get(name, (name, {}, {}))
        try:
            comp = evictkit.compress(model, evictkit.policy(base, **params), budget=budget, slack=slack, **options)
            comp.schedule(sizes.decode_ctx)
        except ValueError as exc:
            pytest.skip(f"{name} at budget {budget}: {exc}")
    kw = cache_kwarg(model)

    def step_on(st: dict) -> None:
        with torch.inference_mode():
            o = model(st["tok"], use_cache=True, **{kw: st["cache"]})
        st["tok"] = o.logits[:, -1:].argmax(-1)

    with comp if comp is not None else contextlib.nullcontext(), torch.inference_mode():
        out = model(ids, use_cache=True, logits_to_keep=1)
    mine = {"cache": cache_of(out), "tok": out.logits[:, -1:].argmax(-1)}
    prefill_bytes = peak = cache_bytes(mine["cache"])
    paired: list[float] = []

    def setup():
        # one full-cache step, timed here (pytest-benchmark does not time setup), then this case's hooks on
        sync(device)
        t0 = time.perf_counter()
        step_on(full_cache)
        sync(device)
        paired.append(time.perf_counter() - t0)
        if comp is not None:
            comp.__enter__()

    def teardown():
        nonlocal peak
        if comp is not None:
            comp.__exit__(None, None, None)
        peak = max(peak, cache_bytes(mine["cache"]))

    benchmark.group = f"decode after a {sizes.decode_ctx}-token prompt"
    t = run_timed(benchmark, synced(lambda: step_on(mine), device), rounds=sizes.decode_steps,
                  warmup=min(2, sizes.decode_steps), setup=setup, teardown=teardown)
    full_median = statistics.median(paired[-t["rounds"]:])
    benchmark.extra_info.update(prefill_bytes=prefill_bytes, peak_bytes=peak, full_step_s=full_median)
    report.add("decode", policy=name, budget=budget, slack=slack, ctx=sizes.decode_ctx, prefill_bytes=prefill_bytes,
               peak_bytes=peak, full_median=full_median, **t)
