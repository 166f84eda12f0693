"""LLM-Adapters' tasks: their files, answer extraction, scoring and train/test contamination.
(The evaluation job itself, batched generation over a task, is recipes/evaluate.py.)

Answer extraction follows LLM-Adapters' evaluate scripts where they are right (math: a number
within 0.001 of the gold; commonsense: the first label of the task's pattern) and departs where they
are wrong: for option letters LLM-Adapters takes the first capital A-E anywhere, so "As a result,
the answer is (C)" scores as "A". Here an explicit "answer is X" / "(X)" / "X)" wins, then the last
standalone option letter; a letter inside a word is never taken.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from .data import read_records
from .errors import AdapterkitError
from .resources import LLM_ADAPTERS as BUNDLED_DATA

TASK_TYPES = ("math", "choice", "boolean")
LETTERS = ("A", "B", "C", "D", "E")
MATH_TOLERANCE = 1e-3  # LLM-Adapters: |pred - gold| < 0.001


def _numbered(word: str, count: int) -> tuple[str, ...]:
    return tuple(f"{word}{i}" for i in range(1, count + 1))


@dataclass(frozen=True)
class Task:
    type: str
    labels: tuple[str, ...] | None = None


_MATH, _ANSWERS = Task("math"), Task("choice", _numbered("answer", 5))
TASKS: dict[str, Task] = {
    "gsm8k": _MATH, "AddSub": _MATH, "MultiArith": _MATH, "SingleEq": _MATH, "SVAMP": _MATH, "mawps": _MATH,
    "AQuA": Task("choice", LETTERS), "mathqa": Task("choice", LETTERS),
    "boolq": Task("boolean", ("true", "false")),
    "piqa": Task("choice", _numbered("solution", 2)),
    "social_i_qa": _ANSWERS, "ARC-Easy": _ANSWERS, "ARC-Challenge": _ANSWERS, "openbookqa": _ANSWERS,
    "hellaswag": Task("choice", _numbered("ending", 4)),
    "winogrande": Task("choice", _numbered("option", 2)),
}
_LABEL_FAMILIES = {"answer": 5, "solution": 2, "ending": 4, "option": 2}


def get_task(name: str) -> tuple[str, Task]:
    """(canonical name, task); names match case-insensitively ("aqua" is AQuA)."""
    for known, task in TASKS.items():
        if known.lower() == name.lower():
            return known, task
    raise AdapterkitError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)} "
                          f"(any file in their JSON format works with --data FILE --task-type math|choice|boolean)")


# ---------------------------------------------------------------- answer extraction

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?")
_ANSWER_IS = re.compile(r"(?i:answer)(?:\s+is|\s*[:=])")
_SENTENCE_END = re.compile(r"\.(?!\d)|\n")


def parse_number(text: str) -> float | None:
    """The number a model means: the last one in the sentence after the last "answer is", else the
    last one in the text. Thousands commas, "$", signs, decimals and plain fractions (3/4) are read."""
    text = _THOUSANDS.sub("", text)
    found = list(_ANSWER_IS.finditer(text))
    if found:
        tail = text[found[-1].end():].lstrip(" :=$\t")
        end = _SENTENCE_END.search(tail)
        numbers = _NUMBER.findall(tail[: end.start()] if end else tail)
        if numbers:
            return _to_float(numbers[-1])
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(token: str) -> float | None:
    top, _, bottom = token.partition("/")
    try:
        value = float(top) / float(bottom) if bottom else float(top)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def extract_letter(text: str, letters: tuple[str, ...] = LETTERS) -> str | None:
    """An option letter: "answer is X" / "answer: (x)" first, then the last "(X)" or "X)", then the
    last standalone capital option letter (not a sentence-initial article "A man ...")."""
    upper = "".join(letters)
    both = upper + upper.lower()
    explicit = re.compile(rf"(?i:answer)(?:\s+(?i:choice|option))?(?:\s+(?i:is))?\s*[:=]?\s*(?:(?i:option)\s+)?"
                          rf"(?:\(([{both}])\)|([{upper}])(?![\w']))")
    found = explicit.findall(text)
    if found:
        return "".join(found[-1]).upper()
    bracketed = re.findall(rf"\(([{both}])\)|(?<![\w(])([{upper}])\)", text)
    if bracketed:
        return "".join(bracketed[-1]).upper()
    standalone = [m for m in re.finditer(rf"(?<![\w'])([{upper}])(?![\w'])", text)
                  if not (m.group(1) == "A" and _is_article(text, m))]
    return standalone[-1].group(1) if standalone else None


def _is_article(text: str, match: re.Match) -> bool:
    before, after = text[: match.start()].rstrip(), text[match.end():]
    return (not before or before[-1] in ".!?:\n") and re.match(r"\s+[a-z]", after) is not None


def extract_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The first of the labels (answer1, solution2, true, ...) found as a whole word, any case."""
    pattern = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    match = re.search(rf"(?<![A-Za-z0-9])({pattern})(?![A-Za-z0-9])", text, re.IGNORECASE)
    return match.group(1).lower() if match else None


def extract_answer(text: str, task_type: str, labels: tuple[str, ...] | None = None) -> str | None:
    """The parsed answer of a generation as a string (math: a number like "576" or "-3.5"), or None."""
    check_task_type(task_type)
    if task_type == "math":
        value = parse_number(text)
        return None if value is None else _format_number(value)
    if task_type == "boolean":
        return extract_label(text, labels or ("true", "false"))
    labels = labels or LETTERS
    if all(len(label) == 1 and label.isupper() for label in labels):
        return extract_letter(text, labels)
    return extract_label(text, labels)


