"""Startup refusals: every engine setting and policy evictkit_vllm does not support fails the
engine's start with the setting's name and what to change (docs/vllm.md, "Supported")."""

from __future__ import annotations

from typing import Any

import torch

from evictkit_vllm.config import EvictConfig, check_vllm_version


class Unsupported(ValueError):
    """An engine setting or policy evictkit_vllm refuses."""


def check_engine(vllm_config: Any, cfg: EvictConfig, *, worker_cls: str, scheduler_cls: str) -> None:
    """Raise `Unsupported` (or RuntimeError for the vLLM version) naming everything to change."""
    check_vllm_version()
    problems = [*_engine_problems(vllm_config, worker_cls, scheduler_cls), *policy_problems(cfg, vllm_config)]
    if problems:
        raise Unsupported(
            f"evictkit ({cfg.policy}, budget={cfg.budget}) cannot run on this engine:\n- " + "\n- ".join(problems)
            + "\n(evictkit_vllm.engine_kwargs(...) gives the settings it needs; docs/vllm.md lists what is supported)"
        )


def _engine_problems(vc: Any, worker_cls: str, scheduler_cls: str) -> list[str]:
    out = []
    mc, cc, sc, pc = vc.model_config, vc.cache_config, vc.scheduler_config, vc.parallel_config
    if pc.worker_cls != worker_cls:
        out.append(f"worker_cls={pc.worker_cls!r}: use worker_cls={worker_cls!r} "
                   "(evictkit's worker compacts the cache)")
    if sc.scheduler_cls not in (scheduler_cls,):
        out.append(f"scheduler_cls={sc.scheduler_cls!r}: use scheduler_cls={scheduler_cls!r} "
                   "(evictkit's scheduler returns the evicted blocks)")
    if cc.enable_prefix_caching:
        out.append("enable_prefix_caching=True: set enable_prefix_caching=False (compacted blocks no longer hold "
                   "the tokens their hashes name)")
    if sc.enable_chunked_prefill:
        out.append("enable_chunked_prefill=True: set enable_chunked_prefill=False (each prompt must be prefilled "
                   "in one step; chunked prefill is not supported yet)")
    if sc.max_num_batched_tokens < mc.max_model_len:
        out.append(f"max_num_batched_tokens={sc.max_num_batched_tokens} < max_model_len={mc.max_model_len}: raise "
                   "max_num_batched_tokens to max_model_len or lower max_model_len (a prompt must fit one step)")
    if getattr(vc, "use_v2_model_runner", False):
        out.append("Model Runner V2 (VLLM_USE_V2_MODEL_RUNNER=1): unset it (evictkit hooks the V1 runner)")
    if not mc.enforce_eager:
        out.append("enforce_eager=False: set enforce_eager=True (CUDA graphs and torch.compile are not supported)")
    if vc.speculative_config is not None:
        out.append("speculative decoding (speculative_config): remove it (not supported)")
    if getattr(sc, "async_scheduling", False):
        out.append("async_scheduling=True: set async_scheduling=False (blocks are freed one step after compaction)")
    if vc.kv_transfer_config is not None:
        out.append("kv_transfer_config: remove it (connectors would move uncompacted block counts)")
    if str(cc.cache_dtype) != "auto":
        out.append(f"kv_cache_dtype={cc.cache_dtype!r}: use 'auto' (quantized KV caches are not supported)")
    sizes = {"tensor_parallel_size": pc.tensor_parallel_size, "pipeline_parallel_size": pc.pipeline_parallel_size,
             "data_parallel_size": pc.data_parallel_size}
    for name, size in sizes.items():
        if size != 1:
            out.append(f"{name}={size}: use 1 (parallel engines are designed, not built: docs/vllm.md)")
    if mc.get_sliding_window() is not None or _sliding_layers(mc):
        out.append("the model has sliding-window layers: use a model with full attention in every layer")
    if getattr(mc, "is_multimodal_model", False) or getattr(mc, "is_encoder_decoder", False):
        out.append("multimodal and encoder-decoder models are not supported: use a decoder-only text model")
    return out


def _sliding_layers(mc: Any) -> bool:
    text = mc.hf_config.get_text_config() if hasattr(mc.hf_config, "get_text_config") else mc.hf_config
    return any("sliding" in str(t) for t in (getattr(text, "layer_types", None) or []))


#: what this backend hands a policy, by evictkit capability tag (evictkit.contract.capabilities)
SUPPLIED = {
    "kv_only": "keys, values and their true positions",
    "window_queries": "the newest post-RoPE queries, kept across decode steps",
    "queries": "all of a forward's post-RoPE queries (a whole prompt: chunked prefill is refused)",
    "attention_weights": "recomputed by evictkit from those queries",
    "layer_weights": "W_O, read back once per layer through vLLM's o_proj",
}
#: tags this backend refuses, each with why and what to change
REFUSED = {
    "ragged_heads": "its per-head kept counts can differ within a layer, and vLLM's CPU attention reads one "
                    "length per request and layer: use a policy whose needs() has ragged_heads=False",
    "extra_passes": "it runs forward passes of its own, which vLLM's scheduler never schedules: use a policy "
                    "that scores from the forward it is shown (extra_passes=False)",
    "cross_layer": "its layer budgets are allocated after the last layer from every layer's prefill, and this "
                   "backend evicts inside each layer's attention with one length per request for all layers: "
                   "use a policy whose needs() has cross_layer=False",
}


