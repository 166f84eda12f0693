"""Losses of causal LM training: next-token cross-entropy over labelled positions."""

from __future__ import annotations

import torch
from torch import nn


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, in fp32."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return nn.functional.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)


def labelled_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The causal LM loss with logits computed only where a label exists (transformers' boolean
    `logits_to_keep`): the output projection over the vocabulary (49k rows for the default model)
    skips the prompt and padding. Equal to `causal_lm_loss` of the full logits."""
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != -100
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}  # packed rows
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep,
                   **extra).logits
    logits = logits.reshape(-1, logits.shape[-1])
    wanted = targets[targets != -100]
    if wanted.numel() == 0:
        return logits.sum() * 0.0
    if logits.dtype in (torch.bfloat16, torch.float16):
        return LowPrecisionCrossEntropy.apply(logits, wanted)
    return nn.functional.cross_entropy(logits, wanted)


_LOSS_BLOCK_ROWS = 128  # 128 x 49k fp32 = 25 MB a block


class LowPrecisionCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of bf16/fp16 logits, computed in fp32 a block of rows at a time.

    `cross_entropy(logits.float())` keeps an fp32 copy and an fp32 log-softmax of every row (about
    0.5 GB for 1,200 labelled tokens over 49k words) and makes several passes over them; this keeps
    only the low-precision logits, runs torch's fused upcasting (log-)softmax on one block at a time,
    and writes the gradient straight into the logits' dtype: several times faster, the same loss and
    gradient up to fp32 rounding.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, targets)
        picked = [torch.log_softmax(block, dim=-1, dtype=torch.float32).gather(1, wanted[:, None])
                  for block, wanted in zip(logits.split(_LOSS_BLOCK_ROWS), targets.split(_LOSS_BLOCK_ROWS),
                                           strict=True)]
        return -torch.cat(picked).mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets = ctx.saved_tensors
        scale = grad_output.float() / logits.shape[0]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], _LOSS_BLOCK_ROWS):
            rows = slice(start, start + _LOSS_BLOCK_ROWS)
            probs = torch.softmax(logits[rows], dim=-1, dtype=torch.float32)
            probs[torch.arange(probs.shape[0]), targets[rows]] -= 1.0
            grad[rows] = probs.mul_(scale)
        return grad, None
