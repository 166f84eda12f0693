"""`adapterkit train`: data, model, adapter, the loop, validation, checkpoints, logs and plots.

Settings mirror LLM-Adapters' finetune.py (global batch 128, micro batch 4, 3 epochs, lr 3e-4,
cutoff 256, 2000 validation records, warmup 100) so its recipes carry over.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core import adapt
from ..data import (
    TEMPLATES,
    Template,
    check_cutoff,
    collate,
    data_sha256,
    encode,
    epoch_batches,
    read_records,
    split_validation,
)
from ..errors import AdapterkitError, AdapterkitWarning, warn
from ..hardware import resolve_precision
from ..io.checkpoint import latest_good_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from ..io.files import check_output, clear_outputs, note_outputs, write_files
from ..io.sharded import save_gathered
from ..methods import get_method
from ..models import DEFAULT_MODEL, load_model
from ..packing import check_packing, collate_packed, pack
from ..quantization import QUANTIZE
from ..settings import check_fields, option
from ..token_rows import extend_vocabulary
from ..training import causal_lm_loss, fit, make_optimizer
from ..training.distributed import (
    World,
    barrier,
    finish,
    init_world,
    launched,
    peer_failure,
    planned_size,
    sum_across,
)
from ..training.sharding import SHARDS, Steps, check_shard, shard_model
from ..training.zero3 import Zero3Steps
from .common import generation_info
from .reporting import REPORTERS, check_reporter, make_reporter
from .run_files import effective_yaml, finish_run, jsonl


@dataclass
class TrainSettings:
    """Settings of `adapterkit train` (flag --batch-size is field batch_size, and so on)."""

    data: str = option(None, "JSON list or JSONL of instruction/input/output records (or parquet, or a saved "
                       "HF dataset folder)", required=True)
    output: str = option(None, "folder for the adapter, checkpoints, metrics.jsonl, loss.png, run.json",
                         required=True)
    method: str = option("lora", "the method (see `adapterkit methods`)")
    model: str = option(DEFAULT_MODEL, "base model: the default, a local Hugging Face folder or a hub id")
    batch_size: int = option(128, "global batch, all processes together", minimum=1)
    micro_batch_size: int = option(4, "examples per forward pass", minimum=1)
    num_epochs: int = option(3, "passes over the training records", minimum=1)
    max_steps: int | None = option(None, "stop after this many optimizer steps", minimum=1)
    learning_rate: float = option(3e-4, "peak learning rate", above=0)
    warmup_steps: int = option(100, "linear warmup steps", minimum=0)
    cutoff_len: int = option(256, "longest tokenised example; longer ones are cut", minimum=2)
    val_set_size: int = option(2000, "records held out for validation (0: none)", minimum=0)
    train_on_inputs: bool = option(False, "train on the prompt tokens too")
    group_by_length: bool = option(False, "batch examples of similar length (less padding)")
    eval_steps: int = option(200, "validate every N steps", minimum=1)
    save_steps: int = option(200, "checkpoint every N steps", minimum=1)
    save_total_limit: int = option(3, "checkpoints kept", minimum=1)
    template: str = option("alpaca", "prompt template: alpaca, bare or chat", choices=TEMPLATES)
    limit: int | None = option(None, "use only the first N records", minimum=1)
    seed: int = option(42, "seed of the data order, the validation split and the adapter's start", minimum=0)
    precision: str = option("auto", "auto (bf16 where the hardware multiplies bf16 natively, else fp32), fp32, or "
                            "bf16 (bf16 base + autocast, fp32 adapter)", choices=("auto", "fp32", "bf16"))
    resume: str | None = option(None, "'auto' (latest checkpoint in --output) or a checkpoint folder")
    report_to: str = option("none", "also log metrics to tensorboard, wandb (offline) or mlflow (a local store)",
                            choices=REPORTERS)
    quantize: str = option("none", "store the frozen base's linear layers quantized: int8 or nf4 (QLoRA's; "
                           "needs adapterkit[quant])", choices=QUANTIZE)
    packing: bool = option(False, "several records per row of --cutoff-len tokens, kept apart (their own positions, "
                           "a block-diagonal mask): no compute spent on padding")
    gradient_checkpointing: bool = option(False, "recompute each layer in backward: less memory, slower steps")
    compile: bool = option(False, "torch.compile the model; the first steps (one per new batch shape) compile, "
                           "and the first step's time is printed")
    shard: str = option("none", "fsdp: shard the model over the launched processes (FSDP2: each decoder layer, then "
                        "the rest), zero3: DeepSpeed ZeRO-3 (adapterkit[zero3], fp32; see README), none: every process holds the "
                        "whole model",
                        choices=SHARDS)
    overwrite: bool = option(False, "replace what an earlier run wrote in --output (other files are refused)")
    allow_new_data: bool = option(False, "with --resume: continue on data that differs from the run's")
    method_options: dict = option({}, "the method's options", cli=False)

    def __post_init__(self) -> None:
        check_fields(self)

    def validate(self, processes: int) -> None:
        """What depends on the launcher: the global batch must split over micro-batches and processes."""
        check_shard(self.shard, launched(), self.quantize, self.precision)
        if self.batch_size % (self.micro_batch_size * processes):
            raise AdapterkitError(
                f"--batch-size {self.batch_size} is not a multiple of --micro-batch-size {self.micro_batch_size}"
                + (f" x {processes} processes" if processes > 1 else "")
                + f"; use a multiple of {self.micro_batch_size * processes}")


def method_config(method: str, options: dict):
    spec = get_method(method)
    known = {o.name for o in spec.config_class.options()}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AdapterkitError(f"{unknown[0]} is not an option of {method}; see `adapterkit methods`")
    return spec.config_class(**options)


def check_length(adapted, cutoff: int, virtual: int) -> None:
    """Learned absolute positions bound the length: say so before training, not at the first long batch."""
    limit = adapted.layout.shape.max_positions
    if limit is not None and cutoff + virtual > limit:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise AdapterkitError(f"--cutoff-len {cutoff}{extra} exceeds the model's {limit} positions; "
                              f"use --cutoff-len {limit - virtual} or less")


def resume_point(settings: TrainSettings, output: Path) -> tuple[Path | None, list[dict]]:
    """(checkpoint to resume from, data the run trained on so far). `auto` skips damaged checkpoints
    with a warning; data whose hash differs from the run's is refused unless --allow-new-data."""
    if not settings.resume:
        return None, []
    if settings.resume == "auto":
        path = latest_good_checkpoint(output, warn)
        if path is None:
            return None, []  # nothing saved yet: start from the beginning
    else:
        path = Path(settings.resume)
        if not path.is_dir():
            raise AdapterkitError(f"--resume {path}: no such checkpoint folder (or use --resume auto)")
    history = list(read_checkpoint(path)["state"]["position"].get("data") or [])
    sha = data_sha256(settings.data)
    if history and history[-1].get("sha256") != sha:
        if not settings.allow_new_data:
            raise AdapterkitError(f"--data {settings.data} differs from the data this run was trained on "
                                  f"({history[-1].get('path')}); resume with the same data, or pass "
                                  "--allow-new-data to continue on this file (run.json records both)")
        warn(f"continuing the run on new data {settings.data} (--allow-new-data)")
    return path, history


