"""Peak memory, seconds per step and loss of training on a full-precision and a quantized base, with and
without gradient checkpointing, for adapterkit (LoRA, a bottleneck adapter, a prompt method) and PEFT's
LoRA on the same base; `adapterkit plan`'s prediction next to each measured peak.

    python -m adapterkit.bench.memory                        # every configuration, writes BENCHMARKS.md
    python -m adapterkit.bench.memory --models 135m --only lora --steps 2

Each configuration runs in its own process; its peak is that process's peak resident set size
(getrusage ru_maxrss: loading included). Models: the default model (135M) and randomly initialised
models of the default model's family built from configs in code (about 360M and 1.1B parameters), saved
once under the adapterkit cache. Batches: --batch rows of --seq tokens packed from math_data.json with
every position labelled (what `plan` assumes), in micro-batches of --micro-batch-size. Seconds per step
are the median of the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path.cwd()
# The random models: the default model's config with these sizes (its vocabulary, 49,152 tokens, tied embeddings).
SHAPES = {
    "135m": None,
    "360m": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
             "intermediate_size": 2560},
    "1.1b": {"hidden_size": 2048, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "intermediate_size": 5632},
}
BASES = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "int8": ("bf16", "int8"), "nf4": ("bf16", "nf4")}
METHODS = {"lora": {}, "adapter-p": {}, "prompt-tuning": {}}  # each method's defaults (what `plan` assumes too)
GB = 1024 ** 3


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_name(shape: str) -> str:
    """The default model's name, or the folder of a random model (made on first use, in its own process)."""
    from adapterkit.models import DEFAULT_MODEL, cache_dir

    if SHAPES[shape] is None:
        return DEFAULT_MODEL
    folder = cache_dir() / "bench-models" / f"random-{shape}"
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "adapterkit.bench.memory", "--make", shape], check=True)
    return str(folder)


def make_model(shape: str) -> None:
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from adapterkit.models import cache_dir, default_model_folder, load_tokenizer

    source = default_model_folder()
    config = AutoConfig.from_pretrained(source)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)  # bf16 on disk: half the bytes
    target = cache_dir() / "bench-models" / f"random-{shape}"
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(tmp)
    load_tokenizer(source).save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def batches(tokenizer, count: int, rows: int, length: int) -> list[dict]:
    """`count` batches of `rows` x `length` tokens of consecutive examples, every position labelled."""
    import torch

    from adapterkit.data import Template, encode
    from adapterkit.resources import LLM_ADAPTERS

    records = json.loads((LLM_ADAPTERS / "ft-training_set" / "math_data.json").read_text())
    stream: list[int] = []
    for record in records:
        stream += encode(record, tokenizer, Template("alpaca"), cutoff=length, train_on_inputs=True)["input_ids"]
        if len(stream) >= count * rows * length:
            break
    out = []
    for b in range(count):
        ids = torch.tensor(stream[b * rows * length:(b + 1) * rows * length]).view(rows, length)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def run_one(spec: dict) -> dict:
    """Train `spec` for its steps in this process; the numbers this process measured."""
    import torch

    import adapterkit as ak
    from adapterkit.training import labelled_loss, train_steps
    from adapterkit.training.allocator import tune_allocator, usual_thresholds

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    tune_allocator()  # as the train recipe's loop does, before the model is loaded
    started = _rss_now()
    precision, quantize = BASES[spec["base"]]
    model, tokenizer = ak.load_model(spec["model"], precision, quantize)
    loaded = _rss_now()
    # adapterkit's training loop sets its own allocator setting (again: a quantized load leaves glibc's usual
    # thresholds). PEFT trains on glibc's usual thresholds, as its users do, or with adapterkit's setting
    # where the spec asks ("allocator": "adapterkit"), to tell the two apart.
    if spec["library"] == "peft":
        usual_thresholds()
        if spec.get("allocator") == "adapterkit":
            tune_allocator(checkpointing=spec["gc"])
    torch.manual_seed(0)
    micro = spec["micro_batch_size"]
    data = batches(tokenizer, spec["steps"], spec["batch"], spec["seq"])
    micro_batches = iter([{k: v[i:i + micro] for k, v in b.items()} for b in data
                          for i in range(0, spec["batch"], micro)])
    autocast = torch.bfloat16 if precision == "bf16" else None
    if spec["library"] == "peft":
        import peft

        if spec["gc"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.set_attn_implementation("sdpa")  # PEFT's users load with transformers' default attention
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                           lora_dropout=0.0, task_type="CAUSAL_LM"))
        loss_of = None  # its own: full logits and transformers' loss
    else:
        model = ak.adapt(model, ak.get_method(spec["method"]).config_class(**METHODS[spec["method"]]),
                         tokenizer=tokenizer)
        if spec["gc"]:
            model.gradient_checkpointing_enable()
        loss_of = labelled_loss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    times = [time.perf_counter()]
    if loss_of is None:
        losses = _peft_steps(model, micro_batches, spec["steps"], spec["batch"] // micro, autocast, times)
    else:
        losses = train_steps(model, micro_batches, spec["steps"], lr=3e-4, accumulation=spec["batch"] // micro,
                             autocast=autocast, on_step=lambda step, loss: times.append(time.perf_counter()))
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"peak_bytes": _peak(), "rss_start": started, "rss_loaded": loaded, "losses": losses,
            "seconds_per_step": statistics.median(steps[1:] or steps), "step_seconds": steps, "trainable": trainable}


