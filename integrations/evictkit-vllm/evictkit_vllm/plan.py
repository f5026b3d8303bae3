"""The worker's plan for this step, read by the attention backend (same process, one step at a time).

vLLM's attention backend sees tensors, not requests: the worker (evictkit_vllm.worker) sets, before
each forward, which rows of the batch hold a whole prompt to compact and to how many entries."""

from __future__ import annotations

from typing import Any

import attrs
import torch


@attrs.frozen
class Job:
    """Compact one request's prompt in this step's forward."""

    req_id: str
    row: int  # the request's row in the batch (block table, seq_lens)
    start: int  # its first token in this step's flattened tokens
    prompt: int  # P, the prompt's tokens (the first P of the request's tokens in this step)
    total: int  # tokens of the request in this step: P, or P + generated tokens on a resumed request
    keep: int  # K entries per KV head kept of the prompt
    policy: Any = None  # the request's evictkit policy

    @property
    def delta(self) -> int:
        return self.prompt - self.keep


@attrs.define
class Plan:
    jobs: list[Job] = attrs.field(factory=list)
    num_tokens: int = 0  # the step's scheduled tokens: a forward of another size (a dummy run) is not this step
    record: bool = False
    o_proj: dict[str, torch.Tensor] | None = None  # {attention module name: W_O} for policies that read it
    n_layers: int = 0
    done: set[str] = attrs.field(factory=set)  # layers compacted under this plan: a later forward skips them


PLAN = Plan()

#: with `record_kept`, {req_id: {layer_idx: [H_kv, K] kept prompt positions}} (tests read it in-process)
KEPT: dict[str, dict[int, torch.Tensor]] = {}
#: with `record_kept`, {req_id: how many times its prompt was compacted} (a preempted request: again on resume)
COMPACTIONS: dict[str, int] = {}


def set_plan(jobs: list[Job], num_tokens: int, **kw: Any) -> None:
    PLAN.jobs = jobs
    PLAN.num_tokens = num_tokens
    PLAN.done = set()
    for k, v in kw.items():
        setattr(PLAN, k, v)


def clear() -> None:
    PLAN.jobs = []
    PLAN.num_tokens = 0
