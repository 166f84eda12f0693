"""Records, prompt templates, and tokenising with label masks.

Every training example ends with the tokenizer's end token, and that label is kept even when
the pad token is the same token: padding is masked by position, never by token id.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AdapterkitError

IGNORE = -100

# LLM-Adapters' finetune.py prompt, byte for byte (its odd indentation and the lint marker
# inside the string included), so losses and accuracies compare with its published runs.
_ALPACA_HEAD = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                "completes the request.  # no" "qa: E501\n\n")  # split so linters do not read it
_I = "                "


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input:
        return (_ALPACA_HEAD.format(ctx=", paired with an input that provides further context")
                + f"{_I}### Instruction:\n{_I}{instruction}\n{_I}\n{_I}### Input:\n{_I}{input}\n{_I}\n"
                + f"{_I}### Response:\n{_I}")
    return (_ALPACA_HEAD.format(ctx="") + f"{_I}### Instruction:\n{_I}{instruction}\n{_I}\n"
            + f"{_I}### Response:\n{_I}")


def bare_prompt(instruction: str, input: str = "") -> str:
    return f"{instruction}\n{input}\n" if input else f"{instruction}\n"


TEMPLATES = ("alpaca", "bare", "chat")


@dataclass(frozen=True)
class Template:
    """How a record becomes prompt text; `chat` uses the tokenizer's own chat template."""

    name: str = "alpaca"

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise AdapterkitError(f"unknown template {self.name!r}; use one of {', '.join(TEMPLATES)}")

    def prompt(self, record: dict, tokenizer) -> str:
        instruction, extra = record.get("instruction", ""), record.get("input", "") or ""
        if self.name == "alpaca":
            return alpaca_prompt(instruction, extra)
        if self.name == "bare":
            return bare_prompt(instruction, extra)
        if getattr(tokenizer, "chat_template", None) is None:
            raise AdapterkitError("template 'chat' needs a tokenizer with a chat template; use alpaca or bare")
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True, tokenize=False)


def read_records(path: str | Path) -> list[dict]:
    """Records from LLM-Adapters/Alpaca JSON (a list), JSONL, parquet, or a `save_to_disk` dataset folder;
    errors name the record at fault."""
    path = Path(path)
    if path.is_dir():
        records = _hf_dataset_records(path)
    elif not path.is_file():
        raise AdapterkitError(f"data file {path} does not exist")
    elif path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            records = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise AdapterkitError(f"{path}: not a readable parquet file ({exc})") from exc
    elif path.suffix == ".jsonl":
        records = _jsonl_records(path)
    else:
        try:
            records = json.loads(read_text(path))
        except json.JSONDecodeError as exc:
            raise AdapterkitError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from exc
        if not isinstance(records, list):
            raise AdapterkitError(f"{path}: expected a JSON list of records")
    if not records:
        raise AdapterkitError(f"{path}: the dataset is empty")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise AdapterkitError(f"{path}: record {number} lacks a string 'instruction' (and 'output')")
        for key, empty in (("input", (None,)), ("output", ())):  # absent is empty; other values would be printed
            if key in record and record[key] not in empty and not isinstance(record[key], str):
                kind = _JSON_KINDS.get(type(record[key]), type(record[key]).__name__)
                raise AdapterkitError(f"{path}: record {number} has {kind} as '{key}'; it must be text")
    return records


