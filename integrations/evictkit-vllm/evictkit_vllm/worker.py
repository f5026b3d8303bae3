"""evictkit's CPU worker: vLLM's `CPUWorker` whose model runner tracks evicted entries.

Selected per engine with `worker_cls="evictkit_vllm.worker.EvictkitCPUWorker"`. When the engine
has no evictkit configuration it is vLLM's worker unchanged. Otherwise, after vLLM builds its
`CPUModelRunner`, the runner's class is swapped for a subclass that overrides two private methods
of vLLM 0.32's `GPUModelRunner` (which the CPU runner inherits):

- `_prepare_inputs` (after the original): plans this step's jobs for the attention backend
  (prefills that evict or start a request that evicts while decoding; the decode steps of such
  requests), and, for requests compacted earlier, lowers `seq_lens` and the CPU upper bound
  `optimistic_seq_lens_cpu` by the evicted count n - S(n) (EvictConfig.stored) and recomputes the
  slot mapping from `positions - evicted`. `positions` stay true
  (RoPE), `num_computed_tokens` stays logical (sampling, stop checks, max_model_len).
- `_update_states` (before the original): truncates the block-table rows of requests compacted in
  the previous step to the blocks they still use, before vLLM appends newly allocated blocks
  (the scheduler frees the rest, evictkit_vllm.scheduler); drops the state of finished requests,
  and of resumed (preempted) ones, whose recomputed prefill is compacted again.
Why private methods: vLLM has no public seam that sees the per-request sequence lengths, slot
mapping and block table between scheduling and the forward.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch
from vllm.v1.worker.cpu_worker import CPUWorker

from evictkit_vllm import SCHEDULER_CLS, WORKER_CLS
from evictkit_vllm import plan as _plan
from evictkit_vllm.checks import check_engine, reads_layer_weights
from evictkit_vllm.config import EvictConfig, config_of, request_config


@attrs.define
class _Request:
    prompt: int
    cfg: EvictConfig  # the request's own (engine's, or its SamplingParams override)

    def stored(self, n: int) -> int:
        """Entries per KV head held after n computed tokens (EvictConfig.stored)."""
        return self.cfg.stored(self.prompt, n)


@attrs.define
class WorkerState:
    cfg: EvictConfig
    requests: dict[str, _Request] = attrs.field(factory=dict)  # requests whose cache evictkit changes
    o_proj: dict[str, torch.Tensor] | None = None  # ordinary copies of each layer's W_O, made on first need
    pending: dict[str, int] = attrs.field(factory=dict)  # compacted in the last step: {request: entries held}


class EvictkitCPUWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        cfg = config_of(self.vllm_config)
        if cfg is None:
            return  # inert: vLLM's worker and runner unchanged
        check_engine(self.vllm_config, cfg, worker_cls=WORKER_CLS, scheduler_cls=SCHEDULER_CLS)
        runner = self.model_runner
        runner.__class__ = _evictkit_runner(type(runner))
        runner._evictkit = WorkerState(cfg)


_RUNNERS: dict[type, type] = {}


def _evictkit_runner(base: type) -> type:
    if base not in _RUNNERS:
        _RUNNERS[base] = type(f"Evictkit{base.__name__}", (_RunnerMixin, base), {})
    return _RUNNERS[base]


class _RunnerMixin:
    _evictkit: WorkerState

    def _update_states(self, scheduler_output: Any) -> Any:
        st = self._evictkit
        finished = set(scheduler_output.finished_req_ids)
        resumed = set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        for rid in finished | resumed:
            st.requests.pop(rid, None)
            st.pending.pop(rid, None)
            _plan.forget(rid)
        for rid, held in st.pending.items():
            _truncate(self, rid, held)
        st.pending.clear()
        return super()._update_states(scheduler_output)  # type: ignore[misc]

    def _prepare_inputs(self, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> Any:
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)  # type: ignore[misc]
        st = self._evictkit
        ib = self.input_batch  # type: ignore[attr-defined]
        n = ib.num_reqs
        starts = self.query_start_loc.np[: n + 1]  # type: ignore[attr-defined]
        jobs: list[_plan.Job] = []
        delta = np.zeros(n, dtype=np.int64)
        for i, rid in enumerate(ib.req_ids[:n]):
            prompt, done = int(ib.num_prompt_tokens[i]), int(ib.num_computed_tokens_cpu[i])
            sched = int(num_scheduled_tokens[i])
            if done == 0:  # a prefill: first, or the recomputation of a preempted request
                if sched < prompt:
                    raise RuntimeError(f"evictkit: request {rid} was scheduled {sched} of its {prompt} prompt tokens; "
                                       "chunked prefill is not supported (enable_chunked_prefill=False)")
                _plan.forget(rid)
                cfg = request_config(st.cfg, self.requests[rid].sampling_params)  # type: ignore[attr-defined]
                job = None if cfg is None else _prefill_job(rid, i, int(starts[i]), prompt, sched, cfg)
                if job is None:
                    st.requests.pop(rid, None)
                    continue
                jobs.append(job)
                st.requests[rid] = _Request(prompt, cfg)  # type: ignore[arg-type]
                if job.target < sched:
                    st.pending[rid] = job.target
            elif rid in st.requests:
                req = st.requests[rid]
                held = req.stored(done)
                delta[i] = done - held
                if req.cfg.evicts_while_decoding():
                    if sched != 1:
                        raise RuntimeError(f"evictkit: request {rid} was scheduled {sched} tokens in a decode step; "
                                           "decode-time eviction needs one token per step (no speculative decoding)")
                    target = req.stored(done + 1)
                    jobs.append(_plan.Job(rid, i, int(starts[i]), prompt, 1, req.stored(prompt), req.cfg.build(),
                                          kind="decode", target=target, limit=req.cfg.limit(prompt),
                                          slack=req.cfg.slack, phases=req.cfg.phases(), before=done, track=True))
                    if target < held + 1:
                        st.pending[rid] = target
        total = int(num_scheduled_tokens[:n].sum())
        if st.o_proj is None and any(reads_layer_weights(job.policy) for job in jobs):
            st.o_proj = _o_proj_copies(self.model, self.model_config.dtype)  # type: ignore[attr-defined]
        _plan.set_plan(jobs, total, record=st.cfg.record_kept, o_proj=st.o_proj,
                       n_layers=self.model_config.get_num_layers(self.parallel_config))  # type: ignore[attr-defined]
        if delta.any():
            d = torch.from_numpy(delta)
            self.seq_lens[:n] -= d.to(self.seq_lens.dtype)  # type: ignore[attr-defined]
            self.optimistic_seq_lens_cpu[:n] -= d.to(self.optimistic_seq_lens_cpu.dtype)  # type: ignore[attr-defined]
            per_token = torch.repeat_interleave(d, torch.from_numpy(num_scheduled_tokens[:n].astype(np.int64)))
            shifted = self.positions[:total] - per_token.to(self.positions.dtype)  # type: ignore[attr-defined]
            ib.block_table.compute_slot_mapping(n, self.query_start_loc.gpu[: n + 1], shifted)  # type: ignore[attr-defined]
        return out


def _prefill_job(rid: str, row: int, start: int, prompt: int, total: int, cfg: EvictConfig) -> _plan.Job | None:
    """The prefill's job, or None when evictkit leaves the request alone (it never exceeds its
    budget at prefill and does not evict while decoding)."""
    target = cfg.stored(prompt, total)
    track = cfg.evicts_while_decoding()
    if target == total and not track:
        return None
    return _plan.Job(rid, row, start, prompt, total, cfg.keep(prompt), cfg.build(), kind="prefill", target=target,
                     limit=cfg.limit(prompt), slack=cfg.slack, phases=cfg.phases(), track=track)


def _o_proj_copies(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{attention module name: W_O [hidden, H_q * D]} as ordinary tensors, for policies that read W_O.

    vLLM's CPU linear layers hand their weight to a packed GEMM (oneDNN) and leave `weight` empty,
    so W_O is read back through the layer itself: o_proj(I) - o_proj(0) = W_O^T, exact (every
    product is a weight times 1 or 0). Made outside inference mode, since vLLM's inference tensors
    have no version counter (ReST-KV caches its Gram matrices by it). Costs one more copy of every
    o_proj weight, kept for the engine's life.
    """
    out = {}
    with torch.inference_mode(False), torch.no_grad():
        for name, m in model.named_modules():
            proj = getattr(m, "o_proj", None)
            if not isinstance(proj, torch.nn.Module):
                continue
            weight = getattr(proj, "weight", None)
            if weight is not None and weight.dim() == 2 and weight.numel():
                out[name] = weight.detach().clone()
                continue
            n = int(getattr(proj, "input_size_per_partition", 0) or proj.input_size)

            def run(x: torch.Tensor, proj: Any = proj) -> torch.Tensor:
                y = proj(x)
                return y[0] if isinstance(y, tuple) else y

            out[name] = (run(torch.eye(n, dtype=dtype)) - run(torch.zeros(1, n, dtype=dtype))).t().contiguous()
    return out


def _truncate(runner: Any, rid: str, held: int) -> None:
    """Drop the blocks past the `held` entries from the request's block ids and batch row."""
    state = runner.requests.get(rid)
    if state is None:
        return
    ib = runner.input_batch
    row = ib.req_id_to_index.get(rid)
    for g, ids in enumerate(state.block_ids):
        table = ib.block_table[g]
        keep = -(-held // table.block_size)
        del ids[keep:]
        if row is not None and table.num_blocks_per_row[row] > keep:
            table.block_table.np[row, keep : table.num_blocks_per_row[row]] = 0
            table.num_blocks_per_row[row] = keep
