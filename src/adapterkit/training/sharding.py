"""Sharded training through torch.distributed's FSDP2 (`fully_shard`) or DeepSpeed ZeRO-3 (zero3.py); no
sharding of adapterkit's own. `Steps` is how the loop's backward and optimizer step run: plain torch
(one process, data parallel, FSDP) here, DeepSpeed's engine in zero3.py.

Each decoder layer is one FSDP unit and the root (the AdaptedModel) another: the root holds what no
layer holds, i.e. the embeddings, the final norm, the output head and the parameters of input hooks
(prompt-tuning embeddings, P-Tuning's prompt encoder, prefix-tuning's prefixes and their MLP), which
are ordinary parameters of the root unit. Adapters inside a layer (LoRA, bottleneck adapters, (IA)3
vectors) are sharded with that layer. Every parameter keeps its own dtype (a bf16 frozen base, fp32
adapter weights and optimizer state); under `--precision bf16` the policy gathers parameters in bf16
for compute and reduces gradients in fp32.

Gradients are summed across processes (the loop scales each micro-batch by 1 / micro-batches per
global step), with plain SUM collectives because gloo has no pre-multiplied sum.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.util import find_spec

import torch
from torch import nn

from ..errors import AdapterkitError
from .distributed import World, sum_gradients

SHARDS = ("none", "fsdp", "zero3")
LAUNCH = "torchrun --nproc-per-node 2 -m adapterkit train ... --shard {shard}"


def check_shard(shard: str, launched: bool, quantize: str, precision: str = "fp32", auto: bool = False) -> None:
    """What `--shard` needs before any work: an engine that is installed, a process group."""
    if shard == "zero3" and find_spec("deepspeed") is None:
        raise AdapterkitError("--shard zero3 needs DeepSpeed, which is not installed: pip install deepspeed (or "
                              "pip install 'adapterkit[zero3]'); --shard fsdp shards the model with torch alone")
    if shard != "none" and not launched:
        raise AdapterkitError(f"--shard {shard} needs a process group, and this process was started alone; launch "
                              f"it with `{LAUNCH.format(shard=shard)}` (or `accelerate launch --multi_gpu "
                              "--num_processes 2 -m adapterkit train ...`), or use --shard none")
    if shard != "none" and quantize != "none":
        raise AdapterkitError(f"--shard {shard} cannot shard a --quantize {quantize} base (bitsandbytes weights are "
                              f"not plain tensors); use --shard none with --quantize, or --shard {shard} without it")
    if shard == "zero3" and precision == "bf16":
        chosen = " (--precision auto chose bf16 on this hardware)" if auto else ""
        raise AdapterkitError(f"--shard zero3 trains in fp32 here{chosen}: a bf16 base beside fp32 adapter weights is "
                              "not set up for DeepSpeed's partitions; pass --precision fp32, or use --shard fsdp")


class Steps:
    """The loop's backward and optimizer step in plain torch (one process, data parallel, FSDP): each
    micro-batch's loss scaled to its share of the global batch; then gradients summed across processes
    (FSDP has summed them already), clipped, AdamW, the schedule."""

    def __init__(self, model: nn.Module, params: list, optimizer, scheduler, world: World,
                 max_grad_norm: float = 1.0):
        self.model, self.params, self.optimizer, self.scheduler = model, params, optimizer, scheduler
        self.world, self.max_grad_norm = world, max_grad_norm

    def backward(self, loss: torch.Tensor, scale: float) -> None:
        (loss * scale).backward()

    def step(self, stepped: Callable[[], None] = lambda: None) -> None:
        """`stepped` runs after the update, before the gradients are cleared (AdaLoRA's allocator reads them)."""
        sum_gradients(self.params, self.world)
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        stepped()
        self.optimizer.zero_grad(set_to_none=True)


def layers_of(adapted) -> list[nn.Module]:
    return list(adapted.layout.layer_list)


def shard_model(adapted, precision: str) -> None:
    """FSDP2 over every decoder layer, then the root; gradients reduced by summing in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
    units = layers_of(adapted)
    for layer in units:
        fully_shard(layer, mp_policy=policy)
    fully_shard(adapted, mp_policy=policy)
    for unit in [*units, adapted]:
        unit.set_gradient_divide_factor(1.0)  # a sum: each process's loss is already scaled to its share
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM


def is_partitioned(tensor: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its data is an empty placeholder outside a gathering block)."""
    return hasattr(tensor, "ds_id")


@contextmanager
def gathering(params: list[nn.Parameter]) -> Iterator[None]:
    """Every process: ZeRO-3 parameters among `params` whole inside the block (a collective)."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    from deepspeed.runtime.zero import GatheredParameters

    with GatheredParameters(partitioned):
        yield


def is_sharded(tensor: torch.Tensor) -> bool:
    """A DTensor (FSDP's shard); asked without importing torch.distributed.tensor, which takes seconds and
    must have been imported already if any DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this process (a collective for a sharded one: every process must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def adapter_parameters(adapted, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s parameters keyed as in its saved files (by module path)."""
    return adapted._parameters_of(adapted.records[name])


def gathered_adapter(adapted, name: str) -> dict[str, torch.Tensor]:
    """Every process: the adapter's full tensors, on the CPU, checked against its trainable parameters
    (count, shapes, none empty): an adapter saved from one shard would otherwise look fine."""
    own = adapter_parameters(adapted, name)
    with gathering(list(own.values())):
        full = {key: full_tensor(p.detach()).cpu().clone() for key, p in own.items()}  # compact: a gathered
        # tensor can be a view into a padded buffer, which safetensors refuses
    trainable = {key: p for key, p in own.items() if p.requires_grad}
    if len([k for k in full if k in trainable]) != len(trainable):
        raise AdapterkitError(f"gathering adapter {name!r} gave {len(full)} tensors for {len(trainable)} trainable "
                              "parameters; nothing was saved")
    for key, p in own.items():
        shape = tuple(p.ds_shape if is_partitioned(p) else p.shape)  # a partition's own shape is (0,)
        if tuple(full[key].shape) != shape or full[key].numel() == 0:
            raise AdapterkitError(f"gathering adapter weight {key} gave shape {tuple(full[key].shape)} for a "
                                  f"parameter of shape {shape}; nothing was saved")
    return full


@contextmanager
def root_gathered(adapted) -> Iterator[None]:
    """Every process: the root unit's parameters gathered, so the class's own forward (which skips the
    root's hooks, as the fingerprint calls it) runs; the layers gather theirs as usual, one at a time.
    Under ZeRO-3 every module gathers its own in its forward; the input hooks' parts, which the root uses
    without calling them, are gathered here."""
    if any(is_partitioned(p) for p in adapted.parameters()):
        with gathering(list(adapted.input_hooks.parameters())):
            yield
        return
    sharded = hasattr(adapted, "unshard")
    if sharded:
        adapted.unshard()
    try:
        yield
    finally:
        if sharded:
            adapted.reshard()
