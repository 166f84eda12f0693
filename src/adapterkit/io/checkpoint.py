"""Training checkpoints: adapter, optimizer, scheduler, RNG and data position; atomic; the last K kept.

Everything is safetensors or JSON: optimizer moments and RNG states are tensors, the rest is JSON.
A checkpoint folder becomes visible (renamed into place) only once complete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import AdapterkitError
from .native import read_adapter, trainable_only

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def checkpoint_dirs(output: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its state file exists)."""
    root = output / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_checkpoint(output: Path, step: int, adapted, optimizer, scheduler, position: dict,
                    keep: int) -> Path:
    root = output / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    adapted.save(tmp)
    tensors, groups = _optimizer_tensors(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, str(tmp / OPTIMIZER_FILE))
    state = {"step": step, "position": position, "param_groups": groups,
             "scheduler": scheduler.state_dict(),  # lr_lambdas are plain functions: saved as None
             "python_rng": _jsonable(random.getstate())}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: Path, adapted, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved state (step, data position)."""
    if not (directory / STATE_FILE).is_file():
        raise AdapterkitError(f"{directory} is not a complete checkpoint (no {STATE_FILE})")
    _, weights = read_adapter(directory)
    state = json.loads((directory / STATE_FILE).read_text())
    tensors = load_file(str(directory / OPTIMIZER_FILE))
    adapted.load_adapter_state_dict(trainable_only(weights))
    optimizer.load_state_dict(_optimizer_state(tensors, state["param_groups"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_tuples(state["python_rng"]))
    return state


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
