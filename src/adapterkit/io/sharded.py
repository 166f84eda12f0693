"""Files of a sharded run (`train --shard fsdp`): adapters gathered from the shards, training state saved sharded.

An adapter folder is written from full tensors: every process gathers the adapter (DTensor.full_tensor())
and runs the fingerprint's probe forwards together (each layer gathers its weights in turn), and the
first process alone writes, after checking count, shapes and emptiness against the trainable parameters.
Adapter weights and optimizer moments of a checkpoint are saved with torch.distributed.checkpoint (DCP)
as safetensors shards, one file per process, with their offsets inside (its Hugging Face storage
writer: no pickled metadata). DCP reads them back into any layout, so a checkpoint of 2 processes
resumes on 1 process, sharded or not. An unsharded checkpoint (one process, or ZeRO-3's gathered one)
resumes sharded too: each process keeps its part of the full tensors (`load_unsharded`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..errors import AdapterkitError
from ..training.distributed import World, barrier
from ..training.sharding import adapter_parameters, full_tensor, gathered_adapter, is_sharded, root_gathered
from . import native

SHARDED_DIR = "sharded"
SHARD_SUFFIX = ".safetensors"


def save_gathered(adapted, directory: Path, name: str, world: World) -> Path:
    """Every process calls this; the first writes `directory` (adapter_config.json + weights)."""
    weights = gathered_adapter(adapted, name)
    with root_gathered(adapted):
        meta, tensors, parameters = native.adapter_payload(adapted, name, weights)
    if world.main:
        native.write_adapter(Path(directory), meta, tensors, set(weights), parameters)
    barrier(world)
    return Path(directory)


def _state(adapted, optimizer, name: str, create: bool) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint shards: `adapter/KEY` and `optimizer/SLOT/KEY` (KEY as in adapter files).
    `create`: give parameters without optimizer state (a fresh run about to load) zero moments."""
    own = adapter_parameters(adapted, name)
    state = {f"adapter/{key}": p for key, p in own.items()}
    for key, p in own.items():
        slots = optimizer.state[p]
        if create and not slots and p.requires_grad:  # AdamW's slots, as its first step creates them
            slots.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                         exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
        state.update({f"optimizer/{slot}/{key}": value for slot, value in slots.items()})
    return state


def save_state(directory: Path, adapted, optimizer, name: str) -> None:
    """Every process writes its shard of the adapter and the optimizer moments into `directory`."""
    import torch.distributed.checkpoint as dcp

    writer = dcp.HuggingFaceStorageWriter(str(directory), save_distributed=True)
    dcp.save(_state(adapted, optimizer, name, create=False), storage_writer=writer,
             no_dist=not torch.distributed.is_initialized())


def shard_count(directory: Path) -> int:
    return len(list(directory.glob(f"*{SHARD_SUFFIX}"))) if directory.is_dir() else 0


def load_state(directory: Path, adapted, optimizer, name: str, weights: dict[str, torch.Tensor]) -> None:
    """Read a sharded checkpoint into this run's layout; the adapter read must equal `weights`, the full
    adapter saved beside the shards (checked on every process)."""
    import torch.distributed.checkpoint as dcp

    state = _state(adapted, optimizer, name, create=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process reading shards: meant
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(directory)),
                 no_dist=not torch.distributed.is_initialized())
    for key, p in adapter_parameters(adapted, name).items():
        got = full_tensor(p.detach()).cpu()
        if key not in weights or not torch.equal(got, weights[key].to(got.dtype)):
            raise AdapterkitError(f"its sharded weights differ from its adapter file at {key}")


def _placed(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like`: this process's shard of it when `like` is a DTensor."""
    full = full.to(like.dtype)
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    # every process holds the whole tensor already: each cuts its own part, no scatter
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def load_unsharded(adapted, optimizer, name: str, weights: dict[str, torch.Tensor], state: dict) -> None:
    """An unsharded checkpoint's full adapter and AdamW moments (`state`: torch's optimizer state dict,
    parameters by index) into this sharded run; every process keeps its own part of each tensor."""
    order = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    with torch.no_grad():
        for key, p in adapter_parameters(adapted, name).items():
            if key not in weights or tuple(weights[key].shape) != tuple(p.shape):
                raise AdapterkitError(f"its adapter has no weight {key} of shape {tuple(p.shape)}")
            p.copy_(_placed(weights[key], p))
            slots = state["state"].get(order.get(id(p)), {})
            if p.requires_grad and slots:
                optimizer.state[p] = {slot: _placed(v, p) if v.dim() else v.clone() for slot, v in slots.items()}