def train(settings: TrainSettings) -> dict:
    """Fine-tune one adapter; returns the run summary also written to run.json. Launched as several
    processes, the first one alone prints and writes (sharded runs write checkpoints' shards from each);
    a process that fails stops the others at their next collective, each with one line."""
    settings.validate(planned_size())  # before joining the group: every process refuses alike
    world = init_world(settings.shard)
    try:
        with warnings.catch_warnings():
            if not world.main:
                warnings.simplefilter("ignore", AdapterkitWarning)  # the first process says it once
            run = _train(settings, world)
        barrier(world)  # nobody leaves the group while the main process still writes
        return run
    except Exception as exc:
        failure = peer_failure(exc, world)
        if failure is not None:
            raise failure from exc
        if isinstance(exc, AdapterkitError) and world.size > 1:
            raise AdapterkitError(f"process {world.rank} of {world.size}: {exc}") from exc
        raise
    finally:
        finish(world)


def save_adapter(adapted, directory: Path, world: World) -> None:
    """An adapter folder: gathered from the shards by every process under --shard, else by the main one."""
    if world.sharded:
        save_gathered(adapted, directory, "default", world)
    elif world.main:
        adapted.save(directory)


def _train(settings: TrainSettings, world: World) -> dict:
    config = method_config(settings.method, settings.method_options)
    output = Path(settings.output)
    check_output(output, settings.overwrite, bool(settings.resume), resumable=True)
    check_reporter(settings.report_to)
    records = read_records(settings.data)[: settings.limit]
    resume_from, data_history = resume_point(settings, output)
    data_id = {"path": str(settings.data), "sha256": data_sha256(settings.data)}
    if not data_history or data_history[-1]["sha256"] != data_id["sha256"]:
        data_history.append(data_id)
    train_records, val_records = split_validation(records, settings.val_set_size, settings.seed)
    torch.manual_seed(settings.seed)
    precision = resolve_precision(settings.precision, world.device)
    check_shard(settings.shard, launched(), settings.quantize, precision, settings.precision == "auto")
    model, tokenizer = load_model(settings.model, precision, settings.quantize)
    model.to(world.device)
    config = extend_vocabulary(model, tokenizer, config)  # --new-tokens: before the data is tokenised
    template = Template(settings.template)
    encoded = [encode(r, tokenizer, template, settings.cutoff_len, settings.train_on_inputs) for r in train_records]
    val_encoded = [encode(r, tokenizer, template, settings.cutoff_len, settings.train_on_inputs) for r in val_records]
    cut = check_cutoff(encoded, settings.cutoff_len)
    if cut and world.main:
        warn(cut)
    adapted = adapt(model, config, tokenizer=tokenizer)
    adapted.generation_info = generation_info(tokenizer, settings.template)
    record = adapted.records["default"]
    if settings.gradient_checkpointing:
        adapted.gradient_checkpointing_enable()
    check_length(adapted, settings.cutoff_len, getattr(config, "num_virtual_tokens", 0))

    batch_of = collate
    if settings.packing:
        if adapted.input_hooks:
            raise AdapterkitError(f"--packing keeps records apart by positions and mask, and {settings.method} adds "
                                  "virtual tokens to each record's input; train it without --packing")
        encoded = pack(encoded, settings.cutoff_len)
        with adapted.disabled():
            check_packing(adapted, encoded, tokenizer.pad_token_id, 1e-3 if precision == "fp32" else 5e-2)
        batch_of = collate_packed
    if world.shard == "fsdp":
        shard_model(adapted, precision)
    if settings.compile:
        adapted.compile()
    micro, per_step = settings.micro_batch_size, settings.batch_size // settings.micro_batch_size
    per_epoch = len(encoded) // micro
    if per_epoch < per_step:
        raise AdapterkitError(f"{len(encoded)} training records make fewer micro-batches ({per_epoch}) than one "
                              f"step needs ({per_step}); lower --batch-size or add data")
    total = settings.max_steps or max(1, settings.num_epochs * per_epoch // per_step)
    lengths = [len(e["input_ids"]) for e in encoded]
    epochs: dict[int, list[list[int]]] = {}

    def my_micro_batches(step: int) -> list[dict]:
        """This process's micro-batches of a global step: a pure function of (seed, step)."""
        batches = []
        for index in range(step * per_step + world.rank, (step + 1) * per_step, world.size):
            epoch, position = divmod(index, per_epoch)
            if epoch not in epochs:
                epochs.clear()
                epochs[epoch] = epoch_batches(lengths, micro, settings.seed, epoch, settings.group_by_length)
            batches.append(_to(batch_of([encoded[i] for i in epochs[epoch][position]], tokenizer.pad_token_id),
                               world.device))
        return batches

    adapted.start_training(total)  # (fit calls it too) a method's schedule is checked here, before anything is written
    params, optimizer, scheduler = make_optimizer(adapted, settings.learning_rate, settings.warmup_steps, total)
    autocast = torch.bfloat16 if precision == "bf16" else None
    metrics: list[dict] = []
    start, best = 0, {"val_loss": float("inf"), "step": None}
    if resume_from is not None:
        state = load_checkpoint(resume_from, adapted, optimizer, scheduler)
        start, best = state["step"], state["position"]["best"]
        metrics = state["metrics"] if state["metrics"] is not None else [  # checkpoints before 0.2 kept it beside
            json.loads(line) for line in (resume_from / "metrics.jsonl").read_text().splitlines()]
    elif world.main and settings.overwrite and output.is_dir():
        clear_outputs(output)  # only what adapterkit wrote; every check on the input has passed by now
    if world.main:
        rows = f" in {len(encoded)} packed rows" if settings.packing else ""
        print(f"{settings.method}: {adapted.report()}; {len(train_records)} train{rows} / {len(val_encoded)} validation "
              f"examples, {total} steps of {settings.batch_size}" + (f" on {world.size} processes" if
                                                                      world.size > 1 else "")
              + f"; precision {precision}" + (" (auto)" if settings.precision == "auto" else ""), flush=True)
        write_files(output, {"config.yaml": effective_yaml(settings, config)}, {}, record=True)
    # ZeRO-3 partitions the model here (after the report above counted its parameters)
    steps = Zero3Steps(adapted, params, optimizer, scheduler, world, micro, per_step // world.size) \
        if world.shard == "zero3" else Steps(adapted, params, optimizer, scheduler, world)
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=not world.main)
    reporter = make_reporter(settings.report_to if world.main else "none", output, asdict(settings))
    started = time.time()

    def after_step(step: int, loss: float, tokens: int) -> None:
        record.trained_steps = step
        elapsed = time.time() - started
        if settings.compile and step == start + 1 and world.main:
            tqdm.write(f"torch.compile: the first step took {elapsed:.1f} s, compiling included")
        metrics.append({"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                        "seconds": round(elapsed, 3)})
        reporter.log({"train/loss": loss, "train/lr": metrics[-1]["lr"]}, step)
        seen = sum(m.get("tokens", 0) for m in metrics if m["step"] > start)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{seen / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if val_encoded and (step % settings.eval_steps == 0 or step == total):
            val_loss = validation_loss(adapted, val_encoded, micro, tokenizer.pad_token_id, world, autocast)
            metrics.append({"step": step, "val_loss": val_loss})
            reporter.log({"eval/loss": val_loss}, step)
            if val_loss < best["val_loss"]:
                best.update(val_loss=val_loss, step=step)
                if world.main:
                    note_outputs(output, ["best"])
                save_adapter(adapted, output / "best", world)
        if (world.main or world.sharded) and (step % settings.save_steps == 0 or step == total):
            save_checkpoint(output, step, adapted, steps.optimizer, scheduler, {"best": best, "data": data_history},
                            settings.save_total_limit, texts={"metrics.jsonl": jsonl(metrics)}, world=world)

    try:
        fit(steps, my_micro_batches, start, total, world, per_step, autocast=autocast, after_step=after_step)
    finally:
        bar.close()  # before any error line, so that line is the last one printed
        reporter.close()
    run = {}
    if world.sharded:
        if world.main:
            note_outputs(output, ["last"])
        save_adapter(adapted, output / "last", world)
    if world.main:
        run = finish_run(settings, config, adapted, output, metrics, best, total, world, len(train_records),
                         len(val_encoded), time.time() - started, data_history, precision, last_saved=world.sharded)
    return run


@torch.no_grad()
def validation_loss(adapted, examples, micro: int, pad_id: int, world: World, autocast) -> float:
    """Token-weighted mean loss over the validation set, shared across processes."""
    adapted.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    starts = list(range(0, len(examples), micro))
    mine: list[int | None] = list(starts[world.rank::world.size])
    if world.sharded:  # each forward gathers weights with the others: every process runs as many
        mine += [None] * (-(-len(starts) // world.size) - len(mine))
    for start in mine:
        batch = _to(collate(examples[start or 0:(start or 0) + micro], pad_id), world.device)
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=autocast is not None):
            logits = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if start is None:
            continue  # a filler forward: counts nothing
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        totals += torch.tensor([causal_lm_loss(logits, batch["labels"]).item() * tokens, tokens],
                               dtype=torch.float64)
    adapted.train()
    loss_sum, tokens = sum_across(totals, world).tolist()
    return loss_sum / max(tokens, 1)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()} if device.type != "cpu" else batch
