"""evictkit's CPU worker: vLLM's `CPUWorker` whose model runner tracks evicted entries.

Selected per engine with `worker_cls="evictkit_vllm.worker.EvictkitCPUWorker"`. When the engine
has no evictkit configuration it is vLLM's worker unchanged. Otherwise, after vLLM builds its
`CPUModelRunner`, the runner's class is swapped for a subclass that overrides two private methods
of vLLM 0.32's `GPUModelRunner` (which the CPU runner inherits):

- `_prepare_inputs` (after the original): plans this step's compactions (requests whose whole
  prompt is in this step and longer than its budget) for the attention backend, and, for requests
  compacted earlier, lowers `seq_lens` and the CPU upper bound `optimistic_seq_lens_cpu` by the
  evicted count and recomputes the slot mapping from `positions - evicted`. `positions` stay true
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
from evictkit_vllm.checks import check_engine, reads_o_proj
from evictkit_vllm.config import EvictConfig, config_of, request_config


@attrs.define
class _Request:
    prompt: int
    keep: int
    total: int  # tokens stored for the request by its compacting step (P, or P + generated when resumed)

    @property
    def delta(self) -> int:
        return self.prompt - self.keep


@attrs.define
class WorkerState:
    cfg: EvictConfig
    requests: dict[str, _Request] = attrs.field(factory=dict)  # compacted requests
    o_proj: dict[str, torch.Tensor] | None = None  # ordinary copies of each layer's W_O, made on first need
    pending: set[str] = attrs.field(factory=set)  # compacted in the last step: block table not truncated yet


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
            st.pending.discard(rid)
        for rid in st.pending:
            _truncate(self, rid, st.requests[rid])
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
                cfg = request_config(st.cfg, self.requests[rid].sampling_params)  # type: ignore[attr-defined]
                keep = prompt if cfg is None else cfg.keep(prompt)
                if keep < prompt:
                    jobs.append(_plan.Job(rid, i, int(starts[i]), prompt, sched, keep, cfg.build()))  # type: ignore[union-attr]
                    st.requests[rid] = _Request(prompt, keep, sched)
                    st.pending.add(rid)
                else:
                    st.requests.pop(rid, None)
            elif rid in st.requests:
                delta[i] = st.requests[rid].delta
        total = int(num_scheduled_tokens[:n].sum())
        if st.o_proj is None and any(reads_o_proj(job.policy) for job in jobs):
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


def _truncate(runner: Any, rid: str, req: _Request) -> None:
    """Drop the blocks past the compacted entries from the request's block ids and batch row."""
    state = runner.requests.get(rid)
    if state is None:
        return
    stored = req.total - req.delta
    ib = runner.input_batch
    row = ib.req_id_to_index.get(rid)
    for g, ids in enumerate(state.block_ids):
        table = ib.block_table[g]
        keep = -(-stored // table.block_size)
        del ids[keep:]
        if row is not None and table.num_blocks_per_row[row] > keep:
            table.block_table.np[row, keep : table.num_blocks_per_row[row]] = 0
            table.num_blocks_per_row[row] = keep