def _peft_steps(model, micro_batches, steps: int, accumulation: int, autocast, times: list) -> list[float]:
    """PEFT's side: the same AdamW steps, its model's own loss."""
    import torch

    from adapterkit.training.allocator import release_free_memory

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        total = 0.0
        for _ in range(accumulation):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
                loss = model(**next(micro_batches)).loss
            release_free_memory()  # a no-op unless adapterkit's allocator setting was asked for
            (loss / accumulation).backward()
            total += loss.item() / accumulation
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        times.append(time.perf_counter())
    return losses


def configurations(models: list[str], steps: int, batch: int, seq: int, micro: int) -> list[dict]:
    """LoRA on every base with and without checkpointing, PEFT's LoRA beside it on the bases it runs on,
    and the other two methods on the default model."""
    common = {"steps": steps, "batch": batch, "seq": seq, "micro_batch_size": micro}
    out = []
    for shape in models:
        for base in BASES:
            for gc in (False, True):
                out.append({**common, "shape": shape, "library": "adapterkit", "method": "lora", "base": base, "gc": gc})
                out.append({**common, "shape": shape, "library": "peft", "method": "lora", "base": base, "gc": gc})
        if shape == "135m":
            out += [{**common, "shape": shape, "library": "adapterkit", "method": m, "base": base, "gc": gc}
                    for m in METHODS if m != "lora" for base in ("bf16", "nf4") for gc in (False, True)]
    return out


# What two shared cores afford in one sitting: LoRA on each base on the default model, the target
# configurations on the larger shapes, PEFT beside LoRA, the other two methods once each.
AFFORDABLE = {
    "135m": [("adapterkit", "lora", base, False) for base in BASES]
    + [("adapterkit", "lora", "bf16", True), ("adapterkit", "lora", "nf4", True), ("peft", "lora", "bf16", False),
       ("peft", "lora", "nf4", False), ("adapterkit", "adapter-p", "bf16", False),
       ("adapterkit", "prompt-tuning", "bf16", False)],
    "360m": [("adapterkit", "lora", "bf16", False), ("adapterkit", "lora", "nf4", True)],
    "1.1b": [("adapterkit", "lora", "nf4", True)],
}


def label(spec: dict) -> str:
    return (f"{spec['shape']} {spec['library']} {spec['method']} {spec['base']}"
            + (" +GC" if spec["gc"] else "") + (" (adapterkit's allocator)" if spec.get("allocator") else ""))


def predict(spec: dict) -> dict:
    """`adapterkit plan`'s breakdown for the configuration (PEFT's runs: the same model and adapter)."""
    from adapterkit.recipes.plan import PlanSettings, plan

    precision, quantize = BASES[spec["base"]]
    return plan(PlanSettings(model=model_name(spec["shape"]), method=spec["method"], quantize=quantize,
                             precision=precision, gradient_checkpointing=spec["gc"], seq=spec["seq"],
                             batch=spec["batch"], micro_batch_size=spec["micro_batch_size"]))


