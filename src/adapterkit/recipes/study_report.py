"""The study's leaderboard (md, csv, json) and plots, from its runs and evaluations.

"beats base on held-out items": an exact two-sided McNemar test on the clean (not contaminated)
items of each task, pairing the base model's and the adapter's correctness item by item (first seed);
"yes" when the adapter is right on more of the discordant items and p < 0.05.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path

from ..io.files import write_files


def mcnemar_p(base_only: int, adapter_only: int) -> float:
    """Exact two-sided McNemar p-value: discordant pairs under a fair coin."""
    n = base_only + adapter_only
    if n == 0:
        return 1.0
    k = min(base_only, adapter_only)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _predictions(result: dict) -> list[dict]:
    path = Path(result["output"]) / "predictions.jsonl" if "output" in result else None
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def beats_base(base: dict, adapter: dict) -> tuple[str, float]:
    ours = {p["index"]: p for p in _predictions(adapter) if not p.get("contaminated")}
    theirs = {p["index"]: p for p in _predictions(base) if not p.get("contaminated")}
    common = ours.keys() & theirs.keys()
    base_only = sum(theirs[i]["correct"] and not ours[i]["correct"] for i in common)
    adapter_only = sum(ours[i]["correct"] and not theirs[i]["correct"] for i in common)
    p = mcnemar_p(base_only, adapter_only)
    return ("yes" if adapter_only > base_only and p < 0.05 else "no"), p


def _mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values) * 100
    return f"{mean:.1f}" + (f" ± {statistics.stdev(values) * 100:.1f}" if len(values) > 1 else "")


def _rows(settings, runs: dict, evals: dict) -> list[dict]:
    rows = []
    for name in ["base", *runs]:
        row = {"method": name}
        for task, results in evals.get(name, {}).items():
            row[f"{task} acc"] = _mean_std([r["accuracy"] for r in results])
            row[f"{task} clean"] = _mean_std([r.get("clean_accuracy") for r in results])
            if name != "base":
                verdict, p = beats_base(evals["base"][task][0], results[0])
                row[f"{task} beats base"] = f"{verdict} (p={p:.2g})"
        if name != "base":
            first = next(iter(runs[name]["seeds"].values()))
            folder, run = Path(first["folder"]), first["run"]
            meta = json.loads((folder / "adapter_config.json").read_text())
            metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            tokens = sum(m.get("tokens", 0) for m in metrics if "loss" in m)
            row.update({"lr": runs[name]["lr"], "trainable": meta["parameters"],
                        "file KB": round((folder / "adapter_model.safetensors").stat().st_size / 1024, 1),
                        "train s": run["seconds"], "tokens/s": round(tokens / max(run["seconds"], 1e-9)),
                        "peak GB": run.get("peak_rss_gb"), "final loss": run["final_loss"]})
        rows.append(row)
    return rows


def _markdown(rows: list[dict], settings) -> str:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return (f"# Study leaderboard\n\nModel {settings.model}; training data {settings.train_data}; budget "
            f"{settings.budget}; seeds {settings.seeds}; tasks {', '.join(settings.tasks)} (accuracy in %, mean ± "
            "std over seeds; clean = items not in the training data).\n\n" + "\n".join(lines) + "\n")


def _plots(out: Path, rows: list[dict], runs: dict, settings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    task = settings.tasks[0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows[1:]:
        value = row.get(f"{task} acc", "-").split(" ")[0]
        if value != "-":
            ax.scatter(row["trainable"], float(value))
            ax.annotate(row["method"], (row["trainable"], float(value)), fontsize=8)
    ax.axhline(float(rows[0].get(f"{task} acc", "0").split(" ")[0] or 0), color="gray", linestyle="--",
               label="base model")
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=f"{task} accuracy (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_parameters.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, info in runs.items():
        folder = Path(next(iter(info["seeds"].values()))["folder"])
        metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        points = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
        ax.plot(*zip(*points, strict=True), label=name, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "loss_curves.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, info in runs.items():
        if info["sweep"]:
            rates = sorted(r for r, loss in info["sweep"].items() if loss is not None)  # failed pilots: no point
            ax.plot(rates, [info["sweep"][r] for r in rates], "o-", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")  # a diverged rate (prefix tuning at 3e-2: 17) would flatten every other curve
    ax.set(xlabel="learning rate", ylabel="pilot validation loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "lr_sweep.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        values = [float(v.split(" ")[0]) if (v := row.get(f"{t} acc", "-")) != "-" else 0 for t in settings.tasks]
        ax.bar([t + i * width for t in range(len(settings.tasks))], values, width, label=row["method"])
    ax.set_xticks([t + 0.4 for t in range(len(settings.tasks))], settings.tasks)
    ax.set(ylabel="accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plots / "accuracy_per_task.png", dpi=100)
    plt.close(fig)


def write_report(settings, out: Path, runs: dict, evals: dict) -> list[dict]:
    rows = _rows(settings, runs, evals)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    write_files(out, {"leaderboard.md": _markdown(rows, settings), "leaderboard.csv": table.getvalue(),
                      "leaderboard.json": json.dumps({"rows": rows, "runs": runs}, indent=2, default=str) + "\n"},
                {}, record=True)
    _plots(out, rows, runs, settings)
    return rows
