"""Attention for training on a CPU: batched matrix products where torch's fused CPU kernel is slow.

torch's fused ("flash") CPU attention is an efficient forward, but its backward is slow at the head
sizes of small models: on a 2-core avx512_bf16 EPYC, forward and backward of the default model's 30
layers at 8 x 256 tokens take 1.6 s in bf16, against 0.97 s for the same attention written as two
batched bf16 products and a softmax (`python -m adapterkit.bench.profile_step` shows attention's share).
The products keep the [batch, heads, query, key] probabilities for the backward, so this path is taken
only while training (gradients on) in bf16 on a CPU, for attention matrices up to `MAX_SAVED_BYTES` a
layer; everything else (inference, fp32, long sequences, logit soft-capping, attention sinks, dropout)
goes to transformers' own sdpa function unchanged. The mask is the one transformers builds for sdpa.
"""

from __future__ import annotations

import torch

NAME = "adapterkit_cpu"
MAX_SAVED_BYTES = 32 << 20  # one layer's saved probabilities; 8 x 9 heads x 256 x 256 in bf16 is 9 MiB
_HANDLED_KWARGS = {"position_ids", "cache_position", "sliding_window", "output_attentions", "use_cache",
                   "past_key_values", "past_key_value", "is_causal", "output_router_logits"}


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float, causal: bool) -> torch.Tensor:
    """[batch, heads, q, d] attention as baddbmm + softmax + bmm; key and value already have all heads.

    A boolean mask's hidden scores get the dtype's lowest value instead of -inf, so a fully masked row
    (padding in a packed batch) gives finite outputs, not NaN; no label reads those rows. transformers
    passes a mask only where `causal` is off (the mask is then causal itself).
    """
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    low = torch.finfo(query.dtype).min
    bias = torch.zeros(q_len, k_len, dtype=query.dtype, device=query.device)  # broadcast over batch and heads
    if causal:  # queries are the last q_len positions of the keys
        seen = (torch.arange(k_len, device=query.device)[None, :]
                <= torch.arange(k_len - q_len, k_len, device=query.device)[:, None])
        bias = bias.masked_fill(~seen, low)
    if mask is not None:
        mask = mask if mask.dtype != torch.bool else torch.zeros(mask.shape, dtype=query.dtype,
                                                                 device=query.device).masked_fill(~mask, low)
        if mask.shape[0] == mask.shape[1] == 1:
            bias, mask = bias + mask[0, 0].to(query.dtype), None
    scores = torch.baddbmm(bias, query.reshape(batch * heads, q_len, dim),
                           key.reshape(batch * heads, k_len, dim).transpose(1, 2), alpha=scaling)
    if mask is not None:  # one mask a row (padding, packing): added in place, never copied per head
        scores.view(batch, heads, q_len, k_len).add_(mask.to(query.dtype))
    probabilities = torch.softmax(scores, dim=-1)
    out = torch.bmm(probabilities, value.reshape(batch * heads, k_len, dim))
    return out.view(batch, heads, q_len, dim)


def saved_bytes(batch: int, heads: int, q_len: int, k_len: int) -> int:
    """What one layer keeps for its backward on the matmul path (bf16 probabilities), 0 where the path
    is not taken for that size; `adapterkit plan` counts it."""
    size = batch * heads * q_len * k_len * 2
    return size if q_len > 1 and size <= MAX_SAVED_BYTES else 0


def takes_matmul_path(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> bool:
    batch, heads, q_len, _ = query.shape
    return (query.device.type == "cpu" and query.dtype == torch.bfloat16 and torch.is_grad_enabled()
            and query.requires_grad and dropout == 0.0 and saved_bytes(batch, heads, q_len, key.shape[2]) > 0
            and all(name in _HANDLED_KWARGS or value is None or value is False for name, value in kwargs.items()))


def cpu_training_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature; returns ([batch, q, heads, d], None) like sdpa's."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if not takes_matmul_path(query, key, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, :key.shape[2]]
    out = matmul_attention(query, key, value, attention_mask, scaling, causal and attention_mask is None)
    return out.transpose(1, 2).contiguous(), None


def applies_to(model) -> bool:
    """Whether `install` reroutes this model: it runs sdpa through transformers' attention functions
    (not eager by choice, nor a model class with attention code of its own). `adapterkit plan` asks too."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == "sdpa" and model._can_set_attn_implementation()


def install(model) -> None:
    """Route a model's sdpa attention through `cpu_training_attention` (models on eager attention, or
    another kernel, keep theirs). transformers' registries are keyed by name, so other models in the
    process (a PEFT comparison) keep plain sdpa."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if not applies_to(model):
        return
    AttentionInterface.register(NAME, cpu_training_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
