"""The worker's plan for this step, read by the attention backend (same process, one step at a time).

vLLM's attention backend sees tensors, not requests: the worker (evictkit_vllm.worker) sets, before
each forward, which rows of the batch to compact and to how many entries. A request that evicts
while decoding also keeps, per layer, what evictkit's core keeps for a layer of a transformers cache
(`Side`): its stored keys and values (vLLM's packed CPU cache is never read back), their true
positions, the policy's side tensors and scratch, and the rolling window of queries."""

from __future__ import annotations

from typing import Any

import attrs
import torch


@attrs.frozen
class Job:
    """What the backend does for one request in this step's forward.

    kind "prefill": the request's first forward (or the recomputation of a preempted one): the
    prompt's P tokens are scored as a prefill, a resumed request's generated tokens follow them,
    and the layer is compacted to `target` entries. kind "decode": one new token is appended to the
    request's `Side` state and the layer evicts back to `limit` when it then holds more than
    limit + slack. Either way the layer holds `target` entries afterwards (EvictConfig.stored),
    which the scheduler and worker assumed when they laid out blocks and slots."""

    req_id: str
    row: int  # the request's row in the batch (block table, seq_lens)
    start: int  # its first token in this step's flattened tokens
    prompt: int  # P, the prompt's tokens
    total: int  # tokens of the request in this step: P (or P + generated when resumed) for a prefill, 1 for decode
    keep: int  # entries per KV head after the prompt's own eviction (K, or P when the prefill does not evict)
    policy: Any = None  # the request's evictkit policy
    kind: str = "prefill"
    target: int = 0  # entries per KV head after this step
    limit: int = 0  # K, the budget a decode-time eviction returns to
    slack: int = 0
    phases: tuple[str, ...] = ("prefill",)
    before: int = 0  # decode: tokens computed before this step (the new token's true position)
    track: bool = False  # keep a Side state per layer for later decode-time evictions


@attrs.define
class Side:
    """One layer of one request that evicts while decoding: what evictkit's core keeps for it."""

    keys: torch.Tensor  # [1, H_kv, S, D] the entries the request's blocks hold, post-RoPE
    values: torch.Tensor
    positions: torch.Tensor  # [1, H_kv, S] their true positions
    state: dict[str, torch.Tensor]  # the policy's side tensors [1, H_kv, S(, E)]
    scratch: dict[str, Any]
    window: tuple[torch.Tensor, torch.Tensor] | None  # newest queries [1, H_q, w, D] and positions [1, w]


@attrs.define
class Plan:
    jobs: list[Job] = attrs.field(factory=list)
    num_tokens: int = 0  # the step's scheduled tokens: a forward of another size (a dummy run) is not this step
    record: bool = False
    o_proj: dict[str, torch.Tensor] | None = None  # {attention module name: W_O} for policies that read it
    n_layers: int = 0
    done: set[str] = attrs.field(factory=set)  # layers compacted under this plan: a later forward skips them


PLAN = Plan()

#: {req_id: {layer_idx: Side}} for requests that evict while decoding; the worker drops a request's
#: entry when it finishes, is aborted or is preempted
SIDES: dict[str, dict[int, Side]] = {}

#: with `record_kept`, {req_id: {layer_idx: [H_kv, S] true positions held}}: the prompt's kept
#: positions after the prefill, updated after every step for requests that evict while decoding
KEPT: dict[str, dict[int, torch.Tensor]] = {}
#: with `record_kept`, {req_id: how many times its prompt was compacted} (a preempted request: again on resume)
COMPACTIONS: dict[str, int] = {}
#: with `record_kept`, {req_id: [(entries before the eviction, after), ...]} per eviction (layer 0)
EVICTIONS: dict[str, list[tuple[int, int]]] = {}


def set_plan(jobs: list[Job], num_tokens: int, **kw: Any) -> None:
    PLAN.jobs = jobs
    PLAN.num_tokens = num_tokens
    PLAN.done = set()
    for k, v in kw.items():
        setattr(PLAN, k, v)


def clear() -> None:
    PLAN.jobs = []
    PLAN.num_tokens = 0


def forget(req_id: str) -> None:
    """Drop a request's per-layer state (finished, aborted or preempted)."""
    SIDES.pop(req_id, None)
