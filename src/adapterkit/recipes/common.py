"""What several recipes share: a model with its adapter ready for inference, and its generation info."""

from __future__ import annotations

import sys

import torch

from ..core import AdaptedModel
from ..io import load
from ..models import load_model
from ..quantization import dequantized

COMPILE_HELP = "torch.compile the model: faster steady state; each new input shape's first call compiles"


def load_for_inference(model_name: str, adapter: str | None, dtype: str = "fp32", force: bool = False,
                       quantize: str = "none", compile: bool = False, dequantize: bool = False):
    """(model or AdaptedModel, tokenizer) ready for generation; `dequantize`: the quantized base's weights
    dequantized into float layers (what merging into it needs)."""
    model, tokenizer = load_model(model_name, dtype, quantize)
    if dequantize and quantize != "none":
        model = dequantized(model)
    if adapter:
        adapted = AdaptedModel(model)
        adapted.tokenizer = tokenizer
        model = load(adapted, adapter, force=force)
    if compile:
        model.compile()  # an AdaptedModel compiles its causal LM, which forward and generate call
        print("torch.compile: on (the first call of each input shape compiles, which takes a while)",
              file=sys.stderr, flush=True)
    return model, tokenizer


def generation_info(tokenizer, template: str) -> dict:
    """What eval and generate need to prompt the adapter as it was trained and to stop where it learnt to."""
    return {"template": template, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "chat_template": tokenizer.chat_template if template == "chat" else None}


def probe_inputs(tokenizer) -> dict[str, torch.Tensor]:
    text = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42."
    ids = tokenizer(text, return_tensors="pt")
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
