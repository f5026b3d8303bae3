"""evictkit's eviction policies inside vLLM (docs/vllm.md).

    from vllm import LLM
    import evictkit_vllm
    llm = LLM(model=path, **evictkit_vllm.engine_kwargs("snapkv", budget=256, window=32))

`register()` is vLLM's `vllm.general_plugins` entry point. It only points vLLM's CPU attention
backend at a subclass that behaves exactly like vLLM's own until an evictkit worker hands it a
compaction plan; nothing else changes until an engine is configured: `additional_config=
{"evictkit": {...}}` (or the EVICTKIT_VLLM_* environment variables) together with evictkit's
worker and scheduler classes, which `engine_kwargs` fills in.
"""

from __future__ import annotations

from typing import Any

from evictkit_vllm.config import (
    ENV_BUDGET,
    ENV_PARAMS,
    ENV_PHASE,
    ENV_POLICY,
    ENV_SLACK,
    VLLM_VERSION,
    EvictConfig,
    check_vllm_version,
)

__all__ = ["ENV_BUDGET", "ENV_PARAMS", "ENV_PHASE", "ENV_POLICY", "ENV_SLACK", "VLLM_VERSION", "EvictConfig",
           "engine_kwargs", "register"]

WORKER_CLS = "evictkit_vllm.worker.EvictkitCPUWorker"
SCHEDULER_CLS = "evictkit_vllm.scheduler.EvictkitScheduler"

_registered = False


def register() -> None:
    """vLLM's plugin hook, called in every vLLM process: cheap, idempotent, no model work.

    On a vLLM other than the pinned release it registers nothing (an engine configured for evictkit
    then fails at startup, naming the versions); vLLM without evictkit configured is unaffected.
    """
    global _registered
    if _registered:
        return
    try:
        check_vllm_version()
    except RuntimeError:
        return  # fail closed: configured engines raise in EvictkitCPUWorker / EvictkitScheduler
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "evictkit_vllm.backend.EvictkitCPUAttentionBackend")
    _registered = True


def engine_kwargs(policy: str, budget: int | float, *, phase: str | None = None, slack: int = 0,
                  **params: Any) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` / `EngineArgs(...)` that run `policy` at `budget`.

    phase and slack mean what they mean in `evictkit.compress`: phase "prefill", "decode" or
    "both" (None: the policy's own phases); while decoding, a layer evicts back to its budget when
    it holds more than budget + slack. The policy and parameters are validated now (unknown names
    and bad values raise ValueError); the engine settings evictkit needs are included (prefix
    caching and chunked prefill off, eager mode). Merge your own settings in, but keep these.
    """
    EvictConfig(policy, budget, dict(params), phase=phase, slack=slack).build()  # validates
    section = {"policy": policy, "budget": budget, "params": dict(params)}
    if phase is not None:
        section["phase"] = phase
    if slack:
        section["slack"] = slack
    return {
        "additional_config": {"evictkit": section},
        "worker_cls": WORKER_CLS,
        "scheduler_cls": SCHEDULER_CLS,
        "enable_prefix_caching": False,
        "enable_chunked_prefill": False,
        "enforce_eager": True,
    }
