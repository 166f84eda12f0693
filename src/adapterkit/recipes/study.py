"""`adapterkit study`: LLM-Adapters' comparison as one command. For each method a learning-rate pilot
on a validation split picks the rate, then every seed trains to the same budget on the same data and
template; the base model and every adapter are evaluated on every task with the contamination check;
study_report.py writes the leaderboard and plots. Finished runs and evaluations are skipped on --resume.

Learning-rate rule (`--lrs auto`): the three rates each method declares as `study_lrs`, around the rate
it usually trains at (LoRA and bottleneck adapters 1e-4, 3e-4, 1e-3; prompt methods 1e-2, 3e-2, 1e-1;
(IA)3 and VeRA higher), `--pilot-steps` steps each on the first seed. When the lowest validation loss
is at an end of the sweep, the next rate past that end on the 1-3-10 grid is piloted too (at most 3 each
way), so a method whose good rates lie outside its declared three is not ranked at a bad one. The rate
with the lowest validation loss trains the full budget. A pilot that fails (diverges, or leaves the model
unchanged) counts as the worst rate and is recorded as such; the study stops only when every pilot of a
method fails.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..data import read_records
from ..errors import AdapterkitError
from ..io.files import check_output, note_outputs, write_files
from ..methods import METHODS, get_method
from ..models import DEFAULT_MODEL
from ..settings import check_fields, option
from ..tasks import commonsense_mix, get_task, resolve_task
from .demo import TRAIN_FILE, clean_math_slice
from .evaluate import EvalSettings, run_eval
from .study_report import write_report

# --preset quick: LLM-Adapters' eight methods at a budget meant to fit an hour on 2 CPU cores (not yet timed).
QUICK_METHODS = ["adapter-h", "adapter-p", "parallel", "lora", "prefix-tuning", "prompt-tuning", "p-tuning",
                 "p-tuning-v2"]
QUICK = {"budget": "steps=30", "pilot_steps": 5, "val_set_size": 32, "eval_limit": 50, "micro_batch_size": 8,
         "max_new_tokens": 128}
CHOICE_NEW_TOKENS = 32  # commonsense answers are one word ("the correct answer is true"): no need for more
PRESETS = ("quick", "llm-adapters")
# --preset llm-adapters: LLM-Adapters' published LLaMA-7B math runs (its math_running_commands), per method,
# at its own epochs and rates (no sweep). Placements come from each method's llm-adapters preset or target
# group, which the architecture table resolves for every family (its BLOOMZ and GPT-J runs included).
PAPER_COMMON = {"batch_size": 16, "micro_batch_size": 4, "num_epochs": 3, "learning_rate": 3e-4, "warmup_steps": 100,
                "cutoff_len": 256, "eval_steps": 80, "save_steps": 80, "max_steps": None}
PAPER_RUNS = {
    "lora": {"r": 32, "alpha": 64.0, "target_modules": ["llm-adapters"]},
    "adapter-h": {"preset": "llm-adapters", "quantize": "int8"},  # its series runs loaded the base in 8 bits
    "parallel": {"preset": "llm-adapters"},
    "prefix-tuning": {"batch_size": 8, "num_epochs": 5, "learning_rate": 3e-2, "num_virtual_tokens": 10},
}
PAPER_TASKS = ["MultiArith", "gsm8k", "AddSub", "AQuA", "SingleEq", "SVAMP"]  # its math accuracy table


def paper_run(method: str) -> dict:
    """The `train` settings of LLM-Adapters' run of `method`."""
    return {**PAPER_COMMON, **PAPER_RUNS[method]}
MATH_SLICE = "math-slice"  # the demo's held-out math items (not in the math training file)