def is_correct(pred: str | None, gold, task_type: str) -> bool:
    """Math: within 0.001 of the gold number; choice and boolean: the same label, any case."""
    check_task_type(task_type)
    if pred is None:
        return False
    if task_type == "math":
        a, b = _to_float(str(pred)), _to_float(_THOUSANDS.sub("", str(gold)).strip())
        return a is not None and b is not None and abs(a - b) < MATH_TOLERANCE
    return str(pred).strip().lower() == str(gold).strip().lower()


def check_task_type(task_type: str) -> None:
    if task_type not in TASK_TYPES:
        raise AdapterkitError(f"unknown task type {task_type!r}; use one of {', '.join(TASK_TYPES)}")


# ---------------------------------------------------------------- contamination

def normalise_question(text: str) -> str:
    """Lowercase, whitespace collapsed, punctuation stripped at both ends."""
    return re.sub(r"\s+", " ", text.lower()).strip().strip(".,;:!?'\"()[] ").strip()


def question_of(record: dict) -> str:
    extra = record.get("input") or ""
    return f"{record.get('instruction', '')}\n{extra}" if extra else record.get("instruction", "")


def contamination(records: list[dict], train_records: list[dict]) -> set[int]:
    """Indices of the records whose normalised question also occurs in the training records."""
    seen = {normalise_question(question_of(r)) for r in train_records}
    return {i for i, r in enumerate(records) if normalise_question(question_of(r)) in seen}


# ---------------------------------------------------------------- tasks and records

def resolve_task(task: str | None = None, data: str | Path | None = None, data_dir: str | Path | None = None,
                 task_type: str | None = None) -> tuple[str, Path, Task | None, str]:
    """(name, test file, known task or None, task type) from the --task/--data/--data-dir/--task-type flags."""
    if task_type is not None:
        check_task_type(task_type)
    if data is not None:
        if task_type is None and not task:
            raise AdapterkitError("--data FILE needs --task-type math|choice|boolean (or a known --task name)")
        known = get_task(task) if task and (task_type is None or task.lower() in map(str.lower, TASKS)) else None
        name, spec = known if known else (task or Path(data).stem, None)
        return name, Path(data), spec, task_type or spec.type
    if not task:
        raise AdapterkitError("no task: pass --task NAME (e.g. gsm8k) or --data FILE --task-type math|choice|boolean")
    name, spec = get_task(task)
    if task_type is not None and task_type != spec.type:
        raise AdapterkitError(f"task {name} is of type {spec.type}, not {task_type}; drop --task-type")
    root = Path(data_dir) if data_dir is not None else BUNDLED_DATA
    path = root / "dataset" / name / "test.json"
    if not path.is_file():
        raise AdapterkitError(f"no test file for task {name} at {path}; pass --data-dir DIR (LLM-Adapters' layout: "
                              f"DIR/dataset/{name}/test.json) or --data FILE")
    return name, path, spec, spec.type


# LLM-Adapters trained its commonsense models on commonsense_170k: the train splits of these eight tasks.
COMMONSENSE_TASKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge",
                     "openbookqa")


def commonsense_mix(data_dir: str | Path | None = None, seed: int = 0) -> tuple[list[dict], dict[str, int]]:
    """A stand-in for commonsense_170k (not shipped) from the train splits found under
    DIR/dataset/<task>/train.json: each split shuffled and cut to the smallest split's size, so no task
    dominates. Only train.json files are read, never a test split. Returns (records, records per task)."""
    import random

    root = Path(data_dir) if data_dir is not None else BUNDLED_DATA
    splits = {t: read_records(root / "dataset" / t / "train.json") for t in COMMONSENSE_TASKS
              if (root / "dataset" / t / "train.json").is_file()}
    if not splits:
        raise AdapterkitError(f"no commonsense train split under {root}/dataset/<task>/train.json (tasks: "
                              f"{', '.join(COMMONSENSE_TASKS)}); pass --data-dir with LLM-Adapters' layout")
    size = min(len(r) for r in splits.values())
    mix = []
    for task, records in splits.items():
        random.Random(f"{seed}-{task}").shuffle(records)
        mix += [{**r, "source": task} for r in records[:size]]
    return mix, {t: size for t in splits}


def load_task_records(path: str | Path, task_type: str, limit: int | None = None) -> list[dict]:
    """The records of a task file, each with a gold `answer` (math: a number)."""
    records = read_records(path)[:limit]
    for number, record in enumerate(records, 1):
        gold = record.get("answer")
        if gold is None or isinstance(gold, (dict, list)) or not str(gold).strip():
            raise AdapterkitError(f"{path}: record {number} has no 'answer' (the gold answer); "
                                  "LLM-Adapters' test.json files have one per record")
        if task_type == "math" and _to_float(_THOUSANDS.sub("", str(gold)).strip()) is None:
            raise AdapterkitError(f"{path}: record {number} has answer {gold!r}, not a number; "
                                  "use --task-type choice or boolean for labelled answers")
    return records


def infer_labels(golds: list[str], task_type: str) -> tuple[str, ...] | None:
    """The label set of a task file not in TASKS, guessed from its gold answers."""
    if task_type == "math":
        return None
    if task_type == "boolean":
        return ("true", "false")
    golds = [str(g).strip() for g in golds]
    if all(g in LETTERS for g in golds):
        return LETTERS
    parts = [re.fullmatch(r"([a-z]+)(\d)", g.lower()) for g in golds]
    if all(parts) and len({p.group(1) for p in parts}) == 1:
        word = parts[0].group(1)
        return _numbered(word, max(_LABEL_FAMILIES.get(word, 0), *(int(p.group(2)) for p in parts)))
    return tuple(sorted({g.lower() for g in golds}))
