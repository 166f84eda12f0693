"""What a training run leaves beside its adapter: run.json, metrics.jsonl, loss.png, config.yaml."""

from __future__ import annotations

import json
import platform
import resource
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from .._version import __version__
from ..io.files import note_outputs, write_files, writing


def finish_run(settings, config, adapted, output: Path, metrics, best, total, world, n_train, n_val,
               seconds, data_history: list[dict], precision: str, last_saved: bool = False) -> dict:
    """The adapter to use (best by validation loss, else the last), metrics, plot, model card and run.json.
    `last_saved`: `last/` is written already (gathered from the shards of a sharded run)."""
    note_outputs(output, ["last", "loss.png", "adapter_config.json", "adapter_model.safetensors"])
    if not last_saved:
        adapted.save(output / "last")
    chosen = output / ("best" if best["step"] is not None else "last")
    with writing(output):
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copyfile(chosen / name, output / f".{name}.tmp")
            (output / f".{name}.tmp").replace(output / name)
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    run = {
        "settings": asdict(settings), "adapter_config": config.to_dict(), "method": settings.method,
        "adapter": f"{chosen.name} (step {best['step'] if best['step'] is not None else total})",
        "best_val_loss": best["val_loss"] if best["step"] is not None else None,
        "first_loss": train_losses[0] if train_losses else None, "final_loss": train_losses[-1] if train_losses else None,
        "steps": total, "precision": precision, "processes": world.size, "train_examples": n_train, "validation_examples": n_val,
        "seconds": round(seconds, 1), "seed": settings.seed, "data_sha256": data_history[-1]["sha256"],
        "data": data_history, "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "versions": versions(), "git_commit": git_commit(),
    }
    write_files(output, {"metrics.jsonl": jsonl(metrics), "run.json": json.dumps(run, indent=2) + "\n",
                         "README.md": model_card(settings, config, run)}, {}, record=True)
    with writing(output / "loss.png"):
        plot_losses(metrics, output / "loss.png")
    return run


def model_card(settings, config, run: dict) -> str:
    """README.md beside the adapter: what it is, what it was trained on, and how to load it."""
    options = "\n".join(f"| {k} | {v!r} |" for k, v in config.to_dict().items())
    data = "\n".join(f"- `{d['path']}` (sha256 `{d['sha256'][:16]}`)" for d in run["data"])
    loss = "-" if run["final_loss"] is None else f"{run['first_loss']:.4f} -> {run['final_loss']:.4f}"
    val = "-" if run["best_val_loss"] is None else f"{run['best_val_loss']:.4f}"
    peft_note = ("```python\nimport adapterkit\nmodel = adapterkit.load(base_model, \"ADAPTER_DIR\")  # or: "
                 "adapterkit export --adapter ADAPTER_DIR --format peft --output PEFT_DIR\n"
                 "# then peft.PeftModel.from_pretrained(base_model, \"PEFT_DIR\")\n```")
    return f"""---
library_name: adapterkit
base_model: {settings.model}
tags: [adapterkit, {settings.method}, peft]
---

# {settings.method} adapter for {settings.model}

Trained with adapterkit {run['versions']['adapterkit']} for {run['steps']} steps on {run['train_examples']}
records ({run['validation_examples']} held out), seed {run['seed']}, {run['processes']} process(es).

| metric | value |
|---|---|
| train loss (first -> last step) | {loss} |
| best validation loss | {val} |
| adapter used | {run['adapter']} |

Data:
{data}

Method options:

| option | value |
|---|---|
{options}

## Load it

```bash
adapterkit generate --model {settings.model} --adapter ADAPTER_DIR --prompt "..."
adapterkit eval --model {settings.model} --adapter ADAPTER_DIR --task gsm8k
```

In Python, and in Hugging Face PEFT (LoRA and the prompt methods):

{peft_note}

Settings, versions and the git commit are in `run.json`; the loss curve is `loss.png`.
"""


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def effective_yaml(settings, config) -> str:
    import yaml

    values = {k: v for k, v in asdict(settings).items() if k != "method_options"}
    flags = {o.name for o in config.options()}  # what --config takes back (not ids adapterkit sets itself)
    values.update({k: v for k, v in config.to_dict().items() if k in flags})
    return yaml.safe_dump(values, sort_keys=False)


def versions() -> dict:
    import transformers

    return {"adapterkit": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)
