"""Suite 9: prefill attention per method, one layer of SmolLM2's attention shape (issue 25).

The attention of one prefill forward (q = S tokens, H_q 9, H_kv 3, D 64, fp32, batch 1) under each
registered built-in: dense (torch's SDPA, is_causal: the kernel the model's own sdpa runs) against
the sparse methods through evictkit's executor ("auto": torch on the CPU, FlexAttention compiled to
Triton on CUDA, untimed warm-up call first). Inputs: one real layer's keys from SmolLM2 on
real text (benchutil.layer_inputs), queries re-projected from the same hidden states. Each record
holds the method's density (extra_info), so time and computed fraction sit side by side. The end-to-end TTFT
at 8k/16k is benchmarks/sparse_prefill.py's (minutes per cell on 2 cores), reported in
docs/benchmarks.md. Runs with --bench-threads torch threads (default 1: on the shared 2-core machine
a second thread stalls the executor's many small parallel regions). Nothing here asserts a timing.
"""

from __future__ import annotations

import sys

import pytest
import torch
from benchutil import layer_inputs, prompt_ids, run_timed

from evictkit.registry import build_prefill_attention

METHODS = (("dense", {}), ("a_shape", {}), ("tri_shape", {}), ("vertical_slash", {}),
           ("vertical_slash", {"vertical_size": 100, "slash_size": 800}), ("xattention", {}))
LENGTHS = (4096, 8192)
QUICK_LENGTHS = (256,)


def pytest_generate_tests(metafunc):
    if "sparse_case" in metafunc.fixturenames:
        lengths = QUICK_LENGTHS if metafunc.config.getoption("quick") else LENGTHS
        cases = [(n, name, params) for n in lengths for name, params in METHODS]
        metafunc.parametrize("sparse_case", cases, ids=[
            f"{n}-{name}" + "".join(f"-{k}{v}" for k, v in p.items()) for n, name, p in cases])


@pytest.mark.benchmark(group="sparse prefill", max_time=1.0, min_rounds=1)
def test_prefill_attention(benchmark, model_and_tokenizer, sparse_case, bench_threads):
    n, name, params = sparse_case
    model, tok = model_and_tokenizer
    inputs = layer_inputs(model, prompt_ids(tok, n).to(model.device), layer_idx=model.config.num_hidden_layers // 2)
    module = inputs["module"]
    with torch.inference_mode():
        B, T, _ = inputs["hidden_states"].shape
        query = module.q_proj(inputs["hidden_states"]).view(B, T, -1, module.head_dim).transpose(1, 2)
        cos, sin = inputs["position_embeddings"]
        query, _ = sys.modules[type(module).__module__].apply_rotary_pos_emb(query, query, cos, sin)
    method = build_prefill_attention(name, **params)
    res = {}

    def run():
        with torch.inference_mode():
            res["out"] = method.attend(query, inputs["keys"], inputs["values"], scale=module.scaling)

    benchmark.group = f"sparse prefill attention {n} tokens"
    # on CUDA a pattern runs compiled FlexAttention: its first call compiles, so it is not timed
    run_timed(benchmark, run, rounds=1, warmup=1 if query.is_cuda else 0)
    # pytest-benchmark's table and --benchmark-json carry it (the conftest report has fixed suites)
    benchmark.extra_info.update(method=name, params=params, density=res["out"].density)
