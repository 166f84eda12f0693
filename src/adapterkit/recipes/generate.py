"""`adapterkit generate`: text from a model, with or without an adapter, streamed as it comes."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from ..data import TEMPLATES, Template, collate
from ..errors import AdapterkitError
from ..io.native import saved_template
from ..models import DEFAULT_MODEL
from ..quantization import QUANTIZE
from ..settings import check_fields, option
from .common import COMPILE_HELP, load_for_inference


@dataclass
class GenerateSettings:
    model: str = option(DEFAULT_MODEL, "base model: the default, a local Hugging Face folder or a hub id")
    adapter: str | None = option(None, "adapter folder (adapterkit's or PEFT's)")
    prompt: str | None = option(None, "the instruction; read from stdin when absent")
    template: str | None = option(None, "alpaca, bare or chat (default: the adapter's, else alpaca)",
                                  choices=TEMPLATES)
    max_new_tokens: int = option(128, "most tokens to generate", minimum=1)
    temperature: float | None = option(None, "sample at this temperature (default: greedy)", above=0)
    top_p: float | None = option(None, "nucleus sampling: keep this much probability mass", above=0, maximum=1)
    force: bool = option(False, "load an adapter trained on another base model")
    quantize: str = option("none", "load the base's linear layers quantized: int8 or nf4", choices=QUANTIZE)
    compile: bool = option(False, COMPILE_HELP)

    def __post_init__(self) -> None:
        check_fields(self)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], template: str = "alpaca", max_new_tokens: int = 128,
             **sampling) -> list[str]:
    """Batched generation (left padding, KV cache); returns only the new text of each prompt."""
    texts = [Template(template).prompt({"instruction": p}, tokenizer) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=template != "chat")["input_ids"] for t in texts]
    batch = collate([{"input_ids": ids} for ids in encoded], tokenizer.pad_token_id, side="left")
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, do_sample=bool(sampling.get("temperature")),
                         **{k: v for k, v in sampling.items() if v is not None})
    new = out[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def run_generate(settings: GenerateSettings) -> str:
    """Generate for one prompt, printing the tokens as they come; returns the text."""
    from transformers import TextStreamer

    prompt = settings.prompt if settings.prompt is not None else sys.stdin.read()
    if not prompt.strip():
        raise AdapterkitError("empty prompt: pass --prompt TEXT or text on stdin")
    template = settings.template or saved_template(settings.adapter) or "alpaca"
    model, tokenizer = load_for_inference(settings.model, settings.adapter, force=settings.force,
                                          quantize=settings.quantize, compile=settings.compile)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    return generate(model, tokenizer, [prompt], template, settings.max_new_tokens,
                    temperature=settings.temperature, top_p=settings.top_p, streamer=streamer)[0]
