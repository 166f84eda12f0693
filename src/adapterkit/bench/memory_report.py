"""BENCHMARKS.md's memory section and its plot, from the results of adapterkit.bench.memory."""

from __future__ import annotations

import datetime
from pathlib import Path

from adapterkit.bench.tables import _table
from adapterkit.bench.train_speed import machine, write_section

GIB = 1024 ** 3


def _error(r: dict) -> float:
    return 100 * (r["plan"]["total"] / r["peak_bytes"] - 1)


def rows(results: list[dict]) -> list[list]:
    done = {(r["shape"], r["library"], r["method"], r["base"], r["gc"]): r for r in results if "error" not in r}
    out = []
    for r in results:
        name = f"{r['library']} {r['method']}, {r['base']}" + (" + GC" if r["gc"] else "")
        if "error" in r:
            out.append([r["shape"], name, "-", "-", f"{r['plan']['total'] / GIB:.2f}", "-", "-", "-",
                        f"not measured: {r['error'][:90]}"])
            continue
        peft = done.get((r["shape"], "peft", "lora", r["base"], r["gc"])) if r["library"] == "adapterkit" and \
            r["method"] == "lora" else None
        ours = r["library"] == "adapterkit"  # plan predicts adapterkit's runs (PEFT's loss keeps full fp32 logits)
        out.append([r["shape"], name, f"{r['trainable']:,}", f"{r['peak_bytes'] / GIB:.2f}",
                    f"{r['plan']['total'] / GIB:.2f}" if ours else "-", f"{_error(r):+.1f}%" if ours else "-",
                    f"{r['seconds_per_step']:.1f}",
                    f"{r['losses'][-1]:.3f}", f"{r['peak_bytes'] / peft['peak_bytes']:.2f}x" if peft else "-"])
    return out


def targets(results: list[dict]) -> list[str]:
    ok = [r for r in results if "error" not in r]
    lines = []
    big = [r for r in ok if r["shape"] == "1.1b" and r["library"] == "adapterkit" and r["method"] == "lora"
           and r["base"] == "nf4" and r["gc"]]
    for r in big:
        lines.append(f"- 1.1B-shape model, LoRA on an nf4 base with gradient checkpointing, {r['batch']} x {r['seq']} "
                     f"tokens a step in micro-batches of {r['micro_batch_size']}: peak RSS "
                     f"{r['peak_bytes'] / GIB:.2f} GiB ({r['peak_bytes'] / 1e9:.2f} GB) against the 4 GB target.")
    by = {(r["shape"], r["library"], r["method"], r["base"], r["gc"]): r for r in ok}
    for (shape, library, method, base, gc), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        bf16 = by.get((shape, library, method, "bf16", gc))
        if base == "nf4" and bf16 and library == "adapterkit":
            lines.append(f"- {shape} {method}{' + GC' if gc else ''}: a step on the nf4 base takes "
                         f"{r['seconds_per_step'] / bf16['seconds_per_step']:.2f}x a step on the bf16 base "
                         "(target: at most 1.5x).")
    ours = [r for r in ok if r["library"] == "adapterkit"]
    if ours:
        errors = [abs(_error(r)) for r in ours]
        within = sum(e <= 15 for e in errors)
        lines.append(f"- `plan` against the measured peak: {within} of {len(ours)} adapterkit configurations within 15%, largest "
                     f"error {max(errors):.1f}%, median {sorted(errors)[len(errors) // 2]:.1f}%.")
    return lines


def figure(results: list[dict], path: Path) -> None:
    """Peak RSS against the model's parameter count, one line per base and checkpointing setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    ok = [r for r in results if "error" not in r and r["method"] == "lora"]
    series = sorted({(r["library"], r["base"], r["gc"]) for r in ok})
    for library, base, gc in series:
        points = sorted((r["plan"]["base_parameters"] / 1e9, r["peak_bytes"] / GIB) for r in ok
                        if (r["library"], r["base"], r["gc"]) == (library, base, gc))
        style = "--" if library == "peft" else "-"
        ax.plot([x for x, _ in points], [y for _, y in points], style, marker="o" if gc else "s",
                label=f"{library} LoRA, {base}" + (" + GC" if gc else ""))
    predicted = sorted((r["plan"]["base_parameters"] / 1e9, r["plan"]["total"] / GIB) for r in ok
                       if r["library"] == "adapterkit")
    ax.scatter([x for x, _ in predicted], [y for _, y in predicted], marker="x", color="black", label="plan's prediction")
    ax.axhline(4e9 / GIB, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("base model parameters (billions)")
    ax.set_ylabel("peak RSS (GiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_report(results: list[dict], args, markdown: Path, note: str = "") -> None:
    picture = markdown.parent / "benchmarks" / "memory.png"
    picture.parent.mkdir(exist_ok=True)
    figure(results, picture)
    first = results[0]
    command = (f"nice -n 10 python -m adapterkit.bench.memory --models {args.models} --steps {args.steps} --batch "
               f"{args.batch} --seq {args.seq} --micro-batch-size {args.micro_batch_size}"
               + (f" --preset {args.preset}" if getattr(args, "preset", None) else ""))
    if getattr(args, "rerun", None):  # rows of an earlier results file measured again
        command = f"python -m adapterkit.bench.memory --rerun {args.rerun} --threads {args.threads}"
    text = (f"## Memory: quantized bases, gradient checkpointing, `adapterkit plan`\n\nCommand: `{command}`  \n"
            f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}\n\n"
            f"Each row is one process: {first['steps']} optimizer steps of {first['batch']} x {first['seq']} tokens "
            f"(micro-batches of {first['micro_batch_size']}, every position labelled), the method's default options, "
            "AdamW. Peak RSS is the process's getrusage ru_maxrss (loading included); s/step is the median of the "
            "steps after the first; `plan` is `adapterkit plan` for the same settings, computed without running the "
            "model. The bf16, int8 and nf4 bases compute in bf16 under autocast; GC is gradient checkpointing. PEFT "
            "runs LoRA (r 8, alpha 16, q and v, as adapterkit's defaults) on the same base with transformers' "
            "checkpointing and its model's own loss.\n\n" + (note + "\n\n" if note else "")
            + "\n".join(targets(results)) + "\n\n"
            + _table(["model", "configuration", "trainable", "peak RSS GiB", "plan GiB", "plan error", "s/step",
                      f"loss at step {first['steps']}", "peak vs PEFT"], rows(results))
            + f"\n![peak memory against model size]({picture.relative_to(markdown.parent)})\n")
    write_section(markdown, text, "memory")
