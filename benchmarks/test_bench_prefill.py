"""Suite 2: what a policy costs at prefill, on SmolLM2-135M (CPU, fp32; --device and --bench-model
choose others: on a GPU, `--device cuda --bench-model small`, a random 24-layer llama in bf16).

- `test_prefill`: prefill + eviction end to end (`model(ids)` inside `evictkit.compress`) for
  every registered policy that evicts at prefill, against plain prefill without evictkit
  ("none", measured first and again last in each context group; the baseline is the faster of
  the two). `full` is the hooks with no eviction. Budget: a quarter of the prompt.
  Targets: within 1.03x of plain at 4k; ReST-KV within 1.03x of SnapKV.
- `test_restkv_indicator_matmul`: the one matmul ReST-KV's indicator cannot avoid, alone, on the
  same layer; with SnapKV's scoring beside it, it bounds how close ReST-KV's scoring can get to
  SnapKV's (the report prints both ratios).
- `test_layer_scoring`: the policy's own work for one layer (observe + select) on that layer's
  real shapes, without a prefill around it, at 1k..8k. Multiplied by the layer count it gives a
  low-noise estimate of the end-to-end overhead (the "est. ratio" column), since a 3% difference
  is below the noise of one 4k prefill on a shared machine.

Policies registered later are picked up automatically (evictkit.policies()); a policy that
refuses the budget is skipped with its reason. On CUDA every timed call ends with a device sync.
"""

from __future__ import annotations

import pytest
import torch
from benchutil import best_of, evict_one_layer, indicator_matmul_only, layer_inputs, prompt_ids, run_timed
from conftest import FLOOR_POLICY, synced

import evictkit
from evictkit.kernels import compact_many


def _budget(n: int) -> int:
    return max(64, n // 4)


def _layer_inputs(model, ids: torch.Tensor, layer_idx: int) -> dict:
    """benchutil.layer_inputs on `ids`'s device; a helper that cannot build inputs on this device
    yet (e.g. positions made on CPU for a CUDA model) skips the benchmark with its reason."""
    try:
        inputs = layer_inputs(model, ids, layer_idx)
    except RuntimeError as exc:
        if ids.device.type == "cpu" or "device" not in str(exc):
            raise
        pytest.skip(f"benchutil.layer_inputs on {ids.device}: {str(exc).splitlines()[0]}")
    return inputs


@pytest.mark.benchmark(group="prefill")
def test_prefill(benchmark, sizes, report, device, model_and_tokenizer, prefill_case):
    n, name = prefill_case
    model, tok = model_and_tokenizer
    ids = prompt_ids(tok, n).to(device)
    budget = None
    if name.startswith("none"):
        def run():
            with torch.inference_mode():
                return model(ids, use_cache=True, logits_to_keep=1)
        comp = None
    else:
        budget = _budget(n)
        try:
            comp = evictkit.compress(model, evictkit.policy(name), budget=budget)
            comp.schedule(n)  # per-layer budgets: a policy that cannot work with this model says so here
        except ValueError as exc:
            pytest.skip(f"{name} at budget {budget}: {exc}")

        def run():
            with comp, torch.inference_mode():
                return model(ids, use_cache=True, logits_to_keep=1)

    benchmark.group = f"prefill {n} tokens"
    t = run_timed(benchmark, synced(run, device), rounds=sizes.prefill_rounds.get(n, 1))
    kept = max(comp.stats.sizes()) if comp is not None and comp.stats.layers else None
    extra = {}
    if device.type == "cuda":  # one more untimed call: the memory the prefill and its eviction peak at
        torch.cuda.reset_peak_memory_stats(device)
        synced(run, device)()
        extra["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    benchmark.extra_info.update(budget=budget, kept=kept, **extra)
    report.add("prefill", n=n, policy=name, budget=budget, kept=kept,
               n_layers=model.config.num_hidden_layers, **t, **extra)


@pytest.mark.benchmark(group="layer", max_time=1.0, min_rounds=3)
def test_layer_scoring(benchmark, sizes, report, device, model_and_tokenizer, layer_case):
    n, name = layer_case
    model, tok = model_and_tokenizer
    n_layers = model.config.num_hidden_layers
    li = n_layers // 2  # a middle layer: PyramidKV-style schedules give it the average budget
    inputs = _layer_inputs(model, prompt_ids(tok, n).to(device), li)
    budget = _budget(n)
    try:
        policy = evictkit.policy(name)
        policy.check_budget(budget)
        policy.layer_budget(budget, li, n_layers, n)
    except ValueError as exc:
        pytest.skip(f"{name} at budget {budget}: {exc}")

    def score():
        with torch.inference_mode():
            return evict_one_layer(policy, inputs, n_layers, budget, compact=False)

    idx = score()
    compact_s = None
    if idx is not None:
        kv = [inputs["keys"], inputs["values"]]
        compact_s = best_of(synced(lambda: compact_many(kv, idx), device), 5)
    benchmark.group = f"layer scoring {n} tokens"
    t = run_timed(benchmark, synced(score, device))
    benchmark.extra_info.update(compact_s=compact_s)
    report.add("layer", n=n, policy=name, budget=budget, compact_s=compact_s, **t)


@pytest.mark.benchmark(group="layer", max_time=1.0, min_rounds=3)
def test_restkv_indicator_matmul(benchmark, sizes, report, device, model_and_tokenizer, layer_n):
    """The `H_q P d^2` matmul of ReST-KV's reconstruction indicator alone
    (`benchutil.indicator_matmul_only`), on the middle layer's real values and o_proj."""
    from evictkit.plugins import _restkv_math as M

    n = layer_n
    model, tok = model_and_tokenizer
    inputs = _layer_inputs(model, prompt_ids(tok, n).to(device), model.config.num_hidden_layers // 2)
    gram = M.head_grams(inputs["module"].o_proj.weight.detach(), model.config.num_attention_heads)
    matmul_only = indicator_matmul_only(inputs["values"].float(), gram, window=32)

    def timed():
        with torch.inference_mode():
            matmul_only()

    benchmark.group = f"layer scoring {n} tokens"
    t = run_timed(benchmark, synced(timed, device))
    report.add("layer", n=n, policy=FLOOR_POLICY, budget=None, compact_s=None, **t)
