"""A quantized frozen base through bitsandbytes (transformers' BitsAndBytesConfig): int8 (LLM.int8) or
NF4 with double quantization, QLoRA's format. bitsandbytes has a CPU backend; it is an optional extra.

Adapters never quantize their own weights: LoRA adds its full-precision update to the quantized layer's
output, bottleneck and prompt adapters need nothing quantized. Merging needs float weights: `adapterkit
merge` dequantizes the base the adapter was trained on (`dequantized`), or loads the full-precision one.
"""

from __future__ import annotations

import importlib.util

import torch

from .errors import AdapterkitError

QUANTIZE = ("none", "int8", "nf4")


def quantization_config(kind: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for `kind`, or None for "none"."""
    if kind not in QUANTIZE:
        raise AdapterkitError(f"--quantize must be one of {', '.join(QUANTIZE)}, got {kind!r}")
    if kind == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AdapterkitError(f"--quantize {kind} needs bitsandbytes, which is not installed: "
                              "pip install 'adapterkit[quant]'")
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized(weight: torch.Tensor) -> bool:
    """A stored-quantized weight (int8 or packed 4-bit): it cannot take a float update in place."""
    return not weight.is_floating_point()


def quantized_layers(model: torch.nn.Module) -> int:
    return sum(1 for m in model.modules() if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor)
               and is_quantized(m.weight) and not isinstance(m, torch.nn.Embedding))


def keep_precision(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """In fp32, keep bitsandbytes' 4-bit layers off its packed CPU inference kernel, which computes in bf16
    whatever the model's dtype (activations and block scales rounded to bf16): on its unpacked path a layer
    dequantizes in the input's dtype, the arithmetic of training and of the dequantized base a merge uses
    (greedy decoding about 2x slower on the default model). In bf16 the packed kernel is that precision."""
    if dtype != torch.float32:
        return
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):  # bitsandbytes' own switch (Linear4bit)
            module.support_avx512bf16_for_cpu = False


def dequantized(model: torch.nn.Module) -> torch.nn.Module:
    """The quantized base with its quantized linear layers replaced by float ones holding the dequantized
    weights (transformers' own `dequantize`): the weights an adapter trained on it saw, now mergeable."""
    kind = getattr(model, "adapterkit_quantize", "none")
    model = model.dequantize()
    if quantized_layers(model):
        raise AdapterkitError("the base still has quantized layers after dequantizing; merge with --quantize none")
    # the same weights, but bitsandbytes' CPU kernels compute in bf16 (probe logits about 1% apart), so an
    # adapter's fingerprint from the quantized base is not compared on this one (its identity still is)
    model.adapterkit_quantize = f"{kind}, dequantized"
    return model
