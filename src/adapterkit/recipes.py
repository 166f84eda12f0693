"""Whole jobs built from the parts: train, generate, merge, info. The CLI only parses and prints."""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import __version__
from .config import get_method
from .core import AdaptedModel, adapt
from .data import Template, collate, encode, read_records
from .errors import AdapterkitError
from .models import DEFAULT_MODEL, load_model
from .storage import load_adapter, write_files
from .training import train_steps


@dataclass
class TrainSettings:
    """Settings of `adapterkit train`; names follow LLM-Adapters' finetune.py."""

    data: str
    output: str
    method: str = "lora"
    model: str = DEFAULT_MODEL
    batch_size: int = 16
    micro_batch_size: int = 4
    num_epochs: int = 1
    max_steps: int | None = None
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    cutoff_len: int = 256
    train_on_inputs: bool = False
    template: str = "alpaca"
    limit: int | None = None
    seed: int = 42
    precision: str = "fp32"
    overwrite: bool = False
    method_options: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.micro_batch_size <= 0 or self.batch_size <= 0:
            raise AdapterkitError("batch sizes must be positive")
        if self.batch_size % self.micro_batch_size:
            raise AdapterkitError(f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size "
                                  f"{self.micro_batch_size}; make it one (e.g. {self.micro_batch_size * 4})")
        if self.precision not in ("fp32", "bf16"):
            raise AdapterkitError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        Template(self.template)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless asked; checked before any work, nothing created yet."""
    if path.exists() and not path.is_dir():
        raise AdapterkitError(f"output {path} exists and is not a folder; choose another --output")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise AdapterkitError(f"output folder {path} is not empty; choose another --output or pass --overwrite")


def clear_output(path: Path) -> None:
    """Empty the output folder (when overwriting), only once there is something new to write."""
    if path.is_dir():
        shutil.rmtree(path)


def method_config(method: str, options: dict):
    spec = get_method(method)
    known = {o.name: o for o in spec.config_class.options()}
    unknown = [k for k in options if k not in known]
    if unknown:
        raise AdapterkitError(f"{known_flag(unknown[0])} is not an option of {method}; "
                              f"see `adapterkit methods` for its options")
    return spec.config_class(**options)


def known_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_length(adapted, cutoff: int, virtual: int) -> None:
    """Learned absolute positions bound the length: say so before training, not at the first long batch."""
    limit = adapted.layout.shape.max_positions
    if limit is not None and cutoff + virtual > limit:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise AdapterkitError(f"--cutoff-len {cutoff}{extra} exceeds the model's {limit} positions; "
                              f"use --cutoff-len {limit - virtual} or less")


def micro_batches(examples: list[dict], size: int, pad_id: int, seed: int) -> Iterator[dict]:
    """Endless shuffled micro-batches, reshuffled each epoch from a fixed seed."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1, size):
            yield collate([examples[i] for i in order[start:start + size]], pad_id)


def train(settings: TrainSettings) -> dict:
    """Fine-tune one adapter and save it with its metrics; returns a summary."""
    settings.validate()
    config = method_config(settings.method, settings.method_options)
    output = Path(settings.output)
    check_output(output, settings.overwrite)
    records = read_records(settings.data)[: settings.limit]
    torch.manual_seed(settings.seed)
    model, tokenizer = load_model(settings.model, "bf16" if settings.precision == "bf16" else "fp32")
    template = Template(settings.template)
    examples = [encode(r, tokenizer, template, settings.cutoff_len, settings.train_on_inputs) for r in records]
    adapted = adapt(model, config, tokenizer=tokenizer)
    check_length(adapted, settings.cutoff_len, getattr(config, "num_virtual_tokens", 0))
    accumulation = settings.batch_size // settings.micro_batch_size
    steps = settings.max_steps or max(1, settings.num_epochs * len(examples) // settings.batch_size)
    print(f"{settings.method}: {adapted.report()}; {len(examples)} examples, {steps} steps", flush=True)
    bar = tqdm(total=steps, desc="train", unit="step")
    metrics = []

    def log(step: int, loss: float) -> None:
        metrics.append({"step": step + 1, "loss": loss, "time": time.time()})
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)

    batches = micro_batches(examples, settings.micro_batch_size, tokenizer.pad_token_id, settings.seed)
    losses = train_steps(adapted, batches, steps, settings.learning_rate, settings.warmup_steps, accumulation,
                         autocast=torch.bfloat16 if settings.precision == "bf16" else None, on_step=log)
    bar.close()
    clear_output(output)
    adapted.save(output)
    run = {"settings": asdict(settings), "adapter_config": config.to_dict(), "adapterkit_version": __version__,
           "final_loss": losses[-1], "first_loss": losses[0]}
    write_files(output, {"metrics.jsonl": "".join(json.dumps(m) + "\n" for m in metrics),
                         "run.json": json.dumps(run, indent=2) + "\n"}, {})
    return run


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
    (tmp / "merge_report.json").write_text(json.dumps({"adapter": str(adapter), "max_logit_change": drift}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return drift
