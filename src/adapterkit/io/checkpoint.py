"""Training checkpoints: adapter, optimizer, scheduler, RNG and data position; atomic; the last K kept.

Everything is safetensors or JSON: optimizer moments and RNG states are tensors, the rest is JSON.
A checkpoint folder becomes visible (renamed into place) only once complete. A sharded run's checkpoint
holds the gathered adapter beside `sharded/`, its adapter and optimizer shards (see sharded.py).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import AdapterkitError
from ..training.distributed import World, barrier
from ..training.sharding import is_sharded
from .files import note_outputs, save_tensors, writing
from .native import read_adapter, trainable_only
from .sharded import SHARDED_DIR, load_state, load_unsharded, save_gathered, save_state, shard_count

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
METRICS_FILE = "metrics.jsonl"


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its state file exists)."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_checkpoint(output: Path, step: int, adapted, optimizer, scheduler, position: dict, keep: int,
                    texts: dict[str, str] | None = None, world: World | None = None) -> Path:
    """Write checkpoint `step` (with `texts`, e.g. the metrics so far, inside it) and keep the last `keep`.
    The folder is renamed into place only when every file is written. In a sharded run (`world.sharded`)
    every process calls this and writes its shard; the main one writes the rest and renames."""
    sharded = world is not None and world.shard == "fsdp"
    main = world is None or world.main
    root = output / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if main:
        with writing(root):
            root.mkdir(parents=True, exist_ok=True)
        note_outputs(output, ["checkpoints"])
        shutil.rmtree(tmp, ignore_errors=True)
    if sharded:
        barrier(world)  # the temporary folder is fresh before any process writes into it
    try:
        if sharded:
            save_gathered(adapted, tmp, adapted._single_name(), world)
            save_state(tmp / SHARDED_DIR, adapted, optimizer, adapted._single_name())
            tensors, groups = {}, _jsonable(optimizer.state_dict()["param_groups"])  # moments are in the shards
        else:  # one process, or ZeRO-3's partitions gathered whole on every process: an unsharded checkpoint
            if world is not None and world.sharded:
                save_gathered(adapted, tmp, adapted._single_name(), world)
            elif main:
                adapted.save(tmp)
            tensors, groups = _optimizer_tensors(optimizer)
        if main:
            tensors["rng.torch"] = torch.get_rng_state()
            save_tensors(tensors, tmp / OPTIMIZER_FILE)
            state = {"step": step, "position": position, "param_groups": groups,
                     "scheduler": scheduler.state_dict(),  # lr_lambdas are plain functions: saved as None
                     "python_rng": _jsonable(random.getstate())}
            if sharded:
                state["sharded"] = {"processes": world.size, "format": "torch.distributed.checkpoint safetensors"}
            with writing(tmp):
                for name, text in (texts or {}).items():
                    (tmp / name).write_text(text, encoding="utf-8")
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(output)[:-keep] if keep > 0 and main else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(directory: Path) -> dict:
    """Every file of a checkpoint, parsed and checked, before anything is restored from it."""
    if not (directory / STATE_FILE).is_file():
        raise AdapterkitError(f"{directory} is not a complete checkpoint (no {STATE_FILE})")
    try:
        _, weights = read_adapter(directory)
    except AdapterkitError as exc:
        raise AdapterkitError(f"checkpoint {directory.name} is damaged ({exc})") from exc
    try:
        state = json.loads((directory / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(directory / OPTIMIZER_FILE))
        metrics_file = directory / METRICS_FILE
        metrics = [json.loads(line) for line in metrics_file.read_text(encoding="utf-8").splitlines()] \
            if metrics_file.is_file() else None
    except (OSError, ValueError, SafetensorError) as exc:
        raise AdapterkitError(f"checkpoint {directory.name} is damaged ({str(exc).splitlines()[0]})") from exc
    problem = _state_problem(state, tensors, metrics) or _shards_problem(state, directory)
    if problem:
        raise AdapterkitError(f"checkpoint {directory.name} is damaged ({problem})")
    return {"weights": trainable_only(weights), "state": state, "tensors": tensors, "metrics": metrics}


def _state_problem(state, tensors: dict, metrics) -> str | None:
    """What is wrong with a checkpoint's parsed state, for the entries a resumed run reads; None if nothing."""
    kinds = {"step": int, "position": dict, "param_groups": list, "scheduler": dict, "python_rng": list}
    if not isinstance(state, dict) or not set(kinds) <= set(state) or "rng.torch" not in tensors:
        return "its state lacks entries"
    wrong = [k for k, kind in kinds.items() if not isinstance(state[k], kind) or isinstance(state[k], bool)]
    if wrong:
        return f"{STATE_FILE}: {wrong[0]} is a {type(state[wrong[0]]).__name__}"
    best = state["position"].get("best")
    if not isinstance(best, dict) or not isinstance(best.get("val_loss"), (int, float)) \
            or not isinstance(best.get("step"), (int, type(None))):
        return f"{STATE_FILE}: position.best is not a validation record"
    data = state["position"].get("data") or []
    if not isinstance(data, list) or not all(isinstance(d, dict) and isinstance(d.get("sha256"), str) for d in data):
        return f"{STATE_FILE}: position.data is not a list of data files"
    if state["step"] < 0:
        return f"{STATE_FILE}: step {state['step']} is negative"
    try:
        random.Random().setstate(_tuples(state["python_rng"]))
    except (TypeError, ValueError, OverflowError):
        return f"{STATE_FILE}: python_rng is not a random generator's state"
    rng = tensors["rng.torch"]
    if rng.dtype != torch.uint8 or rng.dim() != 1:
        return f"{OPTIMIZER_FILE}: rng.torch is not a torch generator's state"
    if metrics is not None and not all(isinstance(m, dict) and isinstance(m.get("step"), int) for m in metrics):
        return f"{METRICS_FILE} holds a row that is not a step's metrics"
    return None