@dataclass
class StudySettings:
    output: str = option(None, "folder for runs/, evals/, leaderboard.{md,csv,json} and plots", required=True)
    model: str = option(DEFAULT_MODEL, "base model: the default, a local Hugging Face folder or a hub id")
    train_data: list[str] = option([], "training data: files, or math (the bundled math training file) and "
                                   "commonsense (the train splits under --data-dir, mixed); several sources take "
                                   "equal shares (default with --preset quick: math,commonsense)")
    tasks: list[str] = option([MATH_SLICE], "tasks: names as `eval --task`, or math-slice (held-out math items)")
    data_dir: str | None = option(None, "LLM-Adapters' data folder for the tasks (default: the bundled data)")
    methods: list[str] = option(["all"], "methods to compare, or all")
    budget: str = option("steps=60", "the same for every run: steps=N, tokens=N or seconds=N")
    lrs: list[str] = option(["auto"], "learning rates tried per method, or auto (see `adapterkit study --help`)")
    seeds: list[int] = option([1], "seeds of the full runs")
    pilot_steps: int = option(10, "steps of each learning-rate pilot", minimum=1)
    eval_limit: int | None = option(100, "items evaluated per task", minimum=1)
    batch_size: int = option(8, "global batch of every run", minimum=1)
    micro_batch_size: int = option(4, "examples per forward pass", minimum=1)
    cutoff_len: int = option(256, "longest tokenised example", minimum=2)
    val_set_size: int = option(64, "records held out for the pilots' validation loss", minimum=1)
    template: str = option("alpaca", "prompt template of every run", choices=("alpaca", "bare", "chat"))
    precision: str = option("auto", "precision of every run", choices=("auto", "fp32", "bf16"))
    max_new_tokens: int = option(160, "most tokens generated per evaluated answer", minimum=1)
    preset: str | None = option(None, "quick: the default model, math training file, math slice + boolq and "
                                "piqa, LLM-Adapters' eight methods, 1 seed, a budget for an hour on 2 cores", choices=PRESETS)
    resume: bool = option(False, "continue a study in --output: finished runs and evaluations are kept")

    def __post_init__(self) -> None:
        if self.preset == "quick":  # the preset fills what was left at its default
            self.train_data = self.train_data or ["math", "commonsense"]
            if self.tasks == [MATH_SLICE]:
                self.tasks = [MATH_SLICE, "boolq", "piqa"]
            if self.methods == ["all"]:
                self.methods = list(QUICK_METHODS)
            for name, value in QUICK.items():
                if getattr(self, name) == StudySettings.__dataclass_fields__[name].default:
                    setattr(self, name, value)
        if self.preset == "llm-adapters":
            if not self.train_data:
                raise AdapterkitError("--preset llm-adapters trains on LLM-Adapters' math_10k.json, which is not "
                                      "shipped: pass --train-data FILE (and --model, the 7B base it targets)")
            self.methods = list(PAPER_RUNS) if self.methods == ["all"] else self.methods
            self.tasks = list(PAPER_TASKS) if self.tasks == [MATH_SLICE] else self.tasks
            if unknown := [m for m in self.methods if m not in PAPER_RUNS]:
                raise AdapterkitError(f"--preset llm-adapters has the paper's runs of {', '.join(PAPER_RUNS)}, not "
                                      f"{', '.join(unknown)}; drop the preset to study them")
        check_fields(self)
        if not self.train_data:
            raise AdapterkitError("--train-data is required (or --preset quick)")
        for source in self.train_data:
            if source not in TRAIN_SOURCES and not Path(source).exists():
                raise AdapterkitError(f"--train-data {source}: no such file; give a file, math or commonsense")
        self.methods = sorted(METHODS) if self.methods == ["all"] else self.methods
        if not self.methods:
            raise AdapterkitError("--methods is empty; name methods or use all")
        for name in self.methods:
            get_method(name)
        budget_kind, budget_value = parse_budget(self.budget)
        if self.lrs != ["auto"]:
            try:
                rates = [float(r) for r in self.lrs]
            except ValueError as exc:
                raise AdapterkitError(f"--lrs must be numbers or auto, got {self.lrs}") from exc
            if any(not r > 0 for r in rates):
                raise AdapterkitError(f"--lrs must be positive, got {self.lrs}")
        if not self.seeds:
            raise AdapterkitError("--seeds is empty; give at least one seed")
        for task in self.tasks:
            if task != MATH_SLICE:
                name, spec = get_task(task)
                resolve_task(name, data_dir=self.data_dir)  # the task's folder must exist


def parse_budget(text: str) -> tuple[str, int]:
    kind, sep, value = text.partition("=")
    if not sep or kind not in ("steps", "tokens", "seconds"):
        raise AdapterkitError(f"--budget {text!r}: use steps=N, tokens=N or seconds=N")
    try:
        number = int(value)
    except ValueError as exc:
        raise AdapterkitError(f"--budget {text!r}: N must be a whole number") from exc
    if number <= 0:
        raise AdapterkitError(f"--budget {text!r}: N must be positive")
    return kind, number


TRAIN_SOURCES = ("math", "commonsense")


def _source_records(source: str, data_dir: str | None) -> list[dict]:
    if source == "math":
        return read_records(TRAIN_FILE)
    if source == "commonsense":
        return commonsense_mix(data_dir)[0]
    return read_records(source)


def training_data(settings: StudySettings, out: Path) -> Path:
    """out/train.json, the one training file of every run: the sources, each cut to the smallest one's size
    when there are several (shuffled with a fixed seed first), so that no source dominates."""
    path = out / "train.json"
    if path.is_file():
        return path
    sources = {s: _source_records(s, settings.data_dir) for s in settings.train_data}
    size = min(len(r) for r in sources.values()) if len(sources) > 1 else None
    records = []
    for name, items in sources.items():
        if size is not None:
            random.Random(f"study-{name}").shuffle(items)
        records += items[:size]
    shares = {name: len(items[:size]) for name, items in sources.items()}
    write_files(out, {path.name: json.dumps(records, indent=1), "train_sources.json": json.dumps(shares, indent=1)},
                {}, record=True)
    print(f"study: training data {', '.join(f'{n} {c}' for n, c in shares.items())} records -> {path}", flush=True)
    return path


