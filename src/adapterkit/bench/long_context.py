"""How long a sequence trains at batch 1 within a memory budget: adapterkit against PEFT.

    python -m adapterkit.bench.long_context --lengths 512,1024,2048    # writes its section of BENCHMARKS.md

The 1.1B-shape model of `bench.memory` (random weights, the default model's family), an nf4 base with
gradient checkpointing, LoRA r 8 on q and v, batch 1, one optimizer step a run, every position labelled;
each length and library in its own process (`bench.memory`'s runner: peak RSS by getrusage). PEFT runs
with transformers' checkpointing and its model's own loss (full logits). A run at the budget itself
would take hours on two CPU cores (a 1.1B step costs about 6 x 1.1 G x tokens in products), so the
longest length within the budget is projected from the measured peaks: a straight line through the two
longest measured lengths (activations grow linearly once checkpointing keeps one layer's worth and the
attention kernel keeps no length-squared matrix), stated as a projection beside the measured points.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from adapterkit.bench.memory import GB, label, measure, model_name, predict
from adapterkit.bench.train_speed import ROOT, machine, write_section

# PEFT as its users run it (glibc's usual allocator thresholds), and with adapterkit's allocator setting
# for checkpointed runs (large blocks mapped, the heap trimmed before the backward), to tell code from allocator.
RUNS = {"adapterkit": {"library": "adapterkit"}, "peft": {"library": "peft"},
        "peft-allocator": {"library": "peft", "allocator": "adapterkit"}}


def projected_length(points: list[tuple[int, int]], budget: int) -> int | None:
    """The length where the line through the two longest (length, peak) points reaches `budget`."""
    (n1, p1), (n2, p2) = sorted(points)[-2:]
    slope = (p2 - p1) / (n2 - n1)
    return None if slope <= 0 else int(n2 + (budget - p2) / slope)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--budget-gb", type=float, default=16.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--render", action="store_true", help="only rewrite the section from the saved results")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")]
    budget = int(args.budget_gb * 1e9)
    saved = ROOT / "benchmarks" / "long_context.json"
    results: dict[str, list[dict]] = json.loads(saved.read_text()) if args.render else {run: [] for run in RUNS}
    for run in [] if args.render else results:
        for seq in lengths:
            spec = {"shape": "1.1b", "method": "lora", "base": "nf4", "gc": True, "steps": 1,
                    "batch": 1, "seq": seq, "micro_batch_size": 1, "threads": args.threads, **RUNS[run]}
            spec["model"] = model_name("1.1b")
            result = {**spec, **measure(spec, args.timeout)}
            results[run].append(result)
            print(f"{label(spec)} seq {seq}: " + (result.get("error") or f"peak {result['peak_bytes'] / GB:.2f} GiB, "
                                                  f"{result['seconds_per_step']:.0f} s"), flush=True)
    saved.parent.mkdir(exist_ok=True)
    saved.write_text(json.dumps(results, indent=1) + "\n")
    lengths = [r["seq"] for r in results["adapterkit"]]
    table = "".join(f"| {seq} | " + " | ".join(
        (f"{r['peak_bytes'] / GB:.2f} GiB, {r['seconds_per_step']:.0f} s" if "error" not in r else r["error"])
        for r in (results[run][i] for run in RUNS))
        + f" | {predict(results['adapterkit'][i])['total'] / GB:.2f} GiB |\n" for i, seq in enumerate(lengths))
    projected = {run: projected_length([(r["seq"], r["peak_bytes"]) for r in rs if "error" not in r], budget)
                 for run, rs in results.items()}
    ours, theirs, theirs_allocator = (projected[run] for run in RUNS)
    ratio, ratio_allocator = (f"{ours / other:.1f}x" if ours and other else "-" for other in (theirs, theirs_allocator))
    ours_text, theirs_text, allocator_text = (f"{n:,}" if n else "-" for n in (ours, theirs, theirs_allocator))
    report = ("## Long context: the longest sequence within a memory budget\n\n"
              f"Command: `python -m adapterkit.bench.long_context --lengths {','.join(map(str, lengths))} --budget-gb "
              f"{args.budget_gb:g}`  \nDate: {datetime.date.today().isoformat()}  \nMachine: {machine()}\n\n"
              "The 1.1B-shape model (random weights), nf4 base, gradient checkpointing, LoRA r 8 on q and v, batch 1, "
              "one optimizer step with every position labelled; peak RSS of each run's process and its step time.\n\n"
              "PEFT runs on glibc's usual allocator thresholds, as its users do, and once more with adapterkit's "
              "allocator setting for checkpointed runs (blocks of 4 MiB and more mapped, the free heap returned "
              "before the backward: src/adapterkit/training/allocator.py), to tell the code from the allocator.\n\n"
              "| tokens | adapterkit | PEFT + transformers' checkpointing | the same PEFT run, adapterkit's allocator "
              "setting | `adapterkit plan` for adapterkit |\n"
              "| --- | --- | --- | --- | --- |\n" + table +
              f"\nProjected from the two longest measured lengths (a straight line; not run at the budget, which "
              f"would take hours on this CPU): within {args.budget_gb:g} GB, adapterkit trains about "
              f"{ours_text} tokens and PEFT about {theirs_text}: **{ratio}** (target 4x); against PEFT with adapterkit's "
              f"allocator setting ({allocator_text} tokens), {ratio_allocator}. adapterkit's "
              "loss takes the output head's input rows and computes logits a block at a time inside a fused head "
              "and cross-entropy, keeping none, and its checkpointing keeps each layer's input; PEFT's model materialises the full fp32 logits and their gradient, which grow with every "
              "token by the vocabulary's width.\n")
    print(report)
    if args.write:
        write_section(Path(args.write), report, "long_context")


if __name__ == "__main__":
    main()
