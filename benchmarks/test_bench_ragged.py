"""Suite 8: AdaKV's per-head budgets stored ragged (one length per KV head, varlen attention)
against the padded layout (every head left-padded to the longest one, per-head masks).

A prompt of `decode_ctx` tokens (4k; --quick: small) is prefilled under adakv at budget 256 in
each layout; recorded: the K/V bytes after prefill against the ideal `layers x H_kv x budget x
head_dim x 2 x dtype` (issue 15's target: <= 1.02x ragged; the padded layout holds the longest
head's length in every head), and the decode ms/token of both layouts, paired step by step
(padded, varlen, padded, ...) so the ratio survives the machine's load drifting.
"""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from benchutil import prompt_ids
from conftest import sync

import evictkit
from evictkit.eval.engine import cache_bytes
from evictkit.hf import cache_kwarg, cache_of

BUDGET = 256


@pytest.mark.benchmark(group="ragged")
def test_ragged_vs_padded(benchmark, sizes, device, model_and_tokenizer):
    model, tok = model_and_tokenizer
    ctx = sizes.decode_ctx
    ids = prompt_ids(tok, ctx).to(device)
    kw = cache_kwarg(model)
    runs = {}
    for layout in ("padded", "varlen"):
        comp = evictkit.compress(model, "adakv", budget=min(BUDGET, ctx // 4), ragged_layout=layout)
        with comp, torch.inference_mode():
            out = model(ids, use_cache=True, logits_to_keep=1)
        # held is measured inside the block (the cache leaves it in the padded layout again)
        runs[layout] = {"comp": comp, "cache": cache_of(out), "tok": out.logits[:, -1:].argmax(-1),
                        "times": []}
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    budget = min(BUDGET, ctx // 4)
    head_dim = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    itemsize = next(model.parameters()).element_size()
    ideal = cfg.num_hidden_layers * cfg.num_key_value_heads * budget * head_dim * 2 * itemsize

    def steps(layout: str, n: int) -> None:
        """n decode steps inside one block; the first (which lays the cache out again) is not timed."""
        st = runs[layout]
        with st["comp"], torch.inference_mode():
            for i in range(n + 1):
                sync(device)
                t0 = time.perf_counter()
                o = model(st["tok"], use_cache=True, **{kw: st["cache"]})
                sync(device)
                if i:
                    st["times"].append(time.perf_counter() - t0)
                st["tok"] = o.logits[:, -1:].argmax(-1)
            st["held"] = cache_bytes(st["cache"])

    for _ in range(max(2, sizes.decode_steps // 4)):  # alternate blocks of 4: paired against load drift
        steps("padded", 4)
        steps("varlen", 4)
    benchmark.pedantic(lambda: steps("varlen", 1), rounds=1, iterations=1)
    pad_ms = statistics.median(runs["padded"]["times"]) * 1e3
    var_ms = statistics.median(runs["varlen"]["times"]) * 1e3
    steps_in = len(runs["varlen"]["times"]) + (max(2, sizes.decode_steps // 4) + 1)
    held = {k: runs[k]["held"] - steps_in * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
            * next(model.parameters()).element_size() for k in runs}  # minus the decoded tokens: prefill bytes
    benchmark.extra_info.update(ctx=ctx, budget=budget, ideal_bytes=ideal, padded_bytes=held["padded"],
                                varlen_bytes=held["varlen"], padded_ms=pad_ms, varlen_ms=var_ms)
    print(f"\nadakv budget {budget} after a {ctx}-token prompt: K/V bytes of the prompt padded "
          f"{held['padded'] / ideal:.3f}x, varlen {held['varlen'] / ideal:.3f}x of the ideal {ideal / 2**20:.2f} MiB; "
          f"decode ms/token padded {pad_ms:.2f}, varlen {var_ms:.2f} (ratio {var_ms / pad_ms:.2f})")
    assert held["varlen"] <= held["padded"]
