"""What an nf4 base costs LoRA: the training loss against a bf16 base, the accuracy, and the merge.

    python -m adapterkit.bench.nf4_quality        # writes its section of BENCHMARKS.md

On the default model, the demo's LoRA (r 16 on every linear layer, lr 1e-3, batches of 8 in micro-batches
of 4, the math training file) trains for `--steps` steps twice through `adapterkit train`: on the bf16
base and on the nf4 base (QLoRA's format, bitsandbytes), the same batches in the same order. Both
adapters are evaluated on the demo's clean math slice (test items not in the training file), greedy,
fp32 (the nf4 one on its nf4 base). The nf4 adapter is then merged into the nf4 base dequantized to
fp32 (`adapterkit merge`'s default for it), and the merged checkpoint is evaluated on the same items,
against two references: the unmerged adapter on that same dequantized base in fp32 (what merging must
preserve), and the unmerged adapter on the nf4 base itself (in fp32 on bitsandbytes' unpacked path:
quantization.keep_precision). `--reuse` keeps runs and evaluations already in the output folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

from adapterkit.bench.train_speed import ROOT, machine, write_section


def _losses(run: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def _answers(folder: Path) -> list[dict]:
    """Each item's prediction record: its whole greedy text ("output"), the answer extracted ("prediction")."""
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--output", default="runs/nf4-quality")
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--reuse", action="store_true", help="keep the runs and evaluations already in --output")
    args = parser.parse_args(argv)
    from adapterkit.io.files import write_files
    from adapterkit.models import DEFAULT_MODEL
    from adapterkit.recipes.common import load_for_inference
    from adapterkit.recipes.demo import TRAIN_FILE, clean_math_slice
    from adapterkit.recipes.evaluate import EvalSettings, evaluate, run_eval
    from adapterkit.recipes.merge import MergeSettings, merge
    from adapterkit.recipes.train import TrainSettings, train

    out = Path(args.output)
    items = out / "clean_math_slice.json"
    write_files(out, {items.name: json.dumps(clean_math_slice(args.items), indent=1)}, {})
    common = dict(data=str(items), task_type="math", train_data=str(TRAIN_FILE), batch_size=16, max_new_tokens=160)
    runs, evals = {}, {}

    def done(folder: Path) -> bool:
        return args.reuse and (folder / "results.json").is_file()

    for quantize in ("none", "nf4"):
        runs[quantize] = out / f"lora-{quantize}"
        if done(out / f"eval-{quantize}") and (runs[quantize] / "run.json").is_file():
            evals[quantize] = json.loads((out / f"eval-{quantize}" / "results.json").read_text())
            continue
        train(TrainSettings(
            data=str(TRAIN_FILE), output=str(runs[quantize]), method="lora", batch_size=8, micro_batch_size=4,
            max_steps=args.steps, learning_rate=1e-3, warmup_steps=5, val_set_size=0, precision="bf16",
            quantize=quantize, save_steps=args.steps, overwrite=True,
            method_options={"r": 16, "alpha": 32, "target_modules": "all-linear"}))
        evals[quantize] = run_eval(EvalSettings(DEFAULT_MODEL, str(runs[quantize]), output=str(out / f"eval-{quantize}"),
                                                quantize=quantize, **common))
    if done(out / "eval-merged"):
        drift = json.loads((out / "merged-nf4" / "merge_report.json").read_text())["max_logit_change"]
        evals["merged"] = json.loads((out / "eval-merged" / "results.json").read_text())
    else:
        drift = merge(MergeSettings(adapter=str(runs["nf4"]), output=str(out / "merged-nf4"), overwrite=True))
        evals["merged"] = run_eval(EvalSettings(str(out / "merged-nf4"), None, output=str(out / "eval-merged"),
                                                **common))
    if not (out / "eval-dequantized" / "predictions.jsonl").is_file() or not args.reuse:
        model, tokenizer = load_for_inference(DEFAULT_MODEL, str(runs["nf4"]), quantize="nf4", dequantize=True)
        records = json.loads(items.read_text())
        predictions, _ = evaluate(model, tokenizer, records, "math", "alpaca", 16, 160)
        write_files(out / "eval-dequantized", {"predictions.jsonl": "".join(json.dumps(p) + "\n" for p in predictions)}, {})
    if not (done(out / "eval-merged-bf16")):  # the precision bitsandbytes' CPU kernels compute the nf4 model in
        run_eval(EvalSettings(str(out / "merged-nf4"), None, output=str(out / "eval-merged-bf16"), precision="bf16",
                              **common))
    answers = {folder: _answers(out / folder) for folder in ("eval-nf4", "eval-dequantized", "eval-merged",
                                                            "eval-merged-bf16")}
    agree = {(ref, merged, key): sum(a[key] == b[key] for a, b in zip(answers[f"eval-{ref}"], answers[merged],
                                                                      strict=True))
             for ref, merged in (("dequantized", "eval-merged"), ("nf4", "eval-merged"), ("nf4", "eval-merged-bf16"))
             for key in ("output", "prediction")}
    items_count = len(answers["eval-merged"])
    losses = {q: _losses(run) for q, run in runs.items()}
    tail = {q: statistics.mean(values[-10:]) for q, values in losses.items()}
    seconds = {q: json.loads((run / "run.json").read_text())["seconds"] for q, run in runs.items()}
    rows = "".join(
        f"| {label} | {losses[q][0]:.4f} | {losses[q][-1]:.4f} | {tail[q]:.4f} | {seconds[q] / args.steps:.2f} | "
        f"{100 * evals[q]['accuracy']:.0f}% |\n" for q, label in (("none", "bf16 base"), ("nf4", "nf4 base")))
    rows += ("| nf4 adapter merged into the dequantized base (fp32) | - | - | - | - | "
             f"{100 * evals['merged']['accuracy']:.0f}% |\n")

    def agreement(ref: str, merged: str) -> str:
        text, answer = (agree[(ref, merged, key)] for key in ("output", "prediction"))
        return f"{text} of {items_count} whole answers, {answer} of {items_count} extracted answers"
    report = ("## LoRA on an nf4 base: loss, accuracy, merge\n\n"
              f"Command: `python -m adapterkit.bench.nf4_quality --steps {args.steps} --items {args.items}`  \n"
              f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}\n\n"
              "The demo's LoRA (r 16, every linear layer, lr 1e-3, 8 a step in micro-batches of 4) trained through "
              f"`adapterkit train` for {args.steps} steps on the math training file, once on the bf16 base and once "
              "on the nf4 base (same batches, same order), both computing in bf16; each evaluated greedily in fp32 "
              f"on the demo's {args.items} clean math items (the nf4 adapter on its nf4 base).\n\n"
              "| base | loss at step 1 (the base alone: LoRA's B starts at 0) | loss at the last step | "
              "mean loss, last 10 steps | s/step (whole run) | accuracy |\n"
              "| --- | --- | --- | --- | --- | --- |\n" + rows +
              f"\n- nf4 against bf16, mean loss over the last 10 steps: {100 * (tail['nf4'] / tail['none'] - 1):+.2f}% "
              f"(target: within 3%). Before any training, on the same first batch, the nf4 base alone is "
              f"{100 * (losses['nf4'][0] / losses['none'][0] - 1):+.1f}% above the bf16 base: the rounding of this "
              "135M model's weights to 4 bits, which the adapter has closed part of after "
              f"{args.steps} steps.\n"
              f"- Accuracy cost of the nf4 base: {100 * (evals['nf4']['accuracy'] - evals['none']['accuracy']):+.0f} "
              "points.\n"
              f"- The nf4 adapter merged into the dequantized base (largest logit change merged against unmerged at "
              f"the merge's probe: {drift:.2e}) against the unmerged adapter on the same dequantized base, both fp32: "
              f"{agreement('dequantized', 'eval-merged')} agree (greedy, up to 160 tokens).\n"
              f"- Against the unmerged adapter on the nf4 base itself (the issue's target: 95%): the merged model in "
              f"fp32, {agreement('nf4', 'eval-merged')}; in bf16, {agreement('nf4', 'eval-merged-bf16')}. "
              "In fp32 the nf4 model computes in fp32: adapterkit keeps its layers off bitsandbytes' packed CPU "
              "inference kernel, which rounds activations and block scales to bf16 whatever the model's dtype "
              "(before that change: 86 of 100 whole answers). The bf16 merged model differs from both by bf16's "
              "own rounding, which greedy decoding of a 135M model carries from one token into the rest of the "
              "answer.\n")
    print(report)
    if args.write:
        write_section(Path(args.write), report, "nf4_quality")


if __name__ == "__main__":
    main()
