"""Training and generation speed of adapterkit against Hugging Face PEFT, side by side in one run.

    adapterkit bench                                 # all sections, writes ./BENCHMARKS.md
    adapterkit bench --sections train --steps 3      # (python -m adapterkit.bench.train_speed: the same)

Every measurement runs in its own subprocess (so peak memory is its own), on the default model
(SmolLM2-135M-Instruct), with batches of 8 x 256 tokens packed from math_data.json (the same batches
for every configuration). Speeds are medians over --steps steps after --warmup steps. Absolute numbers
depend on the machine and its load; compare the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from adapterkit.resources import LLM_ADAPTERS

ROOT = Path.cwd()  # where BENCHMARKS.md and benchmarks/ are written (the checkout, when run from there)
DATA = LLM_ADAPTERS / "ft-training_set" / "math_data.json"
LORA = {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
OURS = {
    "lora": ("lora", LORA),
    "adapter-h": ("adapter-h", {"bottleneck_size": 64}),
    "adapter-p": ("adapter-p", {"bottleneck_size": 64}),
    "adapter-p (LoRA's size)": ("adapter-p", {"bottleneck_size": 13}),  # 15,565 vs 15,360 weights a layer
    "parallel": ("parallel", {"bottleneck_size": 64}),
    "prompt-tuning": ("prompt-tuning", {"num_virtual_tokens": 20}),
    "p-tuning": ("p-tuning", {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    "prefix-tuning": ("prefix-tuning", {"num_virtual_tokens": 20, "encoder_hidden_size": 512}),
    "p-tuning-v2": ("p-tuning-v2", {"num_virtual_tokens": 20}),
}
PEFT_SAME = {"lora": "lora", "prompt-tuning": "prompt", "p-tuning": "ptuning", "prefix-tuning": "prefix"}


def packed_batches(tokenizer, count: int, batch: int = 8, length: int = 256) -> list[dict]:
    """`count` batches of `batch` rows, each exactly `length` tokens of consecutive examples."""
    from adapterkit.data import Template, encode

    records = json.loads(DATA.read_text())
    stream_ids, stream_labels = [], []
    for record in records:
        example = encode(record, tokenizer, Template("alpaca"), cutoff=length)
        stream_ids += example["input_ids"]
        stream_labels += example["labels"]
        if len(stream_ids) >= count * batch * length:
            break
    batches = []
    for b in range(count):
        rows = range(b * batch, (b + 1) * batch)
        ids = torch.tensor([stream_ids[r * length:(r + 1) * length] for r in rows])
        labels = torch.tensor([stream_labels[r * length:(r + 1) * length] for r in rows])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return batches


def build(spec: dict):
    """(model, tokenizer, step function) for one configuration."""
    import adapterkit as ak
    from adapterkit.training import labelled_loss

    base_bf16 = spec["precision"] in ("bf16", "peft-bf16-base")
    model, tokenizer = ak.load_model(dtype="bf16" if base_bf16 else "fp32")
    seq_len = spec.get("length", 256)
    torch.manual_seed(0)
    autocast = spec["precision"] != "fp32"
    if spec["library"] == "peft":
        import peft

        kind = spec["method"]
        config = {"lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                  "prompt": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20),
                  "ptuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                              encoder_hidden_size=128),
                  "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20,
                                                            prefix_projection=True, encoder_hidden_size=512),
                  }[kind]()
        model.set_attn_implementation("sdpa")  # PEFT's users load with transformers' default attention
        model = peft.get_peft_model(model, config)
        if kind == "lora" and spec.get("rank"):
            raise SystemExit("rank sweep is for adapterkit only")

        def loss_of(batch):
            return model(**batch).loss
    else:
        from adapterkit.training.allocator import tune_allocator

        tune_allocator()  # what adapterkit's training loop does (see src/adapterkit/training/allocator.py)
        method, options = OURS[spec["method"]]
        options = dict(options)
        if spec.get("rank"):
            options.update(r=spec["rank"], alpha=2 * spec["rank"])
        model = ak.adapt(model, ak.get_method(method).config_class(**options), tokenizer=tokenizer)

        def loss_of(batch):
            return labelled_loss(model, batch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.get("lr", 3e-4), weight_decay=0.0)

    def step(batch) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return model, tokenizer, step, seq_len, sum(p.numel() for p in params)


def run_train(spec: dict) -> dict:
    model, tokenizer, step, length, trainable = build(spec)
    steps = spec["warmup"] + spec["steps"]
    batches = packed_batches(tokenizer, steps, length=length)
    times, losses = [], []
    for batch in batches:
        start = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - start)
    median = statistics.median(times[spec["warmup"]:])
    return {"seconds_per_step": median, "tokens_per_s": 8 * length / median, "trainable": trainable,
            "final_loss": losses[-1], "losses": losses, "peak_rss_gb": _peak_rss_gb()}


GENERATE_VARIANTS = ["base", "lora merged"] + [m for m in OURS if m != "adapter-p (LoRA's size)"]


def _live_adapter(base, name: str, tokenizer):
    """`base` (a copy) with adapter `name`, its zero-initialised parts made non-zero."""
    import adapterkit as ak

    method, options = OURS[name.removesuffix(" merged")]
    adapted = ak.adapt(base, ak.get_method(method).config_class(**options), tokenizer=tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for key, p in adapted.adapter_state_dict().items():
            if key.endswith(("lora_B", "adapter_up.weight")):
                p.normal_(0, 0.01)
    return adapted.merge_and_unload() if name.endswith(" merged") else adapted


@torch.no_grad()
def run_generate(spec: dict) -> dict:
    """Every variant in one process, timed in interleaved rounds (the order rotates each round), so
    a change in the machine's load hits all of them alike; ratios are medians of per-round ratios."""
    import copy

    import adapterkit as ak

    base, tokenizer = ak.load_model()
    base.eval()
    names = spec["variants"]
    models = {n: base if n == "base" else _live_adapter(copy.deepcopy(base), n, tokenizer).eval() for n in names}
    prompts = {b: tokenizer(["Question: what is 12 times 7? Answer step by step."] * b, return_tensors="pt")
               for b in spec["batches"]}
    settings = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for name, batch in ((n, b) for n in names for b in spec["batches"]):  # warm-up
        models[name].generate(**prompts[batch], max_new_tokens=4, **settings)
    times: dict[tuple[str, int], list[float]] = {(n, b): [] for n in names for b in spec["batches"]}
    for round_ in range(spec["repeats"]):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for batch in spec["batches"]:
            for name in order:
                start = time.perf_counter()
                models[name].generate(**prompts[batch], max_new_tokens=64, min_new_tokens=64, **settings)
                times[name, batch].append(time.perf_counter() - start)
    rows = []
    for (name, batch), seconds in times.items():
        ratios = [b / t for b, t in zip(times["base", batch], seconds, strict=True)]
        rows.append({"method": name, "batch": batch, "tokens_per_s": batch * 64 / statistics.median(seconds),
                     "vs_base": statistics.median(ratios), "vs_base_range": [min(ratios), max(ratios)]})
    return {"rows": rows, "peak_rss_gb": _peak_rss_gb()}


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def measure(spec: dict) -> dict:
    """Run one configuration in a fresh process; returns its result."""
    done = subprocess.run([sys.executable, "-m", "adapterkit.bench.train_speed", "--one", json.dumps(spec)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_configs(steps: int, warmup: int) -> list[dict]:
    """Each PEFT run next to ours of the same method, so a drift in the machine's speed over the
    run moves both sides of a ratio alike."""
    common = {"section": "train", "steps": steps, "warmup": warmup}
    configs = []
    for ours in OURS:
        if ours in PEFT_SAME:
            precisions = ("fp32", "autocast", "peft-bf16-base") if ours == "lora" else ("fp32",)
            configs += [{**common, "library": "peft", "method": PEFT_SAME[ours], "precision": p} for p in precisions]
            configs.append({**common, "library": "adapterkit", "method": ours, "precision": "fp32"})
        configs.append({**common, "library": "adapterkit", "method": ours, "precision": "bf16"})
    return configs


def main(argv: list[str] | None = None) -> None:
    from adapterkit.settings import Parser  # one-line usage errors, as every adapterkit command

    parser = Parser(prog="adapterkit bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--sections", default="train,loss,generate,scaling")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--loss-steps", type=int, default=50)
    parser.add_argument("--generate-repeats", type=int, default=7)
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to update ('' = none)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--only", help="run only configurations whose description contains this text")
    args = parser.parse_args(argv)
    if args.one:
        spec = json.loads(args.one)
        torch.set_num_threads(torch.get_num_threads())
        result = run_generate(spec) if spec["section"] == "generate" else run_train(spec)
        print(json.dumps({**spec, **result}))
        return

    from tqdm import tqdm

    sections = args.sections.split(",")
    configs: list[dict] = []
    if "train" in sections:
        configs += train_configs(args.steps, args.warmup)
    if "loss" in sections:
        configs += [{"section": "loss", "library": lib, "method": "lora", "precision": prec, "steps": args.loss_steps,
                     "warmup": 0, "lr": 3e-4} for lib, prec in (("peft", "fp32"), ("adapterkit", "fp32"),
                                                               ("adapterkit", "bf16"))]
    if "generate" in sections:
        configs += [{"section": "generate", "variants": GENERATE_VARIANTS, "batches": [1, 8],
                     "repeats": args.generate_repeats}]
    if "scaling" in sections:
        common = {"section": "scaling", "library": "adapterkit", "method": "lora", "precision": "bf16",
                  "steps": 2, "warmup": 1}
        configs += [{**common, "length": n} for n in (256, 512, 1024)]
        configs += [{**common, "rank": r} for r in (8, 16, 32, 64)]
    if args.only:
        configs = [c for c in configs if args.only in json.dumps(c)]
    if not configs:
        parser.error(f"no configuration of sections {args.sections!r} matches --only {args.only!r}")
    results = [measure(spec) | {"spec": spec} for spec in tqdm(configs, desc="benchmark", unit="run")]
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    report = render(results, args)
    print(report)
    if args.write:
        from adapterkit.bench.tables import figure

        picture = Path(args.write).parent / "benchmarks" / "train_speed.png"
        picture.parent.mkdir(exist_ok=True)
        figure(results, picture)
        report += f"\n![training tokens/s, generation vs base, LoRA scaling]({picture.relative_to(Path(args.write).parent)})\n"
        write_section(Path(args.write), report)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def render(results: list[dict], args) -> str:
    from adapterkit.bench.tables import tables

    stamp = datetime.date.today().isoformat()
    command = "adapterkit bench " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in (("sections", args.sections), ("steps", args.steps),
                                                    ("warmup", args.warmup), ("loss_steps", args.loss_steps),
                                                    ("generate_repeats", args.generate_repeats)))
    return (f"## Training and generation speed against PEFT\n\nCommand: `{command}`  \nDate: {stamp}  \n"
            f"Machine: {machine()}\n\n" + tables(results))


def write_section(path: Path, report: str, name: str = "train_speed") -> None:
    """Replace the section between this benchmark's markers (or append it)."""
    begin, end = f"<!-- {name} begin -->", f"<!-- {name} end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{report}\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
