"""`adapterkit eval`: batched greedy (or beam) generation over an LLM-Adapters task, scored, with the
train/test contamination count. Task files, answer extraction and scoring are in tasks.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .._version import __version__
from ..data import TEMPLATES, Template, collate, read_records
from ..errors import AdapterkitError
from ..io.files import check_folder_target, write_files
from ..io.native import saved_template
from ..models import DEFAULT_MODEL
from ..quantization import QUANTIZE
from ..settings import check_fields, option
from ..tasks import (
    TASK_TYPES,
    check_task_type,
    contamination,
    extract_answer,
    infer_labels,
    is_correct,
    load_task_records,
    question_of,
    resolve_task,
)
from .common import COMPILE_HELP, load_for_inference

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class EvalSettings:
    model: str = option(DEFAULT_MODEL, "base model: the default, a local Hugging Face folder or a hub id")
    adapter: str | None = option(None, "adapter folder (adapterkit's or PEFT's)")
    task: str | None = option(None, "gsm8k, AddSub, MultiArith, SingleEq, AQuA, mawps, mathqa, boolq, piqa, "
                              "social_i_qa, ARC-Easy, openbookqa, ... (resolves to DIR/dataset/TASK/test.json)")
    data: str | None = option(None, "any test file in LLM-Adapters' JSON format (with --task-type)")
    task_type: str | None = option(None, "how --data answers are scored", choices=TASK_TYPES)
    data_dir: str | None = option(None, "LLM-Adapters' data folder (default: the data bundled with adapterkit)")
    train_data: str | None = option(None, "training file for the contamination check (default: the adapter's "
                                    "run.json)")
    output: str | None = option(None, "folder for results.json and predictions.jsonl (default "
                                "runs/eval/[ADAPTER-]TASK)")
    limit: int | None = option(None, "evaluate only the first N items", minimum=1)
    batch_size: int = option(16, "prompts generated together", minimum=1)
    max_new_tokens: int = option(256, "most tokens generated per answer", minimum=1)
    num_beams: int = option(1, "1: greedy decoding; more: beam search", minimum=1)
    template: str | None = option(None, "alpaca, bare or chat (default: the adapter's, else alpaca)",
                                  choices=TEMPLATES)
    precision: str = option("fp32", "the dtype the model is loaded in", choices=PRECISIONS)
    quantize: str = option("none", "load the base's linear layers quantized: int8 or nf4", choices=QUANTIZE)
    compile: bool = option(False, COMPILE_HELP)
    force: bool = option(False, "load an adapter trained on another base model")
    progress: bool = option(True, "show a progress bar", cli=False)

    def __post_init__(self) -> None:
        check_fields(self)


@torch.no_grad()
def evaluate(model, tokenizer, records: list[dict], task_type: str, template: str = "alpaca",
             batch_size: int = 16, max_new_tokens: int = 256, num_beams: int = 1,
             labels: tuple[str, ...] | None = None, progress: bool = True) -> tuple[list[dict], dict]:
    """Generate an answer for every record (greedy, or beam search with num_beams > 1) and score it.

    Batches are left-padded with an attention mask (generate derives position ids from it), built
    from prompts sorted by length; predictions come back in the records' order.
    Returns (predictions, summary): summary has n, correct, accuracy, ended_fraction, unparsed.
    """
    check_task_type(task_type)
    if min(batch_size, max_new_tokens, num_beams) < 1:
        raise AdapterkitError("batch_size, max_new_tokens and num_beams must be at least 1")
    form = Template(template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    encoded = [tokenizer(form.prompt({"instruction": r.get("instruction", ""), "input": r.get("input") or ""},
                                     tokenizer), add_special_tokens=template != "chat")["input_ids"]
               for r in records]
    order = sorted(range(len(records)), key=lambda i: (-len(encoded[i]), i))  # longest first: OOM shows early
    device = next(model.parameters()).device
    predictions: list[dict | None] = [None] * len(records)
    bar = tqdm(total=len(records), desc="eval", unit="item", disable=not progress)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = collate([{"input_ids": encoded[i]} for i in chunk], pad_id, side="left")
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=num_beams,
                             pad_token_id=pad_id, eos_token_id=eos_id)
        new = out[:, batch["input_ids"].shape[1]:].tolist()
        for tokens, index in zip(new, chunk, strict=True):
            ended = eos_id is not None and eos_id in tokens
            kept = tokens[: tokens.index(eos_id) + 1] if ended else tokens
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            record = records[index]
            pred = extract_answer(text, task_type, labels)
            gold = str(record.get("answer", "")).strip()
            predictions[index] = {"index": index, "input": question_of(record), "output": text,
                                  "prediction": pred, "gold": gold, "correct": is_correct(pred, gold, task_type),
                                  "ended": ended, "new_tokens": len(kept)}
        bar.update(len(chunk))
    bar.close()
    return predictions, summarise(predictions)


def summarise(predictions: list[dict]) -> dict:
    n = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None,
            "ended_fraction": sum(p["ended"] for p in predictions) / n if n else None,
            "unparsed": sum(p["prediction"] is None for p in predictions)}


# ---------------------------------------------------------------- the whole job

def training_file(adapter: str | Path | None, train_data: str | Path | None) -> tuple[Path | None, str | None]:
    """(training file, warning): --train-data, else the `data` setting in the adapter's run.json."""
    if train_data is not None:
        return Path(train_data), None
    run = Path(adapter) / "run.json" if adapter else None
    if run is None or not run.is_file():
        return None, None
    try:
        named = json.loads(run.read_text()).get("settings", {}).get("data")
    except (json.JSONDecodeError, AttributeError):
        return None, f"{run} is not readable JSON; contamination not checked (pass --train-data FILE)"
    if not named:
        return None, None
    for candidate in (Path(named), Path(adapter) / named):
        if candidate.is_file():
            return candidate, None
    return None, f"training file {named} (from {run}) not found; contamination not checked (pass --train-data FILE)"


