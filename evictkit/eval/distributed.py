"""`evictkit eval` under torchrun: which rank runs which sample, and the few collectives it needs.

torchrun (or srun + torchrun) sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; without
them a run is one process and nothing here does anything. The split is static and
deterministic (no scheduler of our own): the samples still to run are dealt round-robin over
the ranks, each sample with all of its variants, because they share one prefill. Each rank
appends to its own shard (`results.rank{R}.jsonl`); rank 0 merges the shards after a barrier.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

#: how long a rank may wait at a barrier for the others (a resumed rank with nothing left waits a
#: whole run): EVICTKIT_DIST_TIMEOUT seconds, default one week
DEFAULT_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Dist:
    """This process's place in the run: rank `rank` of `world` (`local_rank` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th, starting at its rank (all of them in one process)."""
        return list(items[self.rank :: self.world])


def from_env(environ: dict[str, str] | None = None) -> Dist:
    """The torchrun variables of the environment, or one process when they are not set."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Dist()
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ValueError(
            f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, LOCAL_RANK={env.get('LOCAL_RANK')!r}: "
            "torchrun's variables must be integers"
        ) from None
    if world < 1 or not 0 <= rank < world or local_world < 1 or not 0 <= local_rank < local_world:
        raise ValueError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}: not a valid place in a run")
    return Dist(rank, world, local_rank, local_world)


def cuda_device(dist: Dist) -> torch.device | None:
    """cuda:LOCAL_RANK for a distributed run on a machine with GPUs, else None (the CPU)."""
    if not dist.enabled or not torch.cuda.is_available():
        return None
    if dist.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK {dist.local_rank} but this machine has {torch.cuda.device_count()} GPU(s): "
                         "start at most one process per GPU (--nproc_per_node)")
    return torch.device("cuda", dist.local_rank)


def cpu_threads(dist: Dist) -> int:
    """Torch threads per process: this node's cores shared by its ranks (they would fight otherwise)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // dist.local_world)


def init(dist: Dist, device: torch.device) -> None:
    """Join the process group: NCCL when the model is on this rank's GPU, else gloo."""
    import torch.distributed as td

    if not dist.enabled or td.is_initialized():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get("EVICTKIT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        td.init_process_group("nccl", timeout=timeout, device_id=device)
    else:
        td.init_process_group("gloo", timeout=timeout)


def barrier(dist: Dist) -> None:
    import torch.distributed as td

    if dist.enabled and td.is_initialized():
        td.barrier()


def total(dist: Dist, n: int, device: torch.device) -> int:
    """The sum of `n` over the ranks."""
    import torch.distributed as td

    if not dist.enabled or not td.is_initialized():
        return n
    t = torch.tensor([n], dtype=torch.long, device=device if td.get_backend() == "nccl" else "cpu")
    td.all_reduce(t)
    return int(t.item())


def finish(dist: Dist) -> None:
    """Leave the process group (torchrun's workers otherwise warn at exit)."""
    import torch.distributed as td

    if dist.enabled and td.is_initialized():
        td.destroy_process_group()
