"""vLLM's CPU attention backend, with evictkit's eviction step after the layer's own attention.

Registered in place of CPU_ATTN by `evictkit_vllm.register()` through vLLM's public
`register_backend`. Without a plan from evictkit's worker it is vLLM's backend unchanged. With one,
after the original forward (attention stays full over what the layer holds, as in evictkit on
transformers) it runs evictkit's step for each planned request: an `Observation` from the forward's
post-RoPE query/key/value (`Observation.from_tensors`), the policy's observe and select through
evictkit's own `choose` and `compact`, and writes the kept entries to the first slots of the
request's own blocks with the backend's own writer (`cpu_attn_reshape_and_cache`), so the
ISA-specific block layout never matters. A request that evicts while decoding keeps a `Side` copy
of what it holds per layer (evictkit_vllm.plan): the packed cache is never read back.
"""

from __future__ import annotations

from typing import Any

import torch
from evictkit.contract import declared
from evictkit.observation import Observation, _TensorObservation
from evictkit.step import CORE_GUARD, LayerState, StepConfig, choose, compact
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
        D, s, n = self.head_size, job.start, job.total
        layer_idx = extract_layer_index(layer.layer_name)
        q = query[s : s + n].view(n, self.num_heads, D).transpose(0, 1)[None]  # [1, H_q, n, D]
        k = key[s : s + n].view(n, self.num_kv_heads, D).transpose(0, 1)[None]  # [1, H_kv, n, D]
        v = value[s : s + n].view(n, self.num_kv_heads, D).transpose(0, 1)[None]
        ctx = _Layer(self, layer, layer_idx, p)
        if job.kind == "prefill":
            before = n  # entries the layer holds after this forward, before any eviction
            side, changed = ctx.prefill(job, q, k, v)
        else:
            before = _plan.SIDES[job.req_id][layer_idx].keys.shape[2] + n
            side, changed = ctx.decode(job, q, k, v)
        held = side.keys.shape[2]
        if held != job.target:
            raise RuntimeError(f"evictkit: request {job.req_id} layer {layer_idx} holds {held} entries after this "
                               f"step, the scheduler assumed {job.target} (policy {job.policy.name!r})")
        if changed:
            self._write(layer, side.keys[0].transpose(0, 1), side.values[0].transpose(0, 1), kv_cache, md, job.row)
        if job.track:
            _plan.SIDES.setdefault(job.req_id, {})[layer_idx] = side
        if p.record:
            if job.kind == "prefill":
                _plan.KEPT.setdefault(job.req_id, {})[layer_idx] = side.positions[0, :, : job.keep].clone()
                if layer_idx == 0 and job.keep < job.prompt:
                    _plan.COMPACTIONS[job.req_id] = _plan.COMPACTIONS.get(job.req_id, 0) + 1
            if job.track:
                _plan.KEPT.setdefault(job.req_id, {})[layer_idx] = side.positions[0].clone()
            if changed and layer_idx == 0:
                _plan.EVICTIONS.setdefault(job.req_id, []).append((before, held))

    def _write(self, layer: Any, kept_k: torch.Tensor, kept_v: torch.Tensor, kv_cache: torch.Tensor, md: Any,
               row: int) -> None:
        """Write kept entries [S, H_kv, D] to the request's first S slots with the backend's own writer."""
        n = kept_k.shape[0]
        nb, _, bs, _ = kv_cache.shape
        cache = kv_cache.view(nb, self.num_kv_heads, bs * 2, -1)
        key_cache, value_cache = cache.chunk(2, dim=2)
        phys = torch.arange(n, device=kept_k.device)
        slots = md.block_table[row, phys // bs].to(torch.int64) * bs + phys % bs
        ops.cpu_attn_reshape_and_cache(kept_k.contiguous(), kept_v.contiguous(), key_cache, value_cache, slots,
                                       layer.isa, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                       kv_cache_dtype=self.kv_cache_dtype)


class _Layer:
    """One layer's eviction step for one request, from the forward's tensors, as evictkit's core
    runs it (evictkit.step: observe, choose, compact) on a transformers cache."""

    def __init__(self, impl: EvictkitCPUAttentionImpl, layer: Any, layer_idx: int, p: _plan.Plan) -> None:
        self.impl, self.layer_idx, self.p = impl, layer_idx, p
        self.o_proj = _o_proj(p.o_proj, layer.layer_name)

    def _observation(self, job: _plan.Job, side: _plan.Side, queries: torch.Tensor, query_positions: torch.Tensor,
                     phase: str, window: int, buffer: tuple[torch.Tensor, torch.Tensor] | None) -> Observation:
        kw = dict(keys=side.keys, values=side.values, queries=queries, query_positions=query_positions,
                  scaling=self.impl.scale, layer_idx=self.layer_idx, n_layers=self.p.n_layers, window=window,
                  positions=side.positions, phase=phase, phases=job.phases, state=side.state, scratch=side.scratch,
                  o_proj_weight=self.o_proj, softcap=self.impl.logits_soft_cap or None)
        if buffer is None:
            return Observation.from_tensors(**kw)
        return _WindowObservation(window_buffer=buffer, **kw)

    def _step(self, job: _plan.Job, side: _plan.Side, obs: Observation, budget: int, phases: tuple[str, ...],
              slack: int) -> bool:
        """observe, then choose and compact `side` in place; whether the layer was compacted."""
        policy = job.policy
        B, H, T, _ = side.keys.shape
        for name, t in (policy.observe(obs) or {}).items():
            side.state[name] = CORE_GUARD.side_tensor(policy, name, t, (B, H, T))
        st = LayerState(budget=budget, positions=side.positions, state=side.state, scratch=side.scratch)
        cfg = StepConfig(policy=policy, needs=declared(policy), phases=phases, slack=slack)
        _, sel = choose(cfg, st, obs)
        if sel is None:
            return False
        if sel.counts is not None:
            raise ValueError(f"policy {policy.name!r} returned per-head counts (ragged heads): not supported in vLLM")
        side.keys, side.values = compact(cfg, st, obs, sel)
        side.positions, side.state = st.positions, st.state
        return True

    def prefill(self, job: _plan.Job, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[_plan.Side, bool]:
        """The prompt scored as a prefill; a resumed request's generated tokens then follow its
        kept entries and, when the request evicts while decoding, one decode-time eviction brings
        the layer to the count an unpreempted request holds (job.target)."""
        P, n = job.prompt, job.total
        w = declared(job.policy).window
        side = _plan.Side(keys=k[:, :, :P], values=v[:, :, :P],
                          positions=torch.arange(P, device=k.device).expand(1, k.shape[1], P), state={}, scratch={},
                          window=None)
        pos = torch.arange(n, device=k.device)[None]
        obs = self._observation(job, side, q[:, :, :P], pos[:, :P], "prefill", w, None)
        changed = self._step(job, side, obs, job.limit, tuple(ph for ph in job.phases if ph == "prefill"), 0)
        if n > P:  # resumed: the generated tokens were recomputed after the prompt
            _append(side, k[:, :, P:], v[:, :, P:], pos[:, P:])
            if side.keys.shape[2] > job.target:
                buffer = (q[:, :, max(0, n - w):], pos[:, max(0, n - w):]) if w else None
                obs = self._observation(job, side, q[:, :, P:], pos[:, P:], "decode", w, buffer)
                changed |= self._step(job, side, obs, job.target, ("decode",), 0)
        if w:
            side.window = (q[:, :, max(0, n - w):].clone(), pos[:, max(0, n - w):])
        return side, changed

    def decode(self, job: _plan.Job, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[_plan.Side, bool]:
        """One new token appended, then evict back to K when the layer holds more than K + slack."""
        side = _plan.SIDES[job.req_id][self.layer_idx]
        pos = torch.arange(job.before, job.before + job.total, device=k.device)[None]
        _append(side, k, v, pos)
        w = declared(job.policy).window
        if w:
            wq, wp = (q, pos) if side.window is None else (torch.cat([side.window[0], q], 2),
                                                            torch.cat([side.window[1], pos], 1))
            side.window = (wq[:, :, -w:], wp[:, -w:])
        obs = self._observation(job, side, q, pos, "decode", w, side.window)
        return side, self._step(job, side, obs, job.limit, job.phases, job.slack)


def _append(side: _plan.Side, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
    """New entries [1, H_kv, q, D] at true positions [1, q], zero rows in every side tensor (evictkit.step)."""
    B, H, q, _ = k.shape
    side.keys = torch.cat([side.keys, k], 2)
    side.values = torch.cat([side.values, v], 2)
    side.positions = torch.cat([side.positions, pos[:, None].expand(B, H, q)], 2)
    side.state = {name: torch.cat([t, t.new_zeros(B, H, q, *t.shape[3:])], 2) for name, t in side.state.items()}


class _WindowObservation(_TensorObservation):
    """`Observation.from_tensors` whose window queries come from a rolling buffer (a decode step
    shows one new query; the policy's window reads the newest `needs().window`, as evictkit's core
    keeps them on transformers)."""

    @property
    def _window_qp(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._window_buffer


def _o_proj(weights: dict[str, torch.Tensor] | None, layer_name: str) -> torch.Tensor | None:
    """W_O of the attention module that owns `layer_name` ("model.layers.3.self_attn.attn")."""
    return None if weights is None else weights.get(layer_name.rsplit(".", 1)[0])


class EvictkitCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[EvictkitCPUAttentionImpl]:
        return EvictkitCPUAttentionImpl
