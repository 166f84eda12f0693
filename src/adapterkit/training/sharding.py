"""Sharded training through torch.distributed's FSDP2 (`fully_shard`); no sharding of adapterkit's own.

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
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec

import torch
from torch import nn

from ..errors import AdapterkitError

SHARDS = ("none", "fsdp", "zero3")
LAUNCH = "torchrun --nproc-per-node 2 -m adapterkit train ... --shard fsdp"


def check_shard(shard: str, launched: bool, quantize: str) -> None:
    """What `--shard` needs before any work: a process group, an engine that runs here."""
    if shard == "zero3":
        raise AdapterkitError(zero3_missing())
    if shard == "fsdp" and not launched:
        raise AdapterkitError(f"--shard fsdp needs a process group, and this process was started alone; launch it "
                              f"with `{LAUNCH}` (or `accelerate launch --multi_gpu --num_processes 2 -m adapterkit "
                              "train ...`), or use --shard none")
    if shard == "fsdp" and quantize != "none":
        raise AdapterkitError(f"--shard fsdp cannot shard a --quantize {quantize} base (bitsandbytes weights are not "
                              "plain tensors); use --shard none with --quantize, or --shard fsdp without it")


def zero3_missing() -> str:
    """Why `--shard zero3` cannot train here (the one line the flag prints): DeepSpeed is driven through
    accelerate and HF Trainer, not by `adapterkit train`'s own loop."""
    if find_spec("deepspeed") is None:
        return ("--shard zero3 needs DeepSpeed, which is not installed (pip install deepspeed); ZeRO-3 runs through HF "
                "Trainer with the AdaptedModel under `accelerate launch --use_deepspeed --zero_stage 3` (README "
                "'Several processes and sharded training'); --shard fsdp shards the model with torch alone")
    return ("--shard zero3: `adapterkit train` does not drive DeepSpeed itself; run ZeRO-3 through HF Trainer with the "
            "AdaptedModel under `accelerate launch --use_deepspeed --zero_stage 3` (README 'Several processes and sharded "
            "training'), or use --shard fsdp")


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
    full = {key: full_tensor(p.detach()).cpu().clone() for key, p in own.items()}  # compact: a gathered tensor
    # can be a view into a padded buffer, which safetensors refuses
    trainable = {key: p for key, p in own.items() if p.requires_grad}
    if len([k for k in full if k in trainable]) != len(trainable):
        raise AdapterkitError(f"gathering adapter {name!r} gave {len(full)} tensors for {len(trainable)} trainable "
                              "parameters; nothing was saved")
    for key, p in own.items():
        if tuple(full[key].shape) != tuple(p.shape) or full[key].numel() == 0:
            raise AdapterkitError(f"gathering adapter weight {key} gave shape {tuple(full[key].shape)} for a "
                                  f"parameter of shape {tuple(p.shape)}; nothing was saved")
    return full


@contextmanager
def root_gathered(adapted) -> Iterator[None]:
    """Every process: the root unit's parameters gathered, so the class's own forward (which skips the
    root's hooks, as the fingerprint calls it) runs; the layers gather theirs as usual, one at a time."""
    sharded = hasattr(adapted, "unshard")
    if sharded:
        adapted.unshard()
    try:
        yield
    finally:
        if sharded:
            adapted.reshard()
