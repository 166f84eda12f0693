"""Data parallelism through torch.distributed, started by `torchrun` or `accelerate launch`.

Both launchers set WORLD_SIZE/RANK/LOCAL_RANK; each process then trains on its share of every
global batch and the adapter gradients are summed across processes before each optimizer step (under
`--shard fsdp`, FSDP's own reduce-scatter sums them; under `--shard zero3`, DeepSpeed's: see sharding.py).

A process that fails exits, and the others' next collective then fails at once (gloo sees the closed
connection); `peer_failure` turns that into one line pointing at the failed process's own error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import AdapterkitError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    shard: str = "none"  # fsdp: parameters are DTensors; zero3: DeepSpeed partitions; both reduce gradients

    @property
    def sharded(self) -> bool:
        return self.shard != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0


def launcher_mismatch(env: dict) -> str | None:
    """Why a launcher that asked for several processes started only this one, if it did.

    `accelerate launch --num_processes N --cpu` runs a single process (its simple launcher) and sets
    MASTER_ADDR for the group it never starts; training then would silently run alone.
    """
    if "WORLD_SIZE" not in env and env.get("ACCELERATE_USE_CPU") and "MASTER_ADDR" in env:
        return ("accelerate launch --cpu started one process although --num_processes asked for more (its CPU "
                "mode does not spawn them); run `torchrun --nproc_per_node N -m adapterkit train ...` or "
                "`accelerate launch --multi_gpu --num_processes N -m adapterkit train ...` (gloo on a CPU), or "
                "pass --num_processes 1")
    return None


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as part of a group."""
    return "WORLD_SIZE" in os.environ


def planned_size() -> int:
    """The number of processes the launcher started (1 without one), known before joining the group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_world(shard: str = "none") -> World:
    """One process, or join the group the launcher described in the environment (also a group of one
    process when sharded: FSDP and DeepSpeed need a group)."""
    mismatch = launcher_mismatch(dict(os.environ))
    if mismatch:
        raise AdapterkitError(mismatch)
    size = planned_size()
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if size == 1 and shard == "none":
        return World(device=device)
    if not dist.is_initialized():
        # A process that stops answering (alive but stuck) ends the job after this long; one that exits is
        # noticed by the others' next collective at once.
        timeout = timedelta(seconds=float(os.environ.get("ADAPTERKIT_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout)
    if cuda:
        torch.cuda.set_device(device)
    return World(dist.get_rank(), dist.get_world_size(), device, shard)


def peer_failure(exc: BaseException, world: World) -> AdapterkitError | None:
    """The line for a collective that failed because another process exited; None for other errors."""
    if world.size == 1 or isinstance(exc, AdapterkitError):
        return None
    text = str(exc)
    if isinstance(exc, dist.DistError) or any(s in text for s in ("Connection closed by peer", "Connection reset",
                                                                    "Broken pipe", "[gloo]")):
        seen = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(exc).__name__)  # gloo's source line
        return AdapterkitError(f"process {world.rank} of {world.size} stopped: another process failed (its error "
                               f"is printed above; here: {seen[:120]})")
    return None


def sum_across(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum every gradient across processes in one flat all-reduce (FSDP has summed sharded ones already)."""
    if world.size == 1 or world.sharded:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = sum_across(torch.cat([g.reshape(-1) for g in grads]), world)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g)
        offset += g.numel()


def barrier(world: World) -> None:
    """Wait for every process (the main one writes the final files while the others wait)."""
    if world.size > 1:
        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