_JSON_KINDS = {dict: "an object", list: "a list", type(None): "null", bool: "true/false", int: "a number",
               float: "a number"}


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (a UTF-8 byte-order mark allowed), or one line naming the file and the fix."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AdapterkitError(f"{path}: cannot read it ({exc.strerror})") from exc
    if _looks_utf16(data):
        raise AdapterkitError(f"{path} is UTF-16 text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        kind = "binary data" if b"\x00" in data[:4096] else "not UTF-8 text (latin-1 or another encoding?)"
        raise AdapterkitError(f"{path}: {kind} at byte {exc.start}; data files must be UTF-8 JSON or JSONL") from exc


def _looks_utf16(data: bytes) -> bool:
    """A UTF-16 byte-order mark, or (without one) text whose every other byte is zero, as ASCII in UTF-16 is."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return True
    head = data[:4096]
    half = len(head) // 2
    return half >= 2 and max(head[0::2].count(0), head[1::2].count(0)) >= 0.9 * half


def data_sha256(path: str | Path) -> str:
    """A hash of a data file, or of every file of a dataset folder: what a run was trained on."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
        digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def _jsonl_records(path: Path) -> list[dict]:
    records = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AdapterkitError(f"{path}: line {number} is not valid JSON ({exc.msg})") from exc
    return records


def _hf_dataset_records(path: Path) -> list[dict]:
    """A folder written by `datasets.Dataset.save_to_disk` (a DatasetDict gives its train split)."""
    if not ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise AdapterkitError(f"{path} is a folder but not a saved Hugging Face dataset (no dataset_info.json)")
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises JSON, Arrow and file errors for a damaged folder
        raise AdapterkitError(f"{path} is not a readable saved Hugging Face dataset ({_first_line(exc)}); "
                              "write it again with Dataset.save_to_disk") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise AdapterkitError(f"{path}: the dataset has splits {list(loaded)} but no 'train' split")
        loaded = loaded["train"]
    return loaded.to_list()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def encode(record: dict, tokenizer, template: Template, cutoff: int = 256,
           train_on_inputs: bool = False) -> dict[str, list[int]]:
    """Token ids and labels of one record: prompt, response, end token; the prompt's labels masked.

    Prompt and response are tokenised apart and joined, so the unmasked labels decode to exactly
    the response followed by the end token.
    """
    prompt_ids = tokenizer(template.prompt(record, tokenizer), add_special_tokens=template.name != "chat")["input_ids"]
    response_ids = tokenizer(record.get("output", ""), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[: cutoff - 1] + [tokenizer.eos_token_id]
    masked = 0 if train_on_inputs else min(len(prompt_ids), len(ids) - 1)  # the end label always stays
    labels = [IGNORE] * masked + ids[masked:]
    kept = max(0, min(len(response_ids), cutoff - 1 - len(prompt_ids)))
    return {"input_ids": ids, "labels": labels, "response_kept": kept, "response_cut": kept < len(response_ids)}


def check_cutoff(examples: list[dict], cutoff: int) -> str | None:
    """A warning counting the examples whose response the cutoff cut away entirely (they then learn only
    the end token); an error when no example keeps any of its response."""
    lost = [e for e in examples if e["response_cut"] and e["response_kept"] == 0]
    if examples and len(lost) == len(examples):
        raise AdapterkitError(f"at --cutoff-len {cutoff} every training record loses its whole response (the "
                              "prompts are longer); raise --cutoff-len")
    if lost:
        return (f"{len(lost)} of {len(examples)} training records lose their whole response at --cutoff-len "
                f"{cutoff} (their prompt is longer) and train only the end token; raise --cutoff-len")
    return None


def collate(examples: list[dict[str, list[int]]], pad_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example; padded positions get attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        span = slice(0, n) if side == "right" else slice(width - n, width)
        ids[row, span] = torch.tensor(example["input_ids"])
        mask[row, span] = 1
        if "labels" in example:
            labels[row, span] = torch.tensor(example["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_batches(lengths: list[int], micro_batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = False) -> list[list[int]]:
    """The micro-batches of one epoch as lists of example indices: a pure function of
    (seed, epoch), so a resumed run sees exactly the batches an uninterrupted run would.

    group_by_length sorts megabatches of 50 micro-batches by length (as HF's sampler) to cut padding.
    A last incomplete micro-batch is dropped, so every step has the same shape.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        mega = 50 * micro_batch_size
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    return [order[start:start + micro_batch_size]
            for start in range(0, len(order) - micro_batch_size + 1, micro_batch_size)]


def split_validation(records: list[dict], size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): `size` records drawn with a fixed seed; size 0 gives no validation."""
    if size <= 0:
        return records, []
    if size >= len(records):
        raise AdapterkitError(f"--val-set-size {size} leaves no training data ({len(records)} records); "
                              "lower it or pass --val-set-size 0")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:size])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]
