"""`make demo`: fine-tune LoRA on the default model and show a generation before and after."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import AdapterkitError
from .models import DEFAULT_MODEL, load_model
from .recipes import TrainSettings, generate, load_for_inference, train

DATA = Path(__file__).resolve().parents[2] / "data" / "llm-adapters"


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def held_out_questions(count: int) -> list[str]:
    """gsm8k test questions that do not occur in the training file (most of them do)."""
    train_questions = {_normalise(r["instruction"]) for r in json.loads((DATA / "ft-training_set" /
                                                                         "math_data.json").read_text())}
    test = json.loads((DATA / "dataset" / "gsm8k" / "test.json").read_text())
    return [r["instruction"] for r in test if _normalise(r["instruction"]) not in train_questions][:count]


def run_demo(steps: int, output: str) -> None:
    if not DATA.is_dir():
        raise AdapterkitError(f"demo data not found at {DATA}; run the demo from a clone of the repository")
    questions = held_out_questions(2)
    model, tokenizer = load_model(DEFAULT_MODEL)
    before = generate(model, tokenizer, questions, max_new_tokens=96)
    del model
    print(f"\nTraining LoRA on {DATA / 'ft-training_set/math_data.json'} for {steps} steps (bf16 autocast)")
    train(TrainSettings(
        data=str(DATA / "ft-training_set" / "math_data.json"), output=output, method="lora",
        batch_size=8, micro_batch_size=4, max_steps=steps, learning_rate=1e-3, warmup_steps=5,
        precision="bf16", overwrite=True,  # the demo's own folder, rewritten on every run
        method_options={"r": 8, "alpha": 16, "target_modules": "all-linear"}))
    adapted, tokenizer = load_for_inference(DEFAULT_MODEL, output)
    after = generate(adapted, tokenizer, questions, max_new_tokens=96)
    for question, old, new in zip(questions, before, after, strict=True):
        print(f"\n=== question (held out from training)\n{question}")
        print(f"--- base model\n{old}\n--- with the LoRA adapter ({output})\n{new}")