def run_eval(settings: EvalSettings) -> dict:
    """Evaluate a model (with an adapter) on a task; writes results.json and predictions.jsonl into
    `output` (default runs/eval/[ADAPTER-]TASK) and returns the results."""
    s = settings
    template = s.template or saved_template(s.adapter) or "alpaca"
    name, path, spec, kind = resolve_task(s.task, s.data, s.data_dir, s.task_type)
    folder = Path(s.output) if s.output else Path("runs") / "eval" / (
        f"{Path(s.adapter).name}-{name}" if s.adapter else name)
    check_folder_target(folder)  # before the generation, not after it
    records = load_task_records(path, kind, s.limit)
    labels = spec.labels if spec and spec.type == kind else infer_labels([r["answer"] for r in records], kind)
    train_path, warning = training_file(s.adapter, s.train_data)
    dirty = contamination(records, read_records(train_path)) if train_path else None
    model, tokenizer = load_for_inference(s.model, s.adapter, dtype=s.precision, force=s.force, quantize=s.quantize,
                                          compile=s.compile)
    predictions, summary = evaluate(model, tokenizer, records, kind, template, s.batch_size, s.max_new_tokens,
                                    s.num_beams, labels, s.progress)
    clean = {"contaminated": None, "clean_n": None, "clean_correct": None, "clean_accuracy": None}
    if dirty is not None:
        for p in predictions:
            p["contaminated"] = p["index"] in dirty
        kept = summarise([p for p in predictions if not p["contaminated"]])
        clean = {"contaminated": len(dirty), "clean_n": kept["n"], "clean_correct": kept["correct"],
                 "clean_accuracy": kept["accuracy"]}
    results = {"task": name, "task_type": kind, **summary, **clean, "warnings": [warning] if warning else [],
               "settings": {"model": s.model, "adapter": s.adapter, "data": str(path),
                            "labels": list(labels) if labels else None,
                            "train_data": str(train_path) if train_path else None, "limit": s.limit,
                            "template": template, "batch_size": s.batch_size, "max_new_tokens": s.max_new_tokens,
                            "num_beams": s.num_beams, "dtype": s.precision, "adapterkit_version": __version__}}
    write_files(folder, {"predictions.jsonl": "".join(json.dumps(p) + "\n" for p in predictions),
                         "results.json": json.dumps(results, indent=2) + "\n"}, {})
    results["output"] = str(folder)
    return results


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_table(results: dict | list[dict]) -> str:
    """The printed summary: one row per result, then any warnings."""
    rows = results if isinstance(results, list) else [results]
    head = ("task", "type", "n", "accuracy", "ended", "contaminated", "clean n", "clean accuracy")
    body = [(r["task"], r["task_type"], str(r["n"]), _percent(r["accuracy"]), _percent(r["ended_fraction"]),
             "-" if r.get("contaminated") is None else str(r["contaminated"]),
             "-" if r.get("clean_n") is None else str(r["clean_n"]), _percent(r.get("clean_accuracy")))
            for r in rows]
    widths = [max(len(line[c]) for line in (head, *body)) for c in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
             for line in (head, *body)]
    lines += [f"warning: {w}" for r in rows for w in r.get("warnings", [])]
    return "\n".join(lines)
