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
