"""Packing against padded micro-batches: tokens of real data trained per second.

    python -m adapterkit.bench.packing        # writes its section of BENCHMARKS.md

The same records of LLM-Adapters' math training file (alpaca template, cutoff 256, as `adapterkit train`
encodes them), the same LoRA (r 8 on q, v) on the default model in the default precision (`auto`),
trained twice over: padded (micro-batches of 8 records, each padded to its longest record, what
`--no-packing` trains) and packed (`--packing`: records placed best-fit decreasing into rows of 256 tokens,
micro-batches of 8 rows, per-record positions and a block-diagonal mask). Each micro-batch is one
forward, backward and AdamW step. The two alternate over several rounds, so a change in the machine's
load weighs on both; the figure is real (non-padding) tokens over wall seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from adapterkit.bench.train_speed import DATA, LORA, ROOT, machine, write_section


def micro_batches(records: int, width: int, batch: int):
    """(padded, packed) lists of micro-batches over the first `records` records, and their real tokens."""
    import adapterkit as ak
    from adapterkit.data import Template, collate, encode
    from adapterkit.packing import collate_packed, pack

    _, tokenizer = ak.load_model()
    examples = [encode(r, tokenizer, Template("alpaca"), cutoff=width) for r in json.loads(DATA.read_text())[:records]]
    padded = [collate(examples[i:i + batch], tokenizer.pad_token_id) for i in range(0, len(examples), batch)]
    rows = pack(examples, width)
    packed = [collate_packed(rows[i:i + batch], tokenizer.pad_token_id) for i in range(0, len(rows), batch)]
    return padded, packed, sum(len(e["input_ids"]) for e in examples)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    import adapterkit as ak
    from adapterkit.hardware import resolve_precision
    from adapterkit.training import labelled_loss
    from adapterkit.training.allocator import tune_allocator

    tune_allocator()
    precision = resolve_precision("auto")
    padded, packed, real = micro_batches(args.records, 256, 8)
    model, tokenizer = ak.load_model(dtype="bf16" if precision == "bf16" else "fp32")
    torch.manual_seed(0)
    adapted = ak.adapt(model, ak.LoraConfig(**LORA))
    adapted.train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)

    def train(batches) -> float:
        start = time.perf_counter()
        for batch in batches:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = labelled_loss(adapted, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    train(packed[:1])  # warm-up
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    for _ in range(args.rounds):
        times["padded"].append(train(padded))
        times["packed"].append(train(packed))
    rates = {kind: real / statistics.median(seconds) for kind, seconds in times.items()}
    slots = {"padded": sum(b["input_ids"].numel() for b in padded), "packed": sum(b["input_ids"].numel() for b in packed)}
    rows = "".join(f"| {kind} | {len(batches)} | {slots[kind]:,} | {100 * real / slots[kind]:.0f}% | "
                   f"{statistics.median(times[kind]):.1f} | {rates[kind]:.0f} |\n"
                   for kind, batches in (("padded", padded), ("packed", packed)))
    report = ("## Packing: real tokens per second\n\n"
              f"Command: `python -m adapterkit.bench.packing --records {args.records} --rounds {args.rounds}`  \n"
              f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}\n\n"
              f"The first {args.records} records of the math training file ({real:,} real tokens), LoRA r 8 on q, v, "
              f"precision `auto` ({precision}); padded micro-batches of 8 records against packed micro-batches of "
              "8 rows of 256 tokens, one optimizer step each, alternating over "
              f"{args.rounds} rounds (median wall seconds a pass). Load average {os.getloadavg()[0]:.1f} at the end "
              "(2.0: the cores to ourselves).\n\n"
              "| batches | micro-batches | token slots | real | s a pass | real tokens/s |\n| --- | --- | --- | --- | --- | --- |\n"
              + rows + f"\nPacked against padded: **{rates['packed'] / rates['padded']:.2f}x** real tokens per second "
              f"(target 1.5x). The padded batches are {100 * real / slots['padded']:.0f}% real tokens, so removing "
              f"every padding token at no other cost could give at most {slots['padded'] / real:.2f}x; records of "
              "this file are 82-256 tokens (median 153), and few pairs fit one row of 256.\n")
    print(report)
    if args.write:
        write_section(Path(args.write), report, "packing")


if __name__ == "__main__":
    main()
