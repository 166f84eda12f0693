"""`train --shard zero3`: the loop's steps run by DeepSpeed's engine with ZeRO stage 3; no sharding of our own.

`deepspeed.initialize` partitions every parameter of the AdaptedModel over the processes (the frozen
base as well as the adapter) and gathers each module's parameters around its forward. The loop's
semantics stay those of `Steps` (sharding.py): each process runs its micro-batches of the global batch,
gradients are summed over all of them (DeepSpeed averages over processes, so each loss is scaled by the
number of processes as well), clipped to the same norm, the same torch AdamW and LambdaLR schedule step
once per global batch. On a CPU DeepSpeed's CPU accelerator talks over the gloo group the loop joined.

Checkpoints are unsharded ones (io/checkpoint.py): the adapter and AdamW's moments gathered whole per
parameter (`FullOptimizer`), written by the first process as safetensors; DeepSpeed's own checkpoint
(torch.save pickles) is not used. A resumed run loads them before the engine partitions the model, and
the moments are handed to DeepSpeed's partitions after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from ..errors import AdapterkitError
from .distributed import World
from .sharding import Steps

QUIET = 10**9  # DeepSpeed's periodic progress lines: never (the loop prints its own)


class Zero3Steps(Steps):
    """The engine's backward and step; `model` is the engine (its forward gathers the partitions)."""

    def __init__(self, adapted: nn.Module, params: list, optimizer, scheduler, world: World, micro: int,
                 per_process: int, max_grad_norm: float = 1.0):
        import deepspeed
        from deepspeed.utils import logger

        logger.setLevel(logging.WARNING)
        config = {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": per_process,  # the engine steps once per global batch
            "train_batch_size": micro * per_process * world.size,
            "gradient_clipping": max_grad_norm,  # DeepSpeed's clip is torch's: max_norm / (norm + 1e-6), capped at 1
            # memory_efficient_linear would replace torch.nn.functional.linear for the whole process with
            # DeepSpeed's own autograd function: a patch of torch that outlives the run
            "zero_optimization": {"stage": 3, "memory_efficient_linear": False},
            "zero_allow_untested_optimizer": True,  # torch's AdamW, the one every other run uses
            "steps_per_print": QUIET,
            "wall_clock_breakdown": False,
        }
        resumed = {i: dict(optimizer.state[p]) for i, p in enumerate(params) if optimizer.state.get(p)}
        optimizer.state.clear()  # moments of a resumed run move to the partitions below
        sizes = [len(group["params"]) for group in optimizer.param_groups]
        engine, _, _, _ = deepspeed.initialize(model=adapted, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, dist_init_required=False)
        super().__init__(engine, params, FullOptimizer(optimizer, params, sizes), scheduler, world, max_grad_norm)
        self.engine = engine
        if resumed:  # the fp32 partitions AdamW steps on (DeepSpeed's attribute: no public accessor in 0.19.8)
            self.optimizer.restore(engine.optimizer.fp32_partitioned_groups_flat, resumed)

    def backward(self, loss: torch.Tensor, scale: float) -> None:
        # scale_wrt_gas off: `scale` is already this micro-batch's share of the global batch
        self.engine.backward(loss * (scale * self.world.size), scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # counts the micro-batch; the update waits for step(), after the loss check

    def step(self, stepped: Callable[[], None] = lambda: None) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            raise AdapterkitError("DeepSpeed's engine is not at the end of a global batch: the micro-batches of "
                                  "this step do not match its accumulation steps; nothing was updated")
        self.engine.step()
        if not self.engine.was_step_applied():
            raise AdapterkitError("DeepSpeed skipped an optimizer step; stopped rather than train on silently")
        stepped()  # DeepSpeed has cleared the gradients (a method that reads them refuses --shard)


class FullOptimizer:
    """The ZeRO-3 run's AdamW as a torch AdamW of one process holds it: `state_dict()` gathers each
    trainable parameter's whole moments, indexed as make_optimizer's parameters (every process calls it)."""

    def __init__(self, optimizer, params: list, sizes: list[int]):
        self.optimizer, self.params, self.sizes = optimizer, params, sizes

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        steps = {float(slots["step"]) for slots in self.optimizer.state.values()}  # one per partition
        if len(steps) != 1:
            raise AdapterkitError(f"DeepSpeed's partitions have taken {sorted(steps)} AdamW steps; nothing saved")
        step, state = steps.pop(), {}
        for index, p in enumerate(self.params):
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
            if any(m is None or m.numel() != p.ds_numel for m in moments.values()):
                raise AdapterkitError(f"gathering AdamW's moments of parameter {index} from DeepSpeed's partitions "
                                      "failed; nothing was saved")
            state[index] = {"step": torch.tensor(step),
                            **{k: m.detach().cpu().reshape(p.ds_shape).clone() for k, m in moments.items()}}
        groups, start = [], 0
        for group, size in zip(self.optimizer.param_groups, self.sizes, strict=True):
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": list(range(start, start + size))})
            start += size
        return {"state": state, "param_groups": groups}

    def restore(self, partitions: list[torch.Tensor], resumed: dict[int, dict]) -> None:
        """Give DeepSpeed's fp32 partitions the moments a checkpoint loaded (AdamW creates them lazily)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if sorted(resumed) != list(range(len(self.params))):
            raise AdapterkitError(f"the checkpoint has AdamW moments for {len(resumed)} of {len(self.params)} "
                                  "parameters; resume with the settings it was saved with")
        step = resumed[0]["step"].detach().clone()
        for flat in partitions:
            self.optimizer.state[flat] = {"step": step.clone(), "exp_avg": torch.zeros_like(flat),
                                          "exp_avg_sq": torch.zeros_like(flat)}
        for index, p in enumerate(self.params):
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, resumed[index][key].reshape(-1), key)