def learning_rates(settings: StudySettings, method: str) -> list[float]:
    if settings.preset == "llm-adapters":
        return [paper_run(method)["learning_rate"]]
    if settings.lrs != ["auto"]:
        return [float(r) for r in settings.lrs]
    return list(get_method(method).study_lrs)


def steps_for(settings: StudySettings, out: Path) -> int | None:
    """The step count of a full run (None: --preset llm-adapters, each method's own epochs). tokens=N and
    seconds=N are turned into steps from the first pilot's measured tokens and seconds per step, so every
    method trains the same number of steps."""
    if settings.preset == "llm-adapters":
        return None
    kind, value = parse_budget(settings.budget)
    if kind == "steps":
        return value
    pilot = next(out.glob("runs/*/pilot-*/run.json"), None)
    if pilot is None:
        raise AdapterkitError("a tokens or seconds budget needs a pilot run first (use --lrs auto or several rates)")
    run = json.loads(pilot.read_text())
    metrics = [json.loads(line) for line in (pilot.parent / "metrics.jsonl").read_text().splitlines()]
    tokens = sum(m.get("tokens", 0) for m in metrics if "loss" in m) / max(run["steps"], 1)
    seconds = run["seconds"] / max(run["steps"], 1)
    return max(1, int(value / (tokens if kind == "tokens" else seconds)))


def run_config(settings: StudySettings, method: str, lr: float, seed: int, steps: int | None, folder: Path,
               val_set_size: int) -> dict:
    """The `adapterkit train --config` settings of one run; a killed run continues exactly (resume auto)."""
    config = {"data": str(Path(settings.output) / "train.json"), "output": str(folder), "method": method,
              "model": settings.model, "batch_size": settings.batch_size, "micro_batch_size": settings.micro_batch_size,
              "max_steps": steps, "learning_rate": lr, "warmup_steps": max(1, (steps or 0) // 10),
              "cutoff_len": settings.cutoff_len, "val_set_size": val_set_size, "eval_steps": steps,
              "save_steps": steps, "template": settings.template, "seed": seed, "precision": settings.precision,
              "resume": "auto"}
    if settings.preset == "llm-adapters":
        config.update(paper_run(method))
    return config


def _train(settings: StudySettings, method: str, lr: float, seed: int, steps: int, folder: Path,
           val_set_size: int) -> dict:
    """One training run in its own process (its peak memory is its own); skipped when finished."""
    if (folder / "run.json").is_file():
        return json.loads((folder / "run.json").read_text())
    config = run_config(settings, method, lr, seed, steps, folder, val_set_size)
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / f".{folder.name}.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "adapterkit", "train", "--config",
                           str(folder.parent / f".{folder.name}.yaml")], capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise AdapterkitError(f"study run {folder.name} of {method} failed: {last}")
    return json.loads((folder / "run.json").read_text())


def _evaluate(settings: StudySettings, name: str, adapter: Path | None, task: str, out: Path) -> dict:
    folder = out / "evals" / name / task
    if (folder / "results.json").is_file():  # with its folder, where the report reads the predictions
        return {**json.loads((folder / "results.json").read_text()), "output": str(folder)}
    data = task_type = None
    if task == MATH_SLICE:
        data, task_type = out / "math_slice.json", "math"
        if not data.is_file():
            write_files(out, {data.name: json.dumps(clean_math_slice(settings.eval_limit or 100), indent=1)}, {},
                        record=True)
    return run_eval(EvalSettings(model=settings.model, adapter=str(adapter) if adapter else None,
                                 task=None if data else task, data=str(data) if data else None, task_type=task_type,
                                 data_dir=settings.data_dir, train_data=str(out / "train.json"), output=str(folder),
                                 limit=settings.eval_limit, batch_size=16,
                                 max_new_tokens=settings.max_new_tokens if data else min(settings.max_new_tokens,
                                                                                         CHOICE_NEW_TOKENS),
                                 precision="fp32", progress=False))


EXTEND = 3  # --lrs auto: at most this many rates added past either end of a method's sweep


