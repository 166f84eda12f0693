"""Data parallelism through torch.distributed, started by `torchrun` or `accelerate launch`.

Both launchers set WORLD_SIZE/RANK/LOCAL_RANK; each process then trains on its share of every
global batch and the adapter gradients are summed across processes before each optimizer step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import AdapterkitError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

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
                "mode does not spawn them); run `torchrun --nproc_per_node N -m adapterkit train ...`, or "
                "pass --num_processes 1")
    return None


def init_world() -> World:
    """One process, or join the group the launcher described in the environment."""
    mismatch = launcher_mismatch(dict(os.environ))
    if mismatch:
        raise AdapterkitError(mismatch)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if cuda else torch.device("cpu")
    if size == 1:
        return World(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    return World(dist.get_rank(), dist.get_world_size(), device)


def sum_across(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_gradients(params: list[torch.nn.Parameter], world: World) -> None:
    """Sum every gradient across processes in one flat all-reduce."""
    if world.size == 1:
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