def measure(spec: dict, timeout: float) -> dict:
    """One configuration in a fresh process: its result, or {"error": ...}."""
    try:
        done = subprocess.run([sys.executable, "-m", "adapterkit.bench.memory", "--one", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": (lines[-1] if lines else f"exit {done.returncode}")[:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from adapterkit.settings import Parser

    parser = Parser(prog="python -m adapterkit.bench.memory", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--make", help=argparse.SUPPRESS)
    parser.add_argument("--models", default="135m,360m,1.1b", help="of " + ", ".join(SHAPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--only", help="run only configurations whose label contains each of these comma-separated "
                        "texts")
    parser.add_argument("--skip", help="leave out configurations whose label contains any of these comma-separated "
                        "texts")
    parser.add_argument("--preset", choices=("full", "affordable"), default="full",
                        help="affordable: the subset in AFFORDABLE (what two shared cores manage in about half an hour)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads a configuration (1 on shared cores)")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from --json, plan recomputed")
    parser.add_argument("--rerun", choices=("adapterkit", "peft"),
                        help="measure again, in place, the rows of --json of this library (the others are kept)")
    parser.add_argument("--note", help="a paragraph for the markdown section (what was left out and why)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one configuration may take")
    parser.add_argument("--write", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to update ('' = none)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "memory.json"))
    args = parser.parse_args(argv)
    if args.make:
        return make_model(args.make)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(run_one(spec)))
        return None
    models = args.models.split(",")
    unknown = [m for m in models if m not in SHAPES]
    if unknown:
        parser.error(f"unknown model size {unknown[0]!r}; sizes: {', '.join(SHAPES)}")
    if args.render:
        results = json.loads(Path(args.json).read_text())
        for r in results:
            r["plan"] = predict(r)
        from adapterkit.bench.memory_report import write_report

        return write_report(results, args, Path(args.write), args.note or "")
    if args.rerun:
        return rerun(Path(args.json), args.rerun, args)
    specs = configurations(models, args.steps, args.batch, args.seq, args.micro_batch_size)
    if args.preset == "affordable":
        specs = [s for s in specs if (s["library"], s["method"], s["base"], s["gc"]) in AFFORDABLE[s["shape"]]]
    for spec in specs:
        spec["threads"] = args.threads
    if args.only:
        specs = [s for s in specs if all(t in label(s) for t in args.only.split(","))]
    if args.skip:
        specs = [s for s in specs if not any(t in label(s) for t in args.skip.split(","))]
    if not specs:
        parser.error("no configuration left to run")
    results = []
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        spec["model"] = model_name(spec["shape"])
        results.append(_measured_row(spec, args.timeout))
        out.write_text(json.dumps(results, indent=1) + "\n")  # what is done so far survives a stop
    _write_markdown(results, args)
    return None


def rerun(path: Path, library: str, args) -> None:
    """Measure `library`'s rows of a results file again with the code as it is now (--threads each),
    writing each row back as it finishes, then the markdown."""
    results = json.loads(path.read_text())
    keys = ("shape", "library", "method", "base", "gc", "steps", "batch", "seq", "micro_batch_size", "model")
    for i, row in enumerate(results):
        if row["library"] == library:
            results[i] = _measured_row({**{k: row[k] for k in keys}, "threads": args.threads}, args.timeout)
            path.write_text(json.dumps(results, indent=1) + "\n")
    _write_markdown(results, args)


def _measured_row(spec: dict, timeout: float) -> dict:
    """One configuration measured in its own process, with plan's prediction beside it; printed."""
    started = time.time()
    result = {**spec, "label": label(spec), "plan": predict(spec), **measure(spec, timeout)}
    result["wall_seconds"] = round(time.time() - started, 1)
    print(_line(result), flush=True)
    return result


def _write_markdown(results: list[dict], args) -> None:
    if args.write:
        from adapterkit.bench.memory_report import write_report

        write_report(results, args, Path(args.write), args.note or "")


def _line(r: dict) -> str:
    predicted = r["plan"]["total"]
    if "error" in r:
        return f"{r['label']}: {r['error']}"
    return (f"{r['label']}: peak {r['peak_bytes'] / GB:.2f} GB (plan {predicted / GB:.2f}, "
            f"{100 * (predicted / r['peak_bytes'] - 1):+.0f}%), {r['seconds_per_step']:.1f} s/step, "
            f"loss {r['losses'][-1]:.3f}")


if __name__ == "__main__":
    main()
