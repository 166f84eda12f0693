"""The training loop: AdamW, warmup + linear decay, gradient accumulation, clipping, NaN guard.

`fit` is the loop of the `train` recipe (recipes/train.py adds data, validation, checkpoints and
logging around it through `after_step`); `train_steps` is the same loop for a plain iterator of
batches, for tests and notebooks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..errors import AdapterkitError
from .allocator import release_free_memory, tune_allocator
from .distributed import World, sum_across
from .loss import labelled_loss
from .sharding import Steps


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def make_optimizer(model: nn.Module, lr: float, warmup: int, total: int):
    groups = model.optimizer_groups(lr) if hasattr(model, "optimizer_groups") else \
        [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    params = [p for group in groups for p in group["params"]]
    if not params:
        raise AdapterkitError("no trainable parameters: was the adapter loaded with trainable=False?")
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    return params, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, total))


def micro_step(model: nn.Module, batch: dict, scale: float, autocast: torch.dtype | None,
               backward: Callable[[torch.Tensor, float], None] | None = None) -> tuple[float, int]:
    """Forward and backward of one micro-batch; returns (its mean loss, its tokens, padding excluded).

    `autocast` wraps the forward only: autocast caches its casts of the weights until its block
    ends, so a block around the optimizer step would keep stale copies of the adapter weights.
    """
    with torch.autocast(batch["input_ids"].device.type, dtype=autocast or torch.bfloat16,
                        enabled=autocast is not None):
        loss = labelled_loss(model, batch)
    release_free_memory()  # with checkpointing: the forward's freed heap, before the backward's peak
    extra = model.extra_loss() if hasattr(model, "extra_loss") else None  # a method's regulariser, in fp32
    if extra is not None:
        loss = loss + extra
    if backward is None:
        (loss * scale).backward()
    else:
        backward(loss, scale)
    tokens = batch["tokens"] if "tokens" in batch else batch["attention_mask"].sum()  # packed rows count their own
    return loss.item(), int(tokens)


def fit(steps: Steps, micro_batches: Callable[[int], list[dict]], start: int, total: int, world: World,
        accumulation: int, autocast: torch.dtype | None = None,
        after_step: Callable[[int, float, int], None] | None = None) -> None:
    """Optimizer steps start..total-1; `micro_batches(step)` gives this process's share of a step;
    `steps` runs the backward and the step (sum, clip, AdamW, schedule: plain torch or DeepSpeed's). An
    AdaptedModel's methods take part through its hooks: start_training(total), extra_loss() added to each
    micro-batch's loss, after_optimizer_step(step) while the gradients are still there."""
    model = steps.model
    tune_allocator(checkpointing=bool(getattr(getattr(model, "module", model), "is_gradient_checkpointing", False)))
    hooks = hasattr(model, "after_optimizer_step")
    if hooks:
        model.start_training(total)
    model.train()
    for step in range(start, total):
        losses = torch.zeros(2, dtype=torch.float64)  # sum of micro-batch losses, tokens
        for batch in micro_batches(step):
            loss, tokens = micro_step(model, batch, 1.0 / accumulation, autocast, steps.backward)
            losses += torch.tensor([loss, tokens], dtype=torch.float64)
        loss_sum, tokens = sum_across(losses, world).tolist()
        loss = loss_sum / accumulation
        if not math.isfinite(loss):
            raise AdapterkitError(f"loss became {loss} at step {step + 1}: stopped before it reached the "
                                  "weights; lower --learning-rate or check the data")
        steps.step(functools.partial(model.after_optimizer_step, step) if hooks else lambda: None)
        if after_step:
            after_step(step + 1, loss, int(tokens))
    model.eval()


def train_steps(model: nn.Module, batches: Iterator[dict], steps: int, lr: float = 3e-4, warmup: int = 0,
                accumulation: int = 1, max_grad_norm: float = 1.0, autocast: torch.dtype | None = None,
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """`steps` optimizer steps over an iterator of batches, one process. Returns the losses."""
    params, optimizer, scheduler = make_optimizer(model, lr, warmup, steps)
    losses: list[float] = []

    def record(step: int, loss: float, tokens: int) -> None:
        losses.append(loss)
        if on_step:
            on_step(step - 1, loss)

    fit(Steps(model, params, optimizer, scheduler, World(), max_grad_norm),
        lambda step: [next(batches) for _ in range(accumulation)], 0, steps, World(), accumulation, autocast, record)
    return losses
