"""vLLM's CPU attention backend, with prefill-time compaction after the layer's own attention.

Registered in place of CPU_ATTN by `evictkit_vllm.register()` through vLLM's public
`register_backend`. Without a plan from evictkit's worker it is vLLM's backend unchanged. With one,
after the original forward (prefill attention stays full, as in evictkit on transformers) it builds
an evictkit `Observation` per planned request from the forward's post-RoPE query/key/value, lets the
policy select, and writes the kept entries to the first K slots of the request's own blocks with the
backend's own writer (`cpu_attn_reshape_and_cache`), so the ISA-specific block layout never matters.
"""

from __future__ import annotations

from typing import Any

import torch
from evictkit.contract import Needs
from evictkit.observation import Observation
from evictkit.step import LayerState, StepConfig, choose
from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from evictkit_vllm import SCHEDULER_CLS, WORKER_CLS
from evictkit_vllm import plan as _plan
from evictkit_vllm.checks import check_engine
from evictkit_vllm.config import config_of

_CHECKED: set[int] = set()


class EvictkitCPUAttentionImpl(CPUAttentionBackendImpl):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # an engine configured for evictkit without evictkit's worker and scheduler classes fails here, at startup
        vc = get_current_vllm_config()
        if id(vc) not in _CHECKED:
            cfg = config_of(vc)
            if cfg is not None:
                check_engine(vc, cfg, worker_cls=WORKER_CLS, scheduler_cls=SCHEDULER_CLS)
            _CHECKED.add(id(vc))

    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: Any, output: torch.Tensor, *args: Any, **kwargs: Any):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        p = _plan.PLAN
        if (p.jobs and attn_metadata is not None and attn_metadata.num_actual_tokens == p.num_tokens
                and layer.layer_name not in p.done):
            p.done.add(layer.layer_name)
            with torch.no_grad():
                for job in p.jobs:
                    self._compact(layer, job, query, key, value, kv_cache, attn_metadata, p)
        return out

    def _compact(self, layer: Any, job: _plan.Job, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 kv_cache: torch.Tensor, md: Any, p: _plan.Plan) -> None:
        policy = job.policy
        P, s, D = job.prompt, job.start, self.head_size
        layer_idx = extract_layer_index(layer.layer_name)
        q = query[s : s + P].view(P, self.num_heads, D).transpose(0, 1)[None]  # [1, H_q, P, D]
        k = key[s : s + P].view(P, self.num_kv_heads, D).transpose(0, 1)[None]  # [1, H_kv, P, D]
        v = value[s : s + P].view(P, self.num_kv_heads, D).transpose(0, 1)[None]
        needs: Needs = policy.needs()
        st = LayerState(budget=job.keep)
        obs = Observation.from_tensors(
            keys=k, values=v, queries=q, query_positions=torch.arange(P, device=q.device)[None],
            scaling=self.scale, layer_idx=layer_idx, n_layers=p.n_layers, window=needs.window,
            state=st.state, scratch=st.scratch, o_proj_weight=_o_proj(p.o_proj, layer.layer_name),
            softcap=self.logits_soft_cap or None,
        )
        st.positions = obs.positions
        for name, t in (policy.observe(obs) or {}).items():
            st.state[name] = t
        _, sel = choose(StepConfig(policy=policy, needs=needs, phases=("prefill",)), st, obs)
        if sel is None:
            return
        if sel.counts is not None:
            raise ValueError(f"policy {policy.name!r} returned per-head counts (ragged heads): not supported in vLLM")
        idx = sel.gather[0]  # [H_kv, K], sorted, checked by evictkit's core
        gather = idx[..., None].expand(-1, -1, D)
        kept_k = k[0].gather(1, gather).transpose(0, 1)  # [K, H_kv, D]
        kept_v = v[0].gather(1, gather).transpose(0, 1)
        if job.total > P:  # a resumed request recomputed its generated tokens too: they follow the kept prompt
            tail = slice(s + P, s + job.total)
            kept_k = torch.cat([kept_k, key[tail].view(-1, self.num_kv_heads, D)])
            kept_v = torch.cat([kept_v, value[tail].view(-1, self.num_kv_heads, D)])
        n = kept_k.shape[0]
        nb, _, bs, _ = kv_cache.shape
        cache = kv_cache.view(nb, self.num_kv_heads, bs * 2, -1)
        key_cache, value_cache = cache.chunk(2, dim=2)
        phys = torch.arange(n, device=key.device)
        slots = md.block_table[job.row, phys // bs].to(torch.int64) * bs + phys % bs
        ops.cpu_attn_reshape_and_cache(kept_k.contiguous(), kept_v.contiguous(), key_cache, value_cache, slots,
                                       layer.isa, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                       kv_cache_dtype=self.kv_cache_dtype)
        if p.record:
            _plan.KEPT.setdefault(job.req_id, {})[layer_idx] = idx.clone()
            if layer_idx == 0:
                _plan.COMPACTIONS[job.req_id] = _plan.COMPACTIONS.get(job.req_id, 0) + 1


def _o_proj(weights: dict[str, torch.Tensor] | None, layer_name: str) -> torch.Tensor | None:
    """W_O of the attention module that owns `layer_name` ("model.layers.3.self_attn.attn")."""
    return None if weights is None else weights.get(layer_name.rsplit(".", 1)[0])


class EvictkitCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[EvictkitCPUAttentionImpl]:
        return EvictkitCPUAttentionImpl
