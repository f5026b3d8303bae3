"""evictkit's scheduler: vLLM's `Scheduler` whose KV cache manager returns evicted blocks.

Selected per engine with `scheduler_cls="evictkit_vllm.scheduler.EvictkitScheduler"`. Without an
evictkit configuration it is vLLM's scheduler unchanged. Otherwise its `KVCacheManager`'s class is
swapped for a subclass overriding one private method of vLLM 0.32, `allocate_slots`: once a
request's prompt has been prefilled (`num_computed_tokens` = n >= `num_prompt_tokens`), the
request holds S(n) entries (EvictConfig.stored: K after a prefill eviction, growing by one per
decode step and back to K past K + slack while decoding); it frees the tail blocks past
cdiv(S(n), block_size), then allocates as vLLM does with `num_computed_tokens` lowered by n - S(n)
around the call, so every block count is in compacted space. Stateless: S(n) follows from the
request and the configuration, the same number the worker computes and the attention backend
checks; a preempted request (num_computed_tokens back to 0) allocates its recomputation in full
and is compacted again to S(n). Why a private method: the
scheduler side has no public seam (vLLM warns that the scheduler interface is not public).
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from evictkit_vllm import SCHEDULER_CLS, WORKER_CLS
from evictkit_vllm.checks import Unsupported, check_engine
from evictkit_vllm.config import EvictConfig, config_of, request_config


class EvictkitScheduler(Scheduler):
    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        cfg = config_of(vllm_config)
        if cfg is None:
            return  # inert
        check_engine(vllm_config, cfg, worker_cls=WORKER_CLS, scheduler_cls=SCHEDULER_CLS)
        if len(self.kv_cache_config.kv_cache_groups) != 1:
            raise Unsupported("evictkit: the model has several KV-cache groups (a hybrid model): use a model whose "
                              "layers share one full-attention KV cache")
        mgr = self.kv_cache_manager
        mgr.__class__ = type(f"Evictkit{type(mgr).__name__}", (_ManagerMixin, type(mgr)), {})
        mgr._evictkit = cfg  # type: ignore[attr-defined]
        mgr.evictkit_freed_blocks = 0  # type: ignore[attr-defined]  # blocks freed by eviction, all requests
        mgr.evictkit_freed = {}  # type: ignore[attr-defined]  # with record_kept: {request_id: blocks freed}


class _ManagerMixin:
    _evictkit: EvictConfig
    evictkit_freed_blocks: int
    evictkit_freed: dict[str, int]

    def allocate_slots(self, request: Any, num_new_tokens: int, *args: Any, **kwargs: Any) -> Any:
        prompt = request.num_prompt_tokens
        if request.num_computed_tokens < prompt:
            return super().allocate_slots(request, num_new_tokens, *args, **kwargs)  # type: ignore[misc]
        cfg = request_config(self._evictkit, request.sampling_params)
        done = request.num_computed_tokens
        delta = 0 if cfg is None else done - cfg.stored(prompt, done)
        if delta <= 0:
            return super().allocate_slots(request, num_new_tokens, *args, **kwargs)  # type: ignore[misc]
        self._release(request, request.num_computed_tokens - delta)
        request.num_computed_tokens -= delta
        try:
            return super().allocate_slots(request, num_new_tokens, *args, **kwargs)  # type: ignore[misc]
        finally:
            request.num_computed_tokens += delta

    def _release(self, request: Any, stored: int) -> None:
        """Free the request's blocks past the `stored` compacted entries (tail first)."""
        rid = request.request_id
        for mgr in self.coordinator.single_type_managers:  # type: ignore[attr-defined]
            blocks = mgr.req_to_blocks.get(rid)
            keep = -(-stored // mgr.block_size)
            if blocks and len(blocks) > keep:
                tail = blocks[keep:]
                del blocks[keep:]
                self.block_pool.free_blocks(reversed(tail))  # type: ignore[attr-defined]
                self.evictkit_freed_blocks += len(tail)
                if self._evictkit.record_kept:  # tests only: a server must not keep per-request entries
                    self.evictkit_freed[rid] = self.evictkit_freed.get(rid, 0) + len(tail)
