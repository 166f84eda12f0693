"""Losses of causal LM training: next-token cross-entropy over labelled positions."""

from __future__ import annotations

import os

import torch
from torch import nn


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, in fp32."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return nn.functional.cross_entropy(shift_logits, labels[:, 1:].reshape(-1), ignore_index=-100)


def labelled_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The causal LM loss with logits computed only where a label exists (transformers' boolean
    `logits_to_keep`): the output projection over the vocabulary (49k rows for the default model)
    skips the prompt and padding. Equal to `causal_lm_loss` of the full logits.

    While training through a plain frozen head (`fused_head`), the loss takes the head's input rows
    as the model's forward reaches the head (a pre-hook: parameters a sharded model gathers for its
    forward are there) and runs head and loss fused; the head itself then computes no rows.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = targets != -100
    wanted = targets[targets != -100]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": keep,
              **({"position_ids": batch["position_ids"]} if "position_ids" in batch else {})}  # packed rows
    head = fused_head(model) if torch.is_grad_enabled() and wanted.numel() else None
    if head is not None:
        taken = []

        @torch.compiler.disable  # a compiled model (--compile) runs the fused loss eagerly, at a graph break
        def take_rows(module: nn.Module, args: tuple) -> tuple:
            (rows,) = args  # the hidden states at the kept positions, in the logits' order
            taken.append(head_cross_entropy(rows.reshape(-1, rows.shape[-1]), module, wanted))
            return (rows[..., :0, :],)

        handle = head.register_forward_pre_hook(take_rows)
        try:
            model(**inputs)
        finally:
            handle.remove()
        if len(taken) != 1:
            raise RuntimeError(f"the output head ran {len(taken)} times in one forward; expected once")
        return taken[0]
    logits = model(**inputs).logits
    logits = logits.reshape(-1, logits.shape[-1])
    if wanted.numel() == 0:
        return logits.sum() * 0.0
    if logits.dtype in (torch.bfloat16, torch.float16):
        return LowPrecisionCrossEntropy.apply(logits, wanted)
    return nn.functional.cross_entropy(logits, wanted)


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The output head, where the loss may take it over: an adapted model of a family whose logits are
    the head's output unchanged (`ModelLayout.plain_head`), the head a plain frozen `nn.Linear` (not an
    adapter's site, not quantized, not partitioned by DeepSpeed ZeRO-3, whose coordinator expects the
    head's backward); an FSDP root gathers the head before the loss's hook runs. None otherwise, or with
    ADAPTERKIT_FUSED_LOSS=0: the model computes its logits."""
    from ..core import AdaptedModel

    if os.environ.get("ADAPTERKIT_FUSED_LOSS", "1") == "0":  # the logits path, for comparisons
        return None
    adapted = getattr(model, "module", model)  # the model a DDP (or DeepSpeed) wrapper holds
    if not isinstance(adapted, AdaptedModel) or not adapted.layout.plain_head:
        return None
    head = adapted.causal_lm.get_output_embeddings()
    if type(head) is not nn.Linear or hasattr(head.weight, "ds_status"):  # ZeRO-3 tracks each module's backward
        return None
    frozen = not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
    return head if frozen else None


def head_cross_entropy(rows: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `head(rows)` against `targets`, in the dtype autocast would give the head."""
    device = rows.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    bias = head.bias.to(dtype) if head.bias is not None else None
    return FusedHeadCrossEntropy.apply(rows.to(dtype), head.weight.to(dtype), bias, targets)


LOSS_BLOCK_ROWS = 128  # 128 x 49k fp32 = 25 MB a block


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
                  for block, wanted in zip(logits.split(LOSS_BLOCK_ROWS), targets.split(LOSS_BLOCK_ROWS),
                                           strict=True)]
        return -torch.cat(picked).mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, targets = ctx.saved_tensors
        scale = grad_output.float() / logits.shape[0]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], LOSS_BLOCK_ROWS):
            rows = slice(start, start + LOSS_BLOCK_ROWS)
            probs = torch.softmax(logits[rows], dim=-1, dtype=torch.float32)
            probs[torch.arange(probs.shape[0]), targets[rows]] -= 1.0
            grad[rows] = probs.mul_(scale)
        return grad, None


class FusedHeadCrossEntropy(torch.autograd.Function):
    """The output head and the mean cross-entropy in one pass over blocks of rows, for a frozen head.

    Each block's logits (rows x vocabulary) live only while the block is computed: the forward takes
    the block's log-softmax in fp32, and since the head is frozen the only gradient is the rows', which
    is `(softmax - one_hot) @ W`: it is computed right there, and the backward just scales it. Against
    logits then loss, this keeps no [rows, vocabulary] tensor for the backward (98 KB a labelled token
    in bf16 for the default model's 49k words, twice with the gradient) and makes fewer passes over
    them, for the same products. Gradients are rounded to the rows' dtype, as autograd's would be.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        count = rows.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        grad = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        for start in range(0, count, LOSS_BLOCK_ROWS):
            block, picked = rows[start:start + LOSS_BLOCK_ROWS], targets[start:start + LOSS_BLOCK_ROWS]
            log_probs = torch.log_softmax(nn.functional.linear(block, weight, bias), dim=-1, dtype=torch.float32)
            total -= log_probs.gather(1, picked[:, None]).sum()
            if grad is not None:
                probs = log_probs.exp_()
                probs[torch.arange(picked.shape[0], device=picked.device), picked] -= 1.0
                grad[start:start + picked.shape[0]] = probs.div_(count).to(rows.dtype) @ weight
        ctx.save_for_backward(grad)
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul(grad_output.item()), None, None, None  # a Python number: no rounding to bf16
