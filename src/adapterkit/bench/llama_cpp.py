"""adapterkit's GGUF files in llama.cpp itself, through llama-cpp-python built from its sdist.

    python -m adapterkit.bench.llama_cpp [--prompts 32] [--new-tokens 32]   # appends to BENCHMARKS.md

Installs llama-cpp-python (the registry's sdist, compiled here: CMake and a C++ compiler) into
$ADAPTERKIT_CACHE/llama-cpp-python unless it imports already, then on the default model: a LoRA adapter
(r 8 on every linear layer, seeded random B) exported as base GGUF + LoRA GGUF (`--lora`) and as the
merged GGUF (f32, and q8_0), and greedy output compared with adapterkit's (fp32, unmerged adapter) on
--prompts LLM-Adapters math questions in the alpaca template. Both sides get the same token ids
(adapterkit's tokenizer), so only the model files are compared. A failed build is recorded with its
reason instead. Not run by the tests.
"""

from __future__ import annotations

import datetime
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapterkit.bench.train_speed import ROOT, machine, write_section

PACKAGE = "llama_cpp_python"  # PyPI's llama-cpp-python (pip normalises the name)
VERSION = "0.3.36"


def site_dir() -> Path:
    from adapterkit.models import cache_dir

    return cache_dir() / PACKAGE


def install(log: Path) -> str | None:
    """Import llama_cpp, building it first if needed; None when it imports, else the failure's reason."""
    target = site_dir()
    sys.path.insert(0, str(target))
    try:
        importlib.import_module("llama_cpp")
        return None
    except ImportError:
        pass
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    command = [sys.executable, "-m", "pip", "install", "--no-binary", PACKAGE, "--no-deps", "--target", str(target),
               f"{PACKAGE}=={VERSION}", "diskcache"]
    start = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    minutes = (time.time() - start) / 60
    if done.returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-6:]
        return f"pip install {PACKAGE}=={VERSION} from the sdist failed after {minutes:.0f} min: " + " / ".join(tail)
    importlib.invalidate_caches()
    try:
        importlib.import_module("llama_cpp")
    except ImportError as exc:
        return f"{PACKAGE} built in {minutes:.0f} min but does not import: {exc}"
    print(f"built {PACKAGE} {VERSION} in {minutes:.1f} min", flush=True)
    return None


def build_adapter(folder: Path):
    import adapterkit as ak

    model, tokenizer = ak.load_model()
    adapted = ak.adapt(model, ak.LoraConfig(r=8, alpha=16, target_modules="all-linear"), tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(0)
    adapted.load_adapter_state_dict({k: torch.randn(v.shape, generator=generator) * (0.02 if k.endswith("lora_B")
                                                                                      else v.std().item())
                                     for k, v in adapted.adapter_state_dict().items()})
    adapted.eval()
    adapted.save(folder)
    return adapted, tokenizer


def prompts(tokenizer, count: int) -> list[list[int]]:
    from adapterkit.data import Template
    from adapterkit.resources import LLM_ADAPTERS

    items = json.loads((LLM_ADAPTERS / "dataset" / "gsm8k" / "test.json").read_text())[:count]
    return [tokenizer(Template("alpaca").prompt(item, tokenizer))["input_ids"] for item in items]


@torch.no_grad()
def ours(model, tokenizer, ids: list[int], new: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


def theirs(llm, ids: list[int], new: int, eos: int) -> list[int]:
    llm.reset()
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if token == eos:
            out.append(token)
            break
        out.append(token)
        if len(out) == new:
            break
    return out


def agreement(reference: list[list[int]], got: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(reference, got, strict=True))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
              for a, b in zip(reference, got, strict=True)]
    return {"identical": same, "prompts": len(reference),
            "prefix": sum(prefix) / len(prefix), "tokens": sum(map(len, reference)) / len(reference)}


def run(args) -> str:
    from adapterkit.cli import main as cli

    work = Path(tempfile.mkdtemp(prefix="gguf-runtime-bench-"))
    failure = install(work / "pip.log")
    if failure:
        return f"{PACKAGE} could not be used: {failure}"
    import llama_cpp
    from llama_cpp import Llama as Runtime

    adapted, tokenizer = build_adapter(work / "adapter")
    for name, flags in (("lora.gguf", []), ("merged-f32.gguf", ["--merged", "--outtype", "f32"]),
                        ("merged-q8_0.gguf", ["--merged", "--outtype", "q8_0"])):
        assert cli(["export", "--adapter", str(work / "adapter"), "--format", "gguf", "--output", str(work / name),
                    *flags]) == 0
    assert cli(["export", "--adapter", str(work / "adapter"), "--format", "ollama", "--output", str(work / "ollama"),
                "--outtype", "f32"]) == 0  # base.gguf (f32) + adapter.gguf
    ids = prompts(tokenizer, args.prompts)
    reference = [ours(adapted, tokenizer, p, args.new_tokens) for p in ids]
    rows = []
    setups = {"base f32 + LoRA GGUF (--lora)": (work / "ollama" / "base.gguf", work / "lora.gguf"),
              "merged f32": (work / "merged-f32.gguf", None), "merged q8_0": (work / "merged-q8_0.gguf", None)}
    for label, (model_path, lora_path) in setups.items():
        llm = Runtime(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                              n_ctx=1024, n_threads=os.cpu_count() or 2, seed=0, verbose=False)
        got = [theirs(llm, p, args.new_tokens, tokenizer.eos_token_id) for p in ids]
        rows.append((label, agreement(reference, got)))
        del llm
    lines = ["| GGUF files run | prompts with identical greedy output | mean tokens before the first difference |",
             "| --- | --- | --- |"]
    for label, a in rows:
        lines.append(f"| {label} | {a['identical']} / {a['prompts']} | {a['prefix']:.1f} of {a['tokens']:.1f} |")
    return (f"{PACKAGE} {llama_cpp.__version__} (built from the sdist), default model, LoRA r 8 on every "
            f"linear layer (random B, seed 0); {args.prompts} gsm8k questions in the alpaca template, {args.new_tokens} "
            "new tokens, greedy; reference: adapterkit fp32 with the adapter unmerged; the same token ids on both "
            "sides.\n\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    from adapterkit.settings import Parser

    parser = Parser(prog="python -m adapterkit.bench.llama_cpp", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    body = run(args)
    report = (f"## adapterkit's GGUF files in llama_cpp ({PACKAGE})\n\nCommand: `python -m adapterkit.bench.llama_cpp`  \n"
              f"Date: {datetime.date.today()}  \nMachine: {machine()}\n\n{body}\n")
    write_section(ROOT / "BENCHMARKS.md", report, name="llama_cpp")
    print(body)


if __name__ == "__main__":
    main()
