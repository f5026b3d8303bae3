"""Engine-level behaviour: inert until configured, refusals at startup, blocks back to the pool."""

from __future__ import annotations

import pytest
from engines import BASE, BUDGET, evict_llm, model_path, plain_llm, prompts, scheduler


def test_unconfigured_engine_is_vllms_own():
    llm = plain_llm()
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    assert type(runner).__name__ == "CPUModelRunner" and not hasattr(runner, "_evictkit")
    assert type(scheduler(llm)).__name__ == "Scheduler"
    assert not hasattr(scheduler(llm).kv_cache_manager, "evictkit_freed")


def test_refused_at_startup_with_the_setting_to_change():
    from vllm import LLM

    import evictkit_vllm

    kw = {**BASE, **evictkit_vllm.engine_kwargs("snapkv", budget=BUDGET), "enable_prefix_caching": True}
    with pytest.raises(Exception, match="enable_prefix_caching=False"):
        LLM(model=model_path(), **kw)


def test_configured_without_evictkit_classes_is_refused():
    from vllm import LLM

    kw = {**BASE, "additional_config": {"evictkit": {"policy": "snapkv", "budget": BUDGET}}}
    with pytest.raises(Exception, match="worker_cls"):
        LLM(model=model_path(), **kw)


def test_blocks_held_while_decoding_are_the_kept_ones():
    """During decoding a compacted request holds cdiv(K + generated, 128) blocks, not cdiv(P + generated, 128):
    the pool's free count after the first decode step shows it."""
    llm = evict_llm()
    mgr = scheduler(llm).kv_cache_manager
    engine = llm.llm_engine
    from vllm import SamplingParams

    free0 = mgr.block_pool.get_num_free_blocks()
    sp = SamplingParams(temperature=0, max_tokens=8, extra_args={"evictkit": {"policy": "snapkv", "budget": BUDGET}})
    engine.add_request("held-0", {"prompt_token_ids": list(prompts()[0])}, sp)
    engine.step()  # the prefill: 5 blocks of 128 for 600 tokens, compacted to 64 entries
    engine.step()  # the first decode step: the scheduler returned 4 blocks before allocating
    assert free0 - mgr.block_pool.get_num_free_blocks() == 1
    while engine.has_unfinished_requests():
        engine.step()
    assert mgr.block_pool.get_num_free_blocks() == free0


def test_abort_and_finish_leave_no_state():
    from vllm import SamplingParams

    from evictkit_vllm import plan

    llm = evict_llm()
    engine = llm.llm_engine
    mgr = scheduler(llm).kv_cache_manager
    runner = engine.model_executor.driver_worker.worker.model_runner
    free0 = mgr.block_pool.get_num_free_blocks()
    sp = SamplingParams(temperature=0, max_tokens=64, extra_args={"evictkit": {"policy": "tova", "budget": BUDGET}})
    engine.add_request("abort-0", {"prompt_token_ids": list(prompts()[1])}, sp)
    # finishes on its own (max_tokens) while abort-0 runs
    engine.add_request("finish-0", {"prompt_token_ids": list(prompts()[0])}, SamplingParams(
        temperature=0, max_tokens=2, extra_args={"evictkit": {"policy": "h2o", "budget": BUDGET}}))
    for _ in range(3):
        engine.step()
    assert any(r.startswith("abort-0") for r in runner._evictkit.requests)
    assert any(r.startswith("abort-0") for r in plan.SIDES)  # tova evicts while decoding: per-layer state
    engine.abort_request(["abort-0"])
    engine.step() if engine.has_unfinished_requests() else None
    # the worker hears of finished requests with the next scheduled step
    engine.add_request("abort-1", {"prompt_token_ids": list(prompts()[2])}, SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    assert not any(r.startswith("abort-0") for r in runner._evictkit.requests)
    assert not any(r.startswith(("abort-0", "finish-0")) for r in plan.SIDES)
    assert not runner._evictkit.pending
    assert mgr.block_pool.get_num_free_blocks() == free0


def test_forced_preemption_recompacts_the_resumed_request():
    """8 blocks of 32 tokens (9, one is vLLM's null block) for two 150-token prompts at budget 48: both
    run after compaction (2 blocks each), then grow a block every 32 tokens until the second is preempted
    (all its blocks freed); resumed after the first finishes, its prompt and generated tokens are
    prefilled again and the prompt compacted again. Then the same with a preempted request that evicts
    while decoding (engines.preemption_scenario). Invariants only: the recomputed generated tokens
    saw the whole prompt, so its later tokens may differ from an unpreempted run (docs/vllm.md).
    In a process of its own: an in-process vLLM engine that shuts down tears down the parallel state
    the module's other engines share."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = "import json, engines; print('RESULT ' + json.dumps(engines.preemption_scenario()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    prefill, decode = result["prefill"], result["decode"]
    assert prefill["lengths"] == [100, 100]
    assert sorted(prefill["compactions"]) == [1, 2]  # the preempted request was compacted again when it resumed
    assert decode["lengths"] == [150, 150]
    # B, which evicts while decoding, was preempted and compacted again to what it would hold unpreempted
    # (the backend raises when a layer holds another count than the scheduler's)
    assert decode["compactions"] == [1, 2]
    for part in (prefill, decode):
        assert part["stale"] == []  # no request, pending truncation or per-layer decode state left behind
        assert part["free_after"] == result["free_before"]


def test_engine_core_in_its_own_process():
    """vLLM's default: the engine core (scheduler and worker) in a subprocess, where vLLM loads the
    plugin itself. The tokens are transformers' with the same eviction, not those without it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json, conftest, engines\n"
            "if __name__ == '__main__':\n"
            "    print('RESULT ' + json.dumps(engines.multiprocessing_scenario()))")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"})
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    rows = json.loads(lines[-1][len("RESULT "):])["rows"]
    assert all(r["tokens"] == r["evicted"] for r in rows)
    assert any(r["evicted"] != r["full"] for r in rows)  # the eviction changed something: it ran