def next_rate(lr: float, up: bool) -> float:
    """The neighbour of lr on the 1-3-10 grid (1e-3 -> 3e-3 -> 1e-2), rounded to 2 significant digits."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10 ** exponent
    grid = [0.3, 1, 3, 10, 30]
    index = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / mantissa)))
    return float(f"{grid[index + (1 if up else -1)] * 10 ** exponent:.2g}")


def _sweep(settings: StudySettings, method: str, rates: list[float], out: Path, progress: Progress) -> dict:
    """Validation loss of each pilot rate (None: failed). With --lrs auto, a best rate at an end of the
    sweep is not trusted: the next rate past that end is tried too, up to EXTEND times each way."""
    sweep: dict[float, float | None] = {}
    queue, added = list(rates), {True: 0, False: 0}
    while queue:
        lr = queue.pop(0)
        progress.step(f"{method} pilot at lr {lr:g}")
        folder, sweep[lr] = out / "runs" / method / f"pilot-lr{lr:g}", None
        if not (folder / "failed.txt").is_file():  # failed before: it would again (seeded, same data)
            try:
                sweep[lr] = _train(settings, method, lr, settings.seeds[0], settings.pilot_steps, folder,
                                   settings.val_set_size)["best_val_loss"]
            except AdapterkitError as exc:  # a rate too small or too large: the worst of the sweep
                print(f"study: {exc}; that rate counts as failed", flush=True)
                write_files(folder, {"failed.txt": f"{exc}\n"}, {})  # atomic, as every file the study writes
        tried = {r: loss for r, loss in sweep.items() if loss is not None}
        if queue or not tried or settings.lrs != ["auto"]:
            continue
        best = min(tried, key=tried.get)
        for up, edge in ((True, max(sweep)), (False, min(sweep))):
            if best == edge and added[up] < EXTEND:
                added[up] += 1
                progress.total += 1
                queue.append(next_rate(edge, up))
    if not any(loss is not None for loss in sweep.values()):
        raise AdapterkitError(f"every learning-rate pilot of {method} failed ({sorted(sweep)}); give rates with --lrs")
    return sweep


class Progress:
    """`study: 3 of 18: lora lr 3e-04 seed 1, about 12 min left`, from the mean time of the items that did
    work (an item a resumed study finds done takes well under a second and does not count)."""

    def __init__(self, total: int):
        self.total, self.done, self.last, self.worked = total, 0, time.time(), []

    def step(self, what: str) -> None:
        now = time.time()
        if self.done and now - self.last > 1.0:
            self.worked.append(now - self.last)
        self.done, self.last = self.done + 1, now
        left = sum(self.worked) / len(self.worked) * (self.total - self.done + 1) if self.worked else None
        eta = f", about {left / 60:.0f} min left" if left is not None else ""
        print(f"study: {self.done} of {self.total}: {what}{eta}", flush=True)


def study(settings: StudySettings) -> dict:
    """Run (or resume) the study; returns the leaderboard rows."""
    out = Path(settings.output)
    check_output(out, overwrite=False, resuming=settings.resume)
    write_files(out, {"study.json": json.dumps(asdict(settings), indent=2) + "\n"}, {}, record=True)
    note_outputs(out, ["runs", "evals", "plots", "leaderboard.md", "leaderboard.csv", "leaderboard.json"])
    training_data(settings, out)
    plan = {m: learning_rates(settings, m) for m in settings.methods}
    pilots = sum(len(r) for r in plan.values() if len(r) > 1)
    progress = Progress(pilots + len(settings.methods) * len(settings.seeds)
                        + (1 + len(settings.methods) * len(settings.seeds)) * len(settings.tasks))
    runs: dict[str, dict] = {}
    for method, rates in plan.items():
        sweep = _sweep(settings, method, rates, out, progress) if len(rates) > 1 else {}
        tried = {lr: loss for lr, loss in sweep.items() if loss is not None}
        chosen = min(tried, key=tried.get) if tried else rates[0]
        steps = steps_for(settings, out)
        runs[method] = {"lr": chosen, "sweep": sweep, "steps": steps, "seeds": {}}
        for seed in settings.seeds:
            progress.step(f"{method} lr {chosen:g} seed {seed}")
            folder = out / "runs" / method / f"lr{chosen:g}-seed{seed}"
            runs[method]["seeds"][seed] = {"folder": str(folder),
                                           "run": _train(settings, method, chosen, seed, steps, folder, 0)}
    evals: dict[str, dict[str, list[dict]]] = {"base": {}}
    for task in settings.tasks:
        progress.step(f"base model on {task}")
        evals["base"][task] = [_evaluate(settings, "base", None, task, out)]
        for method, info in runs.items():
            for seed, entry in info["seeds"].items():
                progress.step(f"{method} seed {seed} on {task}")
                evals.setdefault(method, {}).setdefault(task, []).append(
                    _evaluate(settings, f"{method}-{Path(entry['folder']).name}", Path(entry["folder"]), task, out))
    return write_report(settings, out, runs, evals)
