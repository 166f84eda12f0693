"""`make demo`: on the default model, evaluate the base on a clean math slice, fine-tune LoRA on the
math training file, evaluate again, and print both accuracies and one generation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterkitError
from ..io.files import write_files
from ..models import DEFAULT_MODEL
from ..resources import LLM_ADAPTERS as DATA
from ..settings import check_fields, option
from ..tasks import contamination
from .common import load_for_inference
from .evaluate import EvalSettings, format_table, run_eval
from .generate import generate
from .train import TrainSettings, train

TRAIN_FILE = DATA / "ft-training_set" / "math_data.json"
SLICE_TASKS = ("AddSub", "MultiArith", "SingleEq", "gsm8k")


def clean_math_slice(size: int) -> list[dict]:
    """`size` math test items whose question is not in the training file (most are), taken in turn
    from AddSub, MultiArith, SingleEq and gsm8k so the slice mixes easy and hard problems."""
    train_records = json.loads(TRAIN_FILE.read_text())
    pools = []
    for task in SLICE_TASKS:
        records = json.loads((DATA / "dataset" / task / "test.json").read_text())
        dirty = contamination(records, train_records)
        pools.append([{**r, "source": task} for i, r in enumerate(records) if i not in dirty])
    chosen: list[dict] = []
    while len(chosen) < size and any(pools):
        for pool in pools:
            if pool and len(chosen) < size:
                chosen.append(pool.pop(0))
    return chosen


@dataclass
class DemoSettings:
    steps: int = option(60, "LoRA training steps", minimum=1)
    output: str = option("runs/demo", "folder for the slice, the adapter and both evaluations")
    items: int = option(100, "math problems evaluated before and after", minimum=1)

    def __post_init__(self) -> None:
        check_fields(self)


def run_demo(settings: DemoSettings) -> None:
    steps, items = settings.steps, settings.items
    if not TRAIN_FILE.is_file():
        raise AdapterkitError(f"demo data not found under {DATA}; reinstall adapterkit (its package data is missing)")
    out = Path(settings.output)
    items_file = out / "clean_math_slice.json"
    write_files(out, {items_file.name: json.dumps(clean_math_slice(items), indent=1)}, {})
    common = dict(data=str(items_file), task_type="math", train_data=str(TRAIN_FILE), batch_size=16,
                  max_new_tokens=160, precision="bf16")
    print(f"1/3 evaluating the base model on {items} math problems that are not in the training data")
    before = run_eval(EvalSettings(DEFAULT_MODEL, None, output=str(out / "eval-base"), **common))
    print(f"2/3 training LoRA for {steps} steps on {TRAIN_FILE.name} (bf16 autocast, fp32 adapter)")
    adapter = out / "lora"
    train(TrainSettings(
        data=str(TRAIN_FILE), output=str(adapter), method="lora", batch_size=8, micro_batch_size=4,
        max_steps=steps, learning_rate=1e-3, warmup_steps=5, val_set_size=0, precision="bf16",
        save_steps=steps, overwrite=True,  # the demo's own folder, rewritten on every run
        method_options={"r": 16, "alpha": 32, "target_modules": "all-linear"}))
    print("3/3 evaluating the fine-tuned model on the same problems")
    after = run_eval(EvalSettings(DEFAULT_MODEL, str(adapter), output=str(out / "eval-lora"), **common))
    before["task"], after["task"] = "base model", "with LoRA"
    print("\n" + format_table([before, after]))
    model, tokenizer = load_for_inference(DEFAULT_MODEL, str(adapter))
    question = json.loads(items_file.read_text())[0]["instruction"]
    print(f"\nquestion: {question}\nanswer with LoRA: {generate(model, tokenizer, [question], max_new_tokens=160)[0]}")
    print(f"\nadapter: {adapter}; evaluations: {out / 'eval-base'}, {out / 'eval-lora'}; loss curve: {adapter / 'loss.png'}")