def _shards_problem(state: dict, directory: Path) -> str | None:
    """A sharded checkpoint needs one shard file per process that wrote it."""
    sharded = state.get("sharded")
    if sharded is None:
        return None
    processes = sharded.get("processes") if isinstance(sharded, dict) else None
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        return f"{STATE_FILE}: sharded.processes is not a number of processes"
    found = shard_count(directory / SHARDED_DIR)
    return None if found == processes else f"{SHARDED_DIR}/ holds {found} of its {processes} shard files"


def load_checkpoint(directory: Path, adapted, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved state (step, data position),
    with the metrics saved inside the checkpoint under "metrics". Any checkpoint loads into any number
    of processes, sharded or not (a ZeRO-3 run loads before its engine partitions the model)."""
    saved = read_checkpoint(directory)
    state = saved["state"]
    errors: tuple = (ValueError, KeyError, RuntimeError, TypeError, AdapterkitError)
    if state.get("sharded"):
        from torch.distributed.checkpoint import CheckpointException  # seconds to import: only when needed

        errors += (CheckpointException,)
    try:
        if state.get("sharded"):
            load_state(directory / SHARDED_DIR, adapted, optimizer, adapted._single_name(), saved["weights"])
            for group, kept in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({k: v for k, v in kept.items() if k != "params"})
        elif any(is_sharded(p) for p in adapted.parameters()):  # an unsharded checkpoint into FSDP's shards
            load_unsharded(adapted, optimizer, adapted._single_name(), saved["weights"],
                           _optimizer_state(saved["tensors"], state["param_groups"]))
            for group, kept in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({k: v for k, v in kept.items() if k != "params"})
        else:
            adapted.load_adapter_state_dict(saved["weights"])
            optimizer.load_state_dict(_optimizer_state(saved["tensors"], state["param_groups"]))
        scheduler.load_state_dict(state["scheduler"])
    except errors as exc:
        raise AdapterkitError(f"checkpoint {directory.name} does not fit this run ({str(exc).splitlines()[0]}); "
                              "resume with the settings it was saved with") from exc
    try:
        torch.set_rng_state(saved["tensors"]["rng.torch"])
        random.setstate(_tuples(state["python_rng"]))
    except (ValueError, TypeError, RuntimeError) as exc:
        raise AdapterkitError(f"checkpoint {directory.name} is damaged (its random state does not restore: "
                              f"{str(exc).splitlines()[0]})") from exc
    return {**state, "metrics": saved["metrics"]}


def latest_good_checkpoint(output: Path, warn) -> Path | None:
    """The newest checkpoint whose files all read back, newest first; each damaged one is reported
    through `warn` and skipped. None when there is no checkpoint at all."""
    found = checkpoint_dirs(output)
    damaged = []
    for directory in reversed(found):
        try:
            read_checkpoint(directory)
        except AdapterkitError as exc:
            damaged.append(str(exc))
            continue
        for reason in damaged:  # reported only once a checkpoint to fall back on is found
            warn(f"{reason}; resuming from the checkpoint before it")
        return directory
    if found:
        raise AdapterkitError(f"every checkpoint in {output / 'checkpoints'} is damaged (the newest: {damaged[0]}); "
                              "start again without --resume")
    return None


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    full = optimizer.state_dict()
    tensors = {f"state.{index}.{name}": value.detach().cpu().contiguous()
               for index, slots in full["state"].items() for name, value in slots.items()}
    return tensors, _jsonable(full["param_groups"])


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": groups}


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
