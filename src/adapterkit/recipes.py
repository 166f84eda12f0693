"""Whole jobs built from the parts: generate and merge (train.py holds the training recipe)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .core import AdaptedModel
from .data import Template, collate
from .errors import AdapterkitError
from .models import load_model
from .storage import load_adapter


def check_output(path: Path, overwrite: bool, resuming: bool = False) -> None:
    """Refuse a non-empty output folder unless asked (or resuming into it); nothing is created here."""
    if path.exists() and not path.is_dir():
        raise AdapterkitError(f"output {path} exists and is not a folder; choose another --output")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise AdapterkitError(f"output folder {path} is not empty; choose another --output, pass --overwrite"
                              + (", or --resume auto to continue its run" if not resuming else ""))


def load_for_inference(model_name: str, adapter: str | None, dtype: str = "fp32", force: bool = False):
    """(model or AdaptedModel, tokenizer) ready for generation."""
    model, tokenizer = load_model(model_name, dtype)
    if adapter:
        adapted = AdaptedModel(model)
        adapted.tokenizer = tokenizer
        model = load_adapter(adapted, adapter, force=force)
    return model, tokenizer


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


def probe_inputs(tokenizer) -> dict[str, torch.Tensor]:
    text = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42."
    ids = tokenizer(text, return_tensors="pt")
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}


@torch.no_grad()
def merge(model_name: str, adapter: str, output: str, overwrite: bool = False, tolerance: float = 1e-3,
          force: bool = False) -> float:
    """Merge an adapter into the base and write a plain HF checkpoint; refuses one that drifts."""
    out = Path(output)
    check_output(out, overwrite)
    adapted, tokenizer = load_for_inference(model_name, adapter, force=force)
    probe = probe_inputs(tokenizer)
    adapted_info = dict(adapted.generation_info)
    before = adapted(**probe).logits.float()
    plain = adapted.merge_and_unload()
    after = plain(**probe).logits.float()
    drift = (before - after).abs().max().item()
    if not drift <= tolerance:
        raise AdapterkitError(f"merged logits differ from unmerged by {drift:.3g} (> {tolerance}); "
                              "nothing written")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    report = {"adapter": str(adapter), "max_logit_change": drift, "tolerance": tolerance,
              "generation": adapted_info}  # the template and end tokens travel with the merged model
    (tmp / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return drift