def policy_problems(cfg: EvictConfig, vc: Any | None = None) -> list[str]:
    """What keeps `cfg`'s policy from running in vLLM, decided from what it declares
    (evictkit.contract.capabilities: capability tags, positions, exact_budget, layer_budget):
    every tag must be one this backend supplies (SUPPLIED; REFUSED and unknown tags are refused),
    it must keep exactly its budget, the same count in every layer, with absolute positions.
    One selection on synthetic tensors of the model's shape then confirms that what it declares
    is all it reads (a policy whose needs() leaves out a read fails here, not mid-request)."""
    from evictkit.contract import Policy, capabilities, declared

    policy = cfg.build()
    name = policy.name
    caps = capabilities(policy)
    needs = declared(policy)
    out = [f"policy {name!r} has the capability tag {tag!r}: {REFUSED[tag]}" for tag in caps["tags"] if tag in REFUSED]
    unknown = [tag for tag in caps["tags"] if tag not in SUPPLIED and tag not in REFUSED]
    if unknown:
        out.append(f"policy {name!r} has capability tags {unknown} that this evictkit-vllm does not know how to "
                   f"supply (it supplies {sorted(SUPPLIED)}): upgrade evictkit-vllm or use a policy without them")
    if not needs.exact_budget:
        out.append(f"policy {name!r} may keep fewer entries than its budget (Needs.exact_budget=False): vLLM's "
                   "scheduler lays out blocks for the kept count in advance; use a policy that keeps exactly its "
                   "budget")
    if needs.positions != "absolute":
        out.append(f"policy {name!r} uses positions={needs.positions!r}: vLLM's RoPE positions stay true and kept "
                   "keys are never re-rotated; use positions='absolute'")
    if out:
        return out
    n_layers, heads, kv_heads, head_dim = _shape(vc)
    length = 4 * max(64, (cfg.budget if isinstance(cfg.budget, int) else 64))
    base = cfg.limit(length)
    if type(policy).layer_budget is not Policy.layer_budget and any(
        policy.layer_budget(base, i, n_layers, length) != base for i in range(n_layers)
    ):
        return [f"policy {name!r} gives each layer its own budget (layer_budget): vLLM keeps one block table and one "
                "sequence length per request for all layers; use a policy with one budget for every layer"]
    try:
        sel = _probe(policy, base, length, heads, kv_heads, head_dim, n_layers)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe is the policy's refusal, reported
        return [f"policy {name!r} declares the capability tags {list(caps['tags'])}, which vLLM supplies, but fails "
                f"to select from an engine's tensors (post-RoPE queries, keys, values, W_O), so it reads something "
                f"its needs() does not declare: {type(exc).__name__}: {exc}"]
    if isinstance(sel, tuple):
        out.append(f"policy {name!r} returned per-head counts without declaring Needs(ragged_heads=True): "
                   f"{REFUSED['ragged_heads']}")
    return out


def reads_layer_weights(policy: Any) -> bool:
    """Whether the policy reads the layer's W_O (its capability tag "layer_weights")."""
    from evictkit.contract import capabilities

    return "layer_weights" in capabilities(policy)["reads"]


def _shape(vc: Any | None) -> tuple[int, int, int, int]:
    if vc is None:
        return 2, 4, 2, 16
    mc, pc = vc.model_config, vc.parallel_config
    return (mc.get_num_layers(pc), mc.get_num_attention_heads(pc), mc.get_num_kv_heads(pc), mc.get_head_size())


def _probe(policy: Any, budget: int, length: int, heads: int, kv_heads: int, head_dim: int, n_layers: int):
    """One selection on random tensors: what kind of selection the policy returns."""

    with torch.inference_mode(False):  # the worker runs under inference mode: ReST-KV reads _version
        return _probe_select(policy, budget, length, heads, kv_heads, head_dim, n_layers)


def _probe_select(policy: Any, budget: int, length: int, heads: int, kv_heads: int, head_dim: int, n_layers: int):
    from evictkit.contract import declared
    from evictkit.observation import Observation

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, kv_heads, length, head_dim, generator=g)
    obs = Observation.from_tensors(
        keys=keys, values=torch.randn(keys.shape, generator=g),
        queries=torch.randn(1, heads, length, head_dim, generator=g), query_positions=torch.arange(length)[None],
        scaling=head_dim**-0.5, layer_idx=0, n_layers=n_layers, window=declared(policy).window,
        o_proj_weight=torch.randn(heads * head_dim, heads * head_dim, generator=g),
    )
    with torch.no_grad():
        state = dict(policy.observe(obs) or {})
        obs.state.update(state)
        return policy.select(obs, budget)
