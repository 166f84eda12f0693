"""The training loop: AdamW, warmup + linear decay, gradient accumulation and clipping.

Kept to one screen; the `train` recipe (recipes.py) adds data, checkpoints and logging around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .errors import AdapterkitError


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, in fp32."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return nn.functional.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def train_steps(model: nn.Module, batches: Iterator[list[dict]], steps: int, lr: float = 3e-4,
                warmup: int = 0, accumulation: int = 1, max_grad_norm: float = 1.0,
                autocast: torch.dtype | None = None,
                on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Run `steps` optimizer steps; each takes `accumulation` micro-batches. Returns the losses.

    `autocast` (e.g. torch.bfloat16) wraps each forward only: autocast caches its casts of the
    weights until its block ends, so a block around the optimizer step would keep using stale
    low-precision copies of the adapter and the adapter would stop changing the model.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise AdapterkitError("no trainable parameters: was the adapter loaded with trainable=False?")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, steps))
    model.train()
    losses = []
    for step in range(steps):
        total = 0.0
        for _ in range(accumulation):
            batch = next(batches)
            with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = causal_lm_loss(logits, batch["labels"]) / accumulation
            loss.backward()
            total += loss.item()
        if not math.isfinite(total):
            raise AdapterkitError(f"loss became {total} at step {step + 1}; lower the learning rate")
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if on_step:
            on_step(step, total)
    model.eval()
    return losses
