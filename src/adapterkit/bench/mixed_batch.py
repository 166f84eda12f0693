"""Mixed-batch generation: 8 LoRA adapters, one per row, adapterkit against PEFT's `adapter_names`.

    python -m adapterkit.bench.mixed_batch            # appends its table to BENCHMARKS.md

Default model, fp32, 8 rows with a different adapter each (r 8 on q, v, random non-zero B), 32 new
tokens, greedy, KV cache; the median of --repeats runs after one warm-up. Both libraries must produce
the same tokens, which is checked first. The base model without adapters (plain transformers) runs the
same batch: its speed is the limit a mixed batch aims at.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch

from adapterkit.bench.train_speed import ROOT, machine, write_section

NAMES = [f"task{i}" for i in range(8)]


def build_pair():
    import peft

    import adapterkit as ak

    ours, tokenizer = ak.load_model()
    theirs, _ = ak.load_model()
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(theirs, config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        theirs.add_adapter(name, config)
    ours_adapted = ak.adapt(ours, ak.LoraConfig(r=8, alpha=16), name=NAMES[0])
    for name in NAMES[1:]:
        ak.adapt(ours_adapted, ak.LoraConfig(r=8, alpha=16), name=name)
    torch.manual_seed(0)
    with torch.no_grad():
        for name in NAMES:
            for key, p in ours_adapted.adapter_state_dict(name).items():
                if key.endswith("lora_B"):
                    p.normal_(0, 0.02)
            for key, p in theirs.named_parameters():
                if f".{name}." in key and ("lora_A" in key or "lora_B" in key):
                    path = key.removeprefix("base_model.model.").split(".lora_")[0]
                    ours_key = f"{path}.lora_{'A' if 'lora_A' in key else 'B'}"
                    p.copy_(ours_adapted.adapter_state_dict(name)[ours_key])
    base, _ = ak.load_model()
    return ours_adapted.eval(), theirs.eval(), base.eval(), tokenizer


def _alone(adapted, name, prompt, row, kwargs):
    adapted.set_active(name)
    return adapted.generate(**{k: v[row:row + 1] for k, v in prompt.items()}, **kwargs)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()
    ours, theirs, base, tokenizer = build_pair()
    prompt = tokenizer(["Question: what is 12 times 7? Answer step by step."] * len(NAMES), return_tensors="pt")
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    runs = {"adapterkit": lambda: ours.generate(**prompt, adapter_names=NAMES, **kwargs),
            "peft": lambda: theirs.generate(**prompt, adapter_names=NAMES, **kwargs),
            "base model, no adapters": lambda: base.generate(**prompt, **kwargs)}
    outputs = {name: run() for name, run in runs.items()}  # warm-up, and the check
    one_at_a_time = torch.cat([_alone(ours, name, prompt, row, kwargs) for row, name in enumerate(NAMES)])
    if not torch.equal(outputs["adapterkit"], one_at_a_time):
        raise SystemExit("the mixed batch generated other tokens than each adapter alone; the figures would be meaningless")
    if not torch.equal(outputs["adapterkit"], outputs["peft"]):
        raise SystemExit("the two libraries generated different tokens; the comparison would be meaningless")
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # round robin, so a change in the machine's load hits every run alike
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    speed = {name: len(NAMES) * 32 / statistics.median(seconds) for name, seconds in times.items()}
    table = ("## Mixed-batch generation, 8 LoRA adapters\n\n"
             f"Command: `python -m adapterkit.bench.mixed_batch --repeats {args.repeats}`  \n"
             f"Date: {datetime.date.today().isoformat()}  \nMachine: {machine()}\n\n"
             "8 rows, each with its own LoRA adapter (r 8 on q, v), 32 new tokens, fp32, greedy; both libraries "
             "produce identical tokens, equal to each adapter run alone. adapterkit runs the adapters of a mixed "
             "batch as one gathered product per layer (stacked A and B, a batched product per row).\n\n"
             "| run | tokens/s | vs base model | vs PEFT |\n| --- | --- | --- | --- |\n"
             + "".join(f"| {n} | {v:.1f} | {v / speed['base model, no adapters']:.2f}x | {v / speed['peft']:.2f}x |\n"
                       for n, v in speed.items()))
    print(table)
    if args.write:
        write_section(Path(args.write), table, "mixed_batch")


if __name__ == "__main__":
    main()
