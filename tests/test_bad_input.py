"""Bad input, one table: every case runs `adapterkit.cli.main(argv)` and must exit 2 with exactly one
stderr line `adapterkit: error: ...` naming the problem, no traceback, and the folder it was given
byte for byte unchanged. Property tests (Hypothesis) throw random data files, YAML configs and
adapter configs at the readers: an AdapterkitError or a result, never another exception."""

from __future__ import annotations

import json
import math
import shutil
import string
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny, tiny_model

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.data import read_records
from adapterkit.recipes.common import generation_info
from adapterkit.recipes.train import TrainSettings

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "adapterkit-hypothesis")  # not a .hypothesis in the checkout
RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
           for a in range(4) for b in range(4)]
TASK = [{"instruction": f"What is {a} + {b}?", "input": "", "output": "", "answer": str(a + b)} for a in range(3)
        for b in range(2)]


# ----- what the cases share, made once ---------------------------------------------------------------
@dataclass
class World:
    root: Path
    llama: Path       # a tiny LLaMA folder (model + tokenizer)
    gpt2: Path        # a tiny GPT-2 folder (64 positions)
    data: Path        # good training records
    task: Path        # a good math test file
    adapter: Path     # a trained LoRA adapter of `llama`
    prompt: Path      # a prompt-tuning adapter of `llama` (not mergeable)
    bottleneck: Path  # an adapter-h adapter of `llama` (no PEFT equivalent)
    run: Path         # a finished 2-step training run of `llama` with its checkpoints


def _save_adapter(model_dir: Path, config, folder: Path) -> Path:
    model, tokenizer = ak.load_model(str(model_dir))
    adapted = ak.adapt(model, config, tokenizer=tokenizer)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.2)
    adapted.records["default"].trained_steps = 5
    adapted.generation_info = generation_info(tokenizer, "bare")
    adapted.save(folder)
    return folder


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_llama_dir) -> World:
    root = tmp_path_factory.mktemp("bad-input-world")
    data, task = root / "data.json", root / "task.json"
    data.write_text(json.dumps(RECORDS))
    task.write_text(json.dumps(TASK))
    run = root / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(run),
                 "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--save-steps", "1",
                 "--cutoff-len", "64", "--val-set-size", "0", "--warmup-steps", "0", "--template", "bare",
                 "--lora-r", "2"]) == 0
    return World(root=root, llama=Path(tiny_llama_dir), gpt2=save_tiny("gpt2", root / "gpt2"), data=data, task=task,
                 adapter=_save_adapter(tiny_llama_dir, ak.LoraConfig(r=4, alpha=8), root / "lora"),
                 prompt=_save_adapter(tiny_llama_dir, ak.PromptTuningConfig(num_virtual_tokens=4), root / "prompt"),
                 bottleneck=_save_adapter(tiny_llama_dir, ak.AdapterHConfig(bottleneck_size=4), root / "adapter-h"),
                 run=run)


# ----- helpers the cases build their inputs with -----------------------------------------------------
def write(d: Path, name: str, content: str | bytes) -> Path:
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def train(w: World, d: Path, *extra, data=None, output=None) -> list[str]:
    """A train command that would succeed (one step on the tiny LLaMA) but for `extra`."""
    return ["train", "--model", str(w.llama), "--data", str(data or w.data), "--output", str(output or d / "out"),
            "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "1", "--cutoff-len", "64",
            "--val-set-size", "0", "--warmup-steps", "0", "--template", "bare", *map(str, extra)]


def generate(w: World, adapter, *extra) -> list[str]:
    return ["generate", "--model", str(w.llama), "--adapter", str(adapter), "--prompt", "Add 1 and 2.",
            "--max-new-tokens", "2", *map(str, extra)]


def combine(w: World, d: Path, *extra, other=None, weights="0.7,0.3") -> list[str]:
    """A combine command that would succeed (the good adapter with `other`, default itself) but for `extra`."""
    return ["combine", str(w.adapter), str(other or w.adapter), "--weights", weights, "--model", str(w.llama),
            "--output", str(d / "combined"), *map(str, extra)]


def evaluate(w: World, d: Path, *extra, adapter=None) -> list[str]:
    base = ["eval", "--model", str(w.llama), "--max-new-tokens", "2", "--output", str(d / "eval")]
    return base + (["--adapter", str(adapter)] if adapter else []) + list(map(str, extra))


def adapter_copy(w: World, d: Path, meta=None, tensors=None, source=None) -> Path:
    """A copy of the good adapter, its config JSON and weights changed by `meta` / `tensors` (in place)."""
    folder = d / "adapter"
    shutil.copytree(source or w.adapter, folder)
    if meta is not None:
        data = json.loads((folder / "adapter_config.json").read_text())
        data = meta(data) or data
        (folder / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        weights = load_file(folder / "adapter_model.safetensors")
        tensors(weights)
        save_file(weights, folder / "adapter_model.safetensors")
    return folder


def drop(*keys):
    def change(meta):
        for key in keys:
            meta.pop(key, None)
    return change


def put(path: str, value):
    """Set meta[a][b]... = value for path 'a.b'."""
    def change(meta):
        *parents, last = path.split(".")
        target = meta
        for p in parents:
            target = target[p]
        target[last] = value
    return change


def nan_in_first(weights):
    key = sorted(weights)[0]
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")


def yaml_config(w: World, d: Path, text: str | bytes, *extra) -> list[str]:
    return [*train(w, d, *extra), "--config", str(write(d, "run.yaml", text))]


def hf_dataset_folder(d: Path) -> Path:
    folder = d / "hfdata"
    write(folder, "dataset_info.json", "{not json")
    write(folder, "state.json", "{}")
    return folder


def checkpoint_copy(w: World, d: Path, change: Callable[[Path], None]) -> Path:
    """The finished run's folder, its newest checkpoint changed by `change`."""
    out = d / "out"
    shutil.copytree(w.run, out)
    change(sorted((out / "checkpoints").iterdir())[-1])
    return out


def model_copy(w: World, d: Path, change: Callable[[Path], None]) -> Path:
    folder = d / "model"
    shutil.copytree(w.llama, folder)
    change(folder)
    return folder


def changed(folder: Path, change: Callable[[Path], object]) -> Path:
    change(folder)
    return folder


def unlink(name):
    return lambda folder: (folder / name).unlink()


def overwrite_file(name, content: bytes):
    return lambda folder: (folder / name).write_bytes(content)


# ----- the table: (id, argv builder, distinctive part of the one error line) ------------------------
CASES: list[tuple[str, Callable[[World, Path], list[str]], str]] = [
    # data files
    ("data-missing", lambda w, d: train(w, d, data=d / "none.json"), "does not exist"),
    ("data-empty-file", lambda w, d: train(w, d, data=write(d, "e.json", "")), "not valid JSON at line 1"),
    ("data-empty-list", lambda w, d: train(w, d, data=write(d, "e.json", "[]")), "the dataset is empty"),
    ("data-object", lambda w, d: train(w, d, data=write(d, "o.json", '{"instruction": "x"}')),
     "expected a JSON list of records"),
    ("data-string", lambda w, d: train(w, d, data=write(d, "s.json", '"records"')), "expected a JSON list"),
    ("data-no-instruction", lambda w, d: train(w, d, data=write(d, "r.json", '[{"output": "x"}]')),
     "record 1 lacks a string 'instruction'"),
    ("data-record-not-object", lambda w, d: train(w, d, data=write(d, "r.json", json.dumps([RECORDS[0], 7]))),
     "record 2 lacks"),
    ("data-instruction-number", lambda w, d: train(w, d, data=write(d, "r.json", '[{"instruction": 5}]')),
     "record 1 lacks"),
    ("data-output-list", lambda w, d: train(w, d, data=write(d, "r.json", '[{"instruction": "a", "output": [1]}]')),
     "record 1 has a list as 'output'; it must be text"),
    ("data-output-null", lambda w, d: train(w, d, data=write(d, "r.json", '[{"instruction": "a", "output": null}]')),
     "record 1 has null as 'output'; it must be text"),
    ("data-input-object", lambda w, d: train(w, d, data=write(d, "r.json", json.dumps(
        [*RECORDS, {"instruction": "a", "input": {"x": 1}, "output": "b"}]))), "record 17 has an object as 'input'"),
    ("data-binary", lambda w, d: train(w, d, data=write(d, "b.json", bytes(range(256)) * 4)), "binary data"),
    ("data-latin-1", lambda w, d: train(w, d, data=write(d, "l.json", json.dumps(
        [{"instruction": "café", "output": "ok"}], ensure_ascii=False).encode("latin-1"))), "not UTF-8 text"),
    ("data-utf-16", lambda w, d: train(w, d, data=write(d, "u.json", json.dumps(RECORDS).encode("utf-16"))),
     "is UTF-16 text"),
    ("data-utf-16-no-bom", lambda w, d: train(w, d, data=write(d, "u.json", json.dumps(RECORDS).encode("utf-16-le"))),
     "is UTF-16 text"),
    ("data-trailing-garbage", lambda w, d: train(w, d, data=write(d, "t.json", json.dumps(RECORDS) + " ]")),
     "not valid JSON"),
    ("jsonl-bad-line", lambda w, d: train(w, d, data=write(d, "r.jsonl", json.dumps(RECORDS[0]) + "\n{oops\n")),
     "line 2 is not valid JSON"),
    ("jsonl-blank", lambda w, d: train(w, d, data=write(d, "r.jsonl", "\n\n")), "the dataset is empty"),
    ("jsonl-list-line", lambda w, d: train(w, d, data=write(d, "r.jsonl", "[1, 2]\n")), "record 1 lacks"),
    ("parquet-not-parquet", lambda w, d: train(w, d, data=write(d, "r.parquet", json.dumps(RECORDS))),
     "not a readable parquet file"),
    ("folder-not-dataset", lambda w, d: train(w, d, data=write(d, "folder/notes.txt", "hi").parent),
     "not a saved Hugging Face dataset"),
    ("dataset-folder-broken", lambda w, d: train(w, d, data=hf_dataset_folder(d)),
     "not a readable saved Hugging Face dataset"),
    ("data-cutoff-cuts-everything", lambda w, d: train(w, d, "--cutoff-len", "4"),
     "every training record loses its whole response"),
    ("data-too-few-records", lambda w, d: train(w, d, "--batch-size", "64", "--micro-batch-size", "2"),
     "fewer micro-batches"),
    ("val-set-takes-all", lambda w, d: train(w, d, "--val-set-size", "16"), "leaves no training data"),
    # flags
    ("lr-negative", lambda w, d: train(w, d, "--learning-rate", "-1e-3"), "--learning-rate must be greater than 0"),
    ("lr-nan", lambda w, d: train(w, d, "--learning-rate", "nan"), "--learning-rate must be a finite number"),
    ("lr-inf", lambda w, d: train(w, d, "--learning-rate", "inf"), "--learning-rate must be a finite number"),
    ("lr-zero", lambda w, d: train(w, d, "--learning-rate", "0"), "--learning-rate must be greater than 0"),
    ("lr-text", lambda w, d: train(w, d, "--learning-rate", "fast"), "--learning-rate: 'fast' is not a valid float"),
    ("max-steps-negative", lambda w, d: train(w, d, "--max-steps", "-2"), "--max-steps must be at least 1"),
    ("max-steps-zero", lambda w, d: train(w, d, "--max-steps", "0"), "--max-steps must be at least 1"),
    ("max-steps-fraction", lambda w, d: train(w, d, "--max-steps", "1.5"), "--max-steps: '1.5' is not a valid"),
    ("limit-zero", lambda w, d: train(w, d, "--limit", "0"), "--limit must be at least 1"),
    ("precision-bad", lambda w, d: train(w, d, "--precision", "fp64"), "--precision must be one of "),
    ("template-bad", lambda w, d: train(w, d, "--template", "llama3"), "--template must be one of alpaca"),
    ("method-unknown", lambda w, d: train(w, d, "--method", "lorax"), "unknown method 'lorax'"),
    ("flag-of-another-method", lambda w, d: train(w, d, "--num-virtual-tokens", "4"),
     "--num-virtual-tokens is not an option of lora"),
    ("lora-r-zero", lambda w, d: train(w, d, "--lora-r", "0"), "lora r must be a positive integer"),
    ("lora-r-negative", lambda w, d: train(w, d, "--lora-r", "-4"), "lora r must be a positive integer"),
    ("lora-alpha-negative", lambda w, d: train(w, d, "--lora-alpha", "-1"), "lora alpha must be a positive"),
    ("lora-dropout-one", lambda w, d: train(w, d, "--lora-dropout", "1.5"), "lora dropout must be in [0, 1)"),
    ("loha-on-conv1d", lambda w, d: [*train(w, d, "--method", "loha"), "--model", str(w.gpt2)],
     "loha cannot adapt transformer.h.0.attn.c_attn: it is a Conv1D layer"),
    ("loha-rank-dropout-one", lambda w, d: train(w, d, "--method", "loha", "--loha-rank-dropout", "1"),
     "loha rank_dropout must be in [0, 1)"),
    ("lokr-decompose-factor-zero", lambda w, d: train(w, d, "--method", "lokr", "--decompose-factor", "0"),
     "lokr decompose_factor must be -1 or a positive integer"),
    ("adalora-target-above-init", lambda w, d: train(w, d, "--method", "adalora", "--adalora-init-r", "4",
                                                     "--adalora-target-r", "8"), "adalora target_r (8) is above init_r (4)"),
    ("adalora-schedule-too-long", lambda w, d: train(w, d, "--method", "adalora", "--adalora-tinit", "1"),
     "adalora schedule does not fit: tinit (1) + tfinal (0) must be below total_step (1)"),
    ("adalora-schedule-explicit", lambda w, d: train(w, d, "--method", "adalora", "--adalora-total-step", "4",
                                                     "--adalora-tfinal", "4"), "must be below total_step (4)"),
    ("adalora-unknown-option", lambda w, d: train(w, d, "--method", "adalora", "--lora-r", "4"),
     "--lora-r is not an option of adalora"),
    ("vera-dropout-one", lambda w, d: train(w, d, "--method", "vera", "--vera-dropout", "1"),
     "vera dropout must be in [0, 1)"),
    ("oft-block-size-not-dividing", lambda w, d: train(w, d, "--method", "oft", "--oft-block-size", "5"),
     "oft block_size 5 does not divide the 32 input features of model.layers.0.self_attn.q_proj"),
    ("lora-dropout-nan", lambda w, d: train(w, d, "--lora-dropout", "nan"), "lora dropout must be a finite"),
    ("lora-bias-bad", lambda w, d: train(w, d, "--lora-bias", "some"), "lora bias must be one of"),
    ("rank-pattern-text", lambda w, d: train(w, d, "--rank-pattern", "q_proj"), "expected NAME=VALUE pairs"),
    ("rank-pattern-not-number", lambda w, d: train(w, d, "--rank-pattern", "q_proj=big"),
     "rank_pattern must map module names to positive numbers"),
    ("rank-pattern-zero", lambda w, d: train(w, d, "--rank-pattern", "q_proj=0"), "rank_pattern must map"),
    ("rank-pattern-fraction", lambda w, d: train(w, d, "--rank-pattern", "q_proj=2.5"),
     "rank_pattern values must be integers"),
    ("rank-pattern-bad-json", lambda w, d: train(w, d, "--rank-pattern", "{q_proj: 2"), "--rank-pattern"),
    ("target-modules-unknown", lambda w, d: train(w, d, "--target-modules", "query"), "q_proj"),
    ("lora-layers-out-of-range", lambda w, d: train(w, d, "--layers", "7"), "7"),
    ("loraplus-negative", lambda w, d: train(w, d, "--loraplus-lr-ratio", "-2"), "loraplus_lr_ratio must be positive"),
    ("batch-not-multiple", lambda w, d: train(w, d, "--batch-size", "6", "--micro-batch-size", "4"),
     "--batch-size 6 is not a multiple of --micro-batch-size 4"),
    ("batch-zero", lambda w, d: train(w, d, "--batch-size", "0"), "--batch-size must be at least 1"),
    ("micro-batch-zero", lambda w, d: train(w, d, "--micro-batch-size", "0"), "--micro-batch-size must be at least 1"),
    ("cutoff-one", lambda w, d: train(w, d, "--cutoff-len", "1"), "--cutoff-len must be at least 2"),
    ("cutoff-past-positions", lambda w, d: [*train(w, d, "--cutoff-len", "100"), "--model", str(w.gpt2)],
     "exceeds the model's 64 positions"),
    ("warmup-negative", lambda w, d: train(w, d, "--warmup-steps", "-1"), "--warmup-steps must be at least 0"),
    ("seed-negative", lambda w, d: train(w, d, "--seed", "-1"), "--seed must be at least 0"),
    ("epochs-zero", lambda w, d: train(w, d, "--num-epochs", "0"), "--num-epochs must be at least 1"),
    ("eval-steps-zero", lambda w, d: train(w, d, "--eval-steps", "0"), "--eval-steps must be at least 1"),
    ("save-limit-zero", lambda w, d: train(w, d, "--save-total-limit", "0"), "--save-total-limit must be at least 1"),
    ("virtual-tokens-zero", lambda w, d: train(w, d, "--method", "prompt-tuning", "--num-virtual-tokens", "0"),
     "num_virtual_tokens must be a positive integer"),
    ("prompt-init-text-without-text", lambda w, d: train(w, d, "--method", "prompt-tuning", "--prompt-init", "text"),
     "prompt_init=text needs init_text"),
    ("encoder-type-bad", lambda w, d: train(w, d, "--method", "p-tuning", "--encoder-type", "gru"),
     "encoder_type must be mlp or lstm"),
    ("unknown-flag", lambda w, d: train(w, d, "--learning-rte", "1e-3"), "unrecognized arguments"),
    ("train-without-data", lambda w, d: ["train", "--model", str(w.llama), "--output", str(d / "out")],
     "train needs --data"),
    ("bool-flag-with-value", lambda w, d: train(w, d, "--overwrite=yes"), "ignored explicit argument"),
    # YAML --config
    ("yaml-not-yaml", lambda w, d: yaml_config(w, d, "learning_rate: [1, 2\n"), "not valid YAML"),
    ("yaml-list", lambda w, d: yaml_config(w, d, "- learning_rate\n- 1\n"), "expected a mapping"),
    ("yaml-scalar", lambda w, d: yaml_config(w, d, "just text\n"), "expected a mapping"),
    ("yaml-unknown-key", lambda w, d: yaml_config(w, d, "learning_rte: 0.1\n"), "unknown key 'learning_rte'"),
    ("yaml-wrong-type-text", lambda w, d: yaml_config(w, d, "eval_steps: many\n"), "eval_steps: 'many' is not a valid"),
    ("yaml-wrong-type-list", lambda w, d: yaml_config(w, d, "eval_steps: [1, 2]\n"), "--eval-steps must be a int"),
    ("yaml-method-option-wrong-type", lambda w, d: yaml_config(w, d, "lora_r: [4]\n"), "lora r must be"),
    ("yaml-bound", lambda w, d: yaml_config(w, d, "learning_rate: -0.5\n"), "--learning-rate must be greater than 0"),
    ("yaml-not-utf-8", lambda w, d: yaml_config(w, d, "template: caf\xe9\n".encode("latin-1")), "not UTF-8 text"),
    ("yaml-missing", lambda w, d: [*train(w, d), "--config", str(d / "none.yaml")], "cannot read it"),
    ("yaml-method-unknown", lambda w, d: yaml_config(w, d, "method: 5\n"), "unknown method '5'"),
    ("yaml-number-key", lambda w, d: yaml_config(w, d, "1: 2\n"), "unknown key '1'"),
    ("yaml-date-value", lambda w, d: yaml_config(w, d, "seed: 2020-01-01\n"), "--seed must be a int"),
    # adapter folders (through generate, which loads them)
    ("adapter-missing", lambda w, d: generate(w, d / "nothing"), "does not exist"),
    ("adapter-no-config", lambda w, d: generate(w, changed(adapter_copy(w, d), unlink("adapter_config.json"))),
     "has no adapter_config.json"),
    ("adapter-config-not-json", lambda w, d: generate(w, write(d, "adapter/adapter_config.json", "{oops").parent),
     "is not valid JSON"),
    ("adapter-config-list", lambda w, d: generate(w, write(d, "adapter/adapter_config.json", "[1, 2]").parent),
     "holds a JSON list, not an object"),
    ("adapter-config-not-utf-8", lambda w, d: generate(w, write(d, "adapter/adapter_config.json", b"{\"a\xff\": 1}")
                                                       .parent), "is not valid JSON"),
    ("adapter-weights-garbage", lambda w, d: generate(w, changed(adapter_copy(w, d), overwrite_file(
        "adapter_model.safetensors", b"\x00garbage" * 10))), "not a readable safetensors file"),
    ("adapter-weights-missing", lambda w, d: generate(w, changed(adapter_copy(w, d), unlink("adapter_model.safetensors"))),
     "has no adapter_model.safetensors"),
    ("adapter-nan-weights", lambda w, d: generate(w, adapter_copy(w, d, tensors=nan_in_first)), "holds NaN or inf"),
    ("adapter-no-fingerprint", lambda w, d: generate(w, adapter_copy(w, d, drop("fingerprint"))),
     "records no fingerprint"),
    ("adapter-no-base-model", lambda w, d: generate(w, adapter_copy(w, d, drop("base_model"))),
     "records no base_model"),
    ("adapter-fingerprint-dtype-odd", lambda w, d: generate(w, adapter_copy(w, d, put("fingerprint.dtype", "int8"))),
     "the saved fingerprint has dtype 'int8'"),
    ("adapter-fingerprint-dtype-list", lambda w, d: generate(w, adapter_copy(w, d, put("fingerprint.dtype", [1]))),
     "the saved fingerprint has dtype [1]"),
    ("adapter-fingerprint-malformed", lambda w, d: generate(w, adapter_copy(w, d, put("fingerprint.adapted", "x"))),
     "the saved fingerprint is malformed"),
    ("adapter-unknown-method", lambda w, d: generate(w, adapter_copy(w, d, put("method", "qlora"))),
     "unknown method 'qlora'"),
    ("adapter-future-format", lambda w, d: generate(w, adapter_copy(w, d, put("format_version", 99))),
     "adapter format version 99 is newer"),
    ("adapter-format-version-text", lambda w, d: generate(w, adapter_copy(w, d, put("format_version", "1"))),
     "format_version must be an integer"),
    ("adapter-config-not-mapping", lambda w, d: generate(w, adapter_copy(w, d, put("config", [4]))),
     "lora config must be a mapping"),
    ("adapter-config-unknown-key", lambda w, d: generate(w, adapter_copy(w, d, put("config.rank", 4))),
     "lora config has unknown keys ['rank']"),
    ("adapter-config-bad-value", lambda w, d: generate(w, adapter_copy(w, d, put("config.r", 0))),
     "lora r must be a positive integer"),
    ("adapter-trained-steps-text", lambda w, d: generate(w, adapter_copy(w, d, put("trained_steps", "five"))),
     "trained_steps must be a whole number"),
    ("adapter-modules-not-list", lambda w, d: generate(w, adapter_copy(w, d, put("modules", 5))),
     "'modules' must be a list of module names"),
    ("adapter-generation-not-object", lambda w, d: generate(w, adapter_copy(w, d, put("generation", 5))),
     "'generation' must be an object"),
    ("adapter-base-model-other", lambda w, d: generate(w, adapter_copy(w, d, put("base_model.hidden_size", 64))),
     "the adapter was trained on another base model"),
    ("adapter-pickle-only", lambda w, d: generate(w, write(d, "adapter/adapter_model.bin", b"\x80\x04pickle").parent),
     "pickle files are never loaded"),
    ("adapter-hf-trainer-output", lambda w, d: generate(w, write(d, "ckpt/trainer_state.json", "{}").parent),
     "is a Hugging Face Trainer output without adapter_config.json"),
    ("adapter-is-a-file", lambda w, d: generate(w, write(d, "adapter.json", "{}")), "does not exist"),
    ("adapter-weights-renamed", lambda w, d: generate(w, adapter_copy(w, d, tensors=lambda t: t.update(
        {"model.layers.9.self_attn.q_proj.lora_A": t.pop(sorted(t)[0])}))), "model.layers"),
    ("peft-folder-garbage", lambda w, d: generate(w, write(d, "peft/adapter_config.json", json.dumps(
        {"peft_type": "LORA"})).parent), "has no adapter_model.safetensors"),
    ("peft-unknown-type", lambda w, d: generate(w, adapter_copy(w, d, lambda m: {"peft_type": "IA3"})),
     "PEFT type 'IA3' has no adapterkit equivalent"),
    # checkpoints
    ("resume-a-file", lambda w, d: train(w, d, "--resume", write(d, "ckpt.txt", "x")), "no such checkpoint folder"),
    ("resume-incomplete", lambda w, d: train(w, d, "--resume", write(d, "ckpt/notes", "x").parent),
     "is not a complete checkpoint"),
    ("resume-state-damaged", lambda w, d: train(
        w, d, "--lora-r", "2", "--max-steps", "2", "--resume",
        sorted((checkpoint_copy(w, d, overwrite_file("trainer_state.json", b"{")) / "checkpoints").iterdir())[-1],
        output=d / "out"), "is damaged"),
    ("resume-state-position-list", lambda w, d: resume_damaged(w, d, put("position", [])), "position is a list"),
    ("resume-state-best-missing", lambda w, d: resume_damaged(w, d, drop_best), "position.best is not a validation"),
    ("resume-state-rng-broken", lambda w, d: resume_damaged(w, d, put("python_rng", [3, [1, 2], None])),
     "python_rng is not a random generator's state"),
    ("resume-metrics-row-not-object", lambda w, d: resume_damaged(w, d, None, metrics="5\n"),
     "metrics.jsonl holds a row that is not a step's metrics"),
    ("resume-auto-all-damaged", lambda w, d: train(w, d, "--lora-r", "2", "--max-steps", "2", "--resume", "auto",
                                                   output=_all_damaged(w, d)), "every checkpoint in"),
    ("resume-other-data", lambda w, d: train(w, d, "--lora-r", "2", "--max-steps", "3", "--resume", "auto",
                                             data=write(d, "other.json", json.dumps(RECORDS[::-1])),
                                             output=checkpoint_copy(w, d, lambda c: None)),
     "differs from the data this run was trained on"),
    ("resume-other-method", lambda w, d: train(w, d, "--lora-r", "4", "--max-steps", "3", "--resume", "auto",
                                               output=checkpoint_copy(w, d, lambda c: None)),
     "does not fit this run"),
    # model folders
    ("model-missing", lambda w, d: [*train(w, d), "--model", str(d / "no-model")], "no such model folder"),
    ("model-without-config", lambda w, d: [*train(w, d), "--model", str(model_copy(w, d, unlink("config.json")))],
     "folder has no config.json"),
    ("model-without-weights", lambda w, d: [*train(w, d), "--model",
                                            str(model_copy(w, d, unlink("model.safetensors")))],
     "the model folder cannot be loaded"),
    ("model-config-garbage", lambda w, d: [*train(w, d), "--model",
                                           str(model_copy(w, d, overwrite_file("config.json", b"{oops")))],
     "the model folder cannot be loaded"),
    ("model-weights-garbage", lambda w, d: [*train(w, d), "--model", str(model_copy(
        w, d, overwrite_file("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")))],
     "the model folder cannot be loaded"),
    ("model-without-tokenizer", lambda w, d: [*train(w, d), "--model", str(model_copy(
        w, d, lambda f: [unlink(n)(f) for n in ("tokenizer.json", "tokenizer_config.json")]))],
     "has no tokenizer that loads"),
    ("model-unknown-family", lambda w, d: ["info", str(model_copy(w, d, lambda f: (f / "config.json").write_text(
        json.dumps({**json.loads((f / "config.json").read_text()), "model_type": "mystery"}))))],
     "the model folder cannot be loaded"),
    ("info-method-unknown", lambda w, d: ["info", str(w.llama), "--method", "lorax"], "unknown method 'lorax'"),
    # output folders
    ("output-not-empty", lambda w, d: train(w, d, output=write(d, "out/notes.txt", "mine").parent),
     "is not empty; choose another --output, pass --overwrite"),
    ("overwrite-foreign-file", lambda w, d: train(w, d, "--overwrite", output=write(d, "out/notes.txt", "mine").parent),
     "--overwrite removes only what adapterkit wrote"),
    ("overwrite-run-with-foreign-file", lambda w, d: train(w, d, "--overwrite", output=changed(
        checkpoint_copy(w, d, lambda c: None), lambda out: write(out, "notes.txt", "mine"))), "also holds notes.txt"),
    ("output-is-a-file", lambda w, d: train(w, d, output=write(d, "out.txt", "x")), "exists and is not a folder"),
    ("output-inside-a-file", lambda w, d: train(w, d, output=write(d, "out.txt", "x") / "run"),
     "out.txt is a file; choose another --output"),
    # merge, export, eval, generate, verify
    ("merge-output-not-empty", lambda w, d: ["merge", "--model", str(w.llama), "--adapter", str(w.adapter),
                                             "--output", str(write(d, "m/x", "x").parent)], "is not empty"),
    ("merge-output-is-a-file", lambda w, d: ["merge", "--model", str(w.llama), "--adapter", str(w.adapter),
                                             "--output", str(write(d, "m.txt", "x"))], "exists and is not a folder"),
    ("merge-not-mergeable", lambda w, d: ["merge", "--model", str(w.llama), "--adapter", str(w.prompt),
                                          "--output", str(d / "m")], "cannot be merged"),
    ("merge-tolerance-negative", lambda w, d: ["merge", "--adapter", str(w.adapter), "--output", str(d / "m"),
                                               "--tolerance", "-1"], "--tolerance must be at least 0"),
    ("merge-without-output", lambda w, d: ["merge", "--model", str(w.llama), "--adapter", str(w.adapter)],
     "--output is required"),
    ("merge-quantize-unknown", lambda w, d: ["merge", "--model", str(w.llama), "--adapter", str(w.adapter),
                                             "--output", str(d / "m"), "--quantize", "int4"],
     "--quantize must be one of auto, none, int8, nf4, got 'int4'"),
    ("merge-adapter-nan", lambda w, d: ["merge", "--model", str(w.llama), "--adapter",
                                        str(adapter_copy(w, d, tensors=nan_in_first)), "--output", str(d / "m")],
     "holds NaN or inf"),
    ("export-format-bad", lambda w, d: ["export", "--adapter", str(w.adapter), "--output", str(d / "e"),
                                        "--format", "onnx"], "--format must be one of peft"),
    ("export-unexportable", lambda w, d: ["export", "--model", str(w.llama), "--adapter", str(w.bottleneck),
                                          "--output", str(d / "e")], "PEFT has no adapter-h"),
    ("export-peft-folder", lambda w, d: ["export", "--adapter", str(adapter_copy(w, d, lambda m: {"peft_type": "LORA"})),
                                         "--output", str(d / "e")], "is a PEFT adapter folder already"),
    ("export-output-not-empty", lambda w, d: ["export", "--model", str(w.llama), "--adapter", str(w.adapter),
                                              "--output", str(write(d, "e/x", "x").parent)], "is not empty"),
    ("export-adapter-missing", lambda w, d: ["export", "--adapter", str(d / "none"), "--output", str(d / "e")],
     "does not exist"),
    ("eval-unknown-task", lambda w, d: evaluate(w, d, "--task", "gsm9k"), "unknown task 'gsm9k'"),
    ("eval-no-task", lambda w, d: evaluate(w, d), "no task"),
    ("eval-data-without-type", lambda w, d: evaluate(w, d, "--data", w.task), "needs --task-type"),
    ("eval-data-no-answer", lambda w, d: evaluate(w, d, "--data", w.data, "--task-type", "math"),
     "record 1 has no 'answer'"),
    ("eval-math-answer-not-number", lambda w, d: evaluate(w, d, "--data", write(d, "t.json", json.dumps(
        [{"instruction": "x", "answer": "B"}])), "--task-type", "math"), "not a number"),
    ("eval-task-type-bad", lambda w, d: evaluate(w, d, "--data", w.task, "--task-type", "essay"),
     "--task-type must be one of math"),
    ("eval-task-type-mismatch", lambda w, d: evaluate(w, d, "--task", "gsm8k", "--task-type", "choice"),
     "is of type math, not choice"),
    ("eval-data-dir-missing", lambda w, d: evaluate(w, d, "--task", "gsm8k", "--data-dir", d / "none"),
     "no test file for task gsm8k"),
    ("eval-batch-zero", lambda w, d: evaluate(w, d, "--task", "gsm8k", "--batch-size", "0"),
     "--batch-size must be at least 1"),
    ("eval-beams-zero", lambda w, d: evaluate(w, d, "--task", "gsm8k", "--num-beams", "0"),
     "--num-beams must be at least 1"),
    ("eval-train-data-missing", lambda w, d: evaluate(w, d, "--data", w.task, "--task-type", "math", "--train-data",
                                                      d / "none.json"), "does not exist"),
    ("eval-output-is-a-file", lambda w, d: [*evaluate(w, d, "--data", w.task, "--task-type", "math"), "--output",
                                            str(write(d, "eval.txt", "x"))], "exists and is not a folder"),
    ("eval-adapter-no-fingerprint", lambda w, d: evaluate(w, d, "--data", w.task, "--task-type", "math",
                                                          adapter=adapter_copy(w, d, drop("fingerprint"))),
     "records no fingerprint"),
    ("generate-empty-prompt", lambda w, d: ["generate", "--model", str(w.llama), "--prompt", "  "], "empty prompt"),
    ("generate-temperature-zero", lambda w, d: ["generate", "--model", str(w.llama), "--prompt", "x", "--temperature",
                                                "0"], "--temperature must be greater than 0"),
    ("generate-top-p-two", lambda w, d: ["generate", "--model", str(w.llama), "--prompt", "x", "--top-p", "2"],
     "--top-p must be at most 1"),
    ("generate-max-new-zero", lambda w, d: ["generate", "--model", str(w.llama), "--prompt", "x",
                                            "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ("generate-template-chat-without-one", lambda w, d: ["generate", "--model", str(w.llama), "--prompt", "x",
                                                         "--template", "chat"], "needs a tokenizer with a chat"),
    ("verify-without-adapter", lambda w, d: ["verify", "--model", str(w.llama)], "adapter is required"),
    ("verify-missing", lambda w, d: ["verify", str(d / "none"), "--model", str(w.llama)], "failed verification"),
    ("unknown-command", lambda w, d: ["fine-tune"], "invalid choice: 'fine-tune'"),
    ("plan-unknown-method", lambda w, d: ["plan", "--model", str(w.llama), "--method", "lora2"],
     "unknown method 'lora2'; available:"),
    ("plan-seq-zero", lambda w, d: ["plan", "--model", str(w.llama), "--seq", "0"], "--seq must be at least 1"),
    ("plan-memory-limit-unparseable", lambda w, d: ["plan", "--model", str(w.llama), "--memory-limit", "lots"],
     "--memory-limit 'lots' is not a size"),
    ("plan-micro-batch-over-batch", lambda w, d: ["plan", "--model", str(w.llama), "--batch", "2",
                                                  "--micro-batch-size", "4"], "--micro-batch-size 4 exceeds --batch 2"),
    ("plan-model-missing", lambda w, d: ["plan", "--model", str(d / "none")], "no model config to read"),
    # combine
    ("combine-methods-differ", lambda w, d: combine(w, d, other=w.prompt), "combine adapters of one method"),
    ("combine-bases-differ", lambda w, d: combine(w, d, other=adapter_copy(
        w, d, put("base_model.config_sha256", "0" * 16))), "were trained on different base models (config_sha256"),
    ("combine-base-weights-differ", lambda w, d: combine(w, d, other=adapter_copy(w, d, lambda m: m["fingerprint"].update(
        base=[[v + 1.0 for v in row] for row in m["fingerprint"]["base"]]))), "(their base logits differ)"),
    ("combine-modules-differ", lambda w, d: combine(w, d, other=_save_adapter(
        w.llama, ak.LoraConfig(r=4, target_modules=["o_proj"]), d / "o")), "target different modules"),
    ("combine-dora", lambda w, d: combine(w, d, other=_save_adapter(
        w.llama, ak.LoraConfig(r=4, alpha=8, use_dora=True), d / "dora")), "is DoRA: its magnitudes"),
    ("combine-weights-count", lambda w, d: combine(w, d, weights="1"),
     "--weights gives 1 weight(s) for 2 adapter(s)"),
    ("combine-density-zero", lambda w, d: combine(w, d, "--how", "ties", "--density", "0"),
     "--density must be greater than 0"),
    ("combine-density-over-one", lambda w, d: combine(w, d, "--how", "dare_ties", "--density", "1.5"),
     "--density must be at most 1"),
    ("combine-ties-without-density", lambda w, d: combine(w, d, "--how", "ties"), "needs a density"),
    ("combine-density-with-cat", lambda w, d: combine(w, d, "--density", "0.5"), "density applies to ties and dare"),
    ("combine-how-unknown", lambda w, d: combine(w, d, "--how", "mean"), "--how must be one of cat"),
    ("combine-svd-rank-too-big", lambda w, d: combine(w, d, "--how", "svd", "--svd-rank", "999"), "exceeds"),
    ("combine-output-not-empty", lambda w, d: [*combine(w, d), "--output", str(write(d, "c/x", "x").parent)],
     "is not empty"),
    ("combine-no-adapters", lambda w, d: ["combine", "--weights", "1", "--output", str(d / "c")],
     "--adapters is required"),
]


def drop_best(state):
    state["position"].pop("best")


def resume_damaged(w: World, d: Path, change, metrics: str | None = None) -> list[str]:
    """--resume naming the finished run's newest checkpoint, its trainer_state.json (or metrics) changed."""
    def damage(ckpt: Path) -> None:
        if change is not None:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            change(state)
            (ckpt / "trainer_state.json").write_text(json.dumps(state))
        if metrics is not None:
            (ckpt / "metrics.jsonl").write_text(metrics)
    out = checkpoint_copy(w, d, damage)
    return train(w, d, "--lora-r", "2", "--max-steps", "3", "--resume", sorted((out / "checkpoints").iterdir())[-1],
                 output=out)


def _all_damaged(w: World, d: Path) -> Path:
    out = d / "out"
    shutil.copytree(w.run, out)
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "optimizer.safetensors").write_bytes(b"")
    return out


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry below `folder`: file bytes, or None for a folder (empty ones included)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_the_table_is_big_and_its_ids_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 60, len(ids)


@pytest.mark.parametrize("build, expect", [pytest.param(build, expect, id=name) for name, build, expect in CASES])
def test_bad_input_is_one_line_and_changes_nothing(world, build, expect, tmp_path, monkeypatch, capsys):
    case = tmp_path / "case"
    case.mkdir()
    argv = build(world, case)
    monkeypatch.chdir(case)  # a default output (runs/eval/...) would land here, inside the snapshot
    before, world_before = snapshot(case), snapshot(world.root)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("adapterkit: error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]
    assert snapshot(case) == before, "the command changed the files it was given"
    assert snapshot(world.root) == world_before


# ----- property tests --------------------------------------------------------------------------------
_LEAVES = st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=8)
JSON_VALUES = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
RECORD_LIKE = st.lists(st.fixed_dictionaries({}, optional={"instruction": JSON_VALUES | st.text(max_size=5),
                                                           "output": JSON_VALUES | st.text(max_size=5),
                                                           "input": JSON_VALUES}), max_size=4)
_FAST = settings(max_examples=80, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FAST
@given(value=JSON_VALUES | RECORD_LIKE, suffix=st.sampled_from([".json", ".jsonl"]))
def test_random_json_data_reads_as_records_or_one_error(value, suffix):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"data{suffix}"
        text = json.dumps(value) if suffix == ".json" else "\n".join(json.dumps(v) for v in (
            value if isinstance(value, list) else [value]))
        path.write_text(text, encoding="utf-8")
        try:
            records = read_records(path)
        except ak.AdapterkitError as exc:
            assert "\n" not in str(exc)
            return
    assert records and all(isinstance(r, dict) and isinstance(r["instruction"], str) for r in records)


_OWN_NAMES = sorted(f.name for f in TrainSettings.__dataclass_fields__.values() if f.name != "method_options")
_YAML_LEAVES = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats()
                | st.text(string.printable, max_size=10) | st.sampled_from(["auto", "lora", "prefix-tuning", "bf16",
                                                                           "1e-3", "q_proj,v_proj", "all-linear"]))
YAML_VALUES = st.recursive(_YAML_LEAVES, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(string.ascii_letters, max_size=5), inner, max_size=3),
                           max_leaves=6)


@st.composite
def yaml_configs(draw) -> dict:
    """A method, then mostly real names (the train settings and that method's options, by option name or
    flag), so the values reach the checks behind the key lookup; now and then a stranger key."""
    method = draw(st.sampled_from(sorted(ak.METHODS)))
    names = _OWN_NAMES + sorted({n for o in ak.METHODS[method].config_class.options() for n in (o.name, o.flag[2:])})
    config = draw(st.dictionaries(st.sampled_from(names), YAML_VALUES, max_size=5))
    if method != "lora" or draw(st.booleans()):  # lora is the default
        config["method"] = method
    if draw(st.sampled_from([False, False, False, True])):
        config[draw(st.text(string.ascii_letters + "_-", min_size=1, max_size=8))] = draw(YAML_VALUES)
    return config


YAML_CONFIGS = yaml_configs()


@_FAST
@given(config=YAML_CONFIGS)
def test_random_yaml_config_never_a_traceback(config, tmp_path, capsys):
    """--data is missing, so no run gets as far as loading a model: exit 2 with one line, always."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    capsys.readouterr()
    code = main(["train", "--config", str(path), "--data", str(tmp_path / "missing.json"),
                 "--output", str(tmp_path / "out"), "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("adapterkit: error: "), err
    assert not (tmp_path / "out").exists()


_META_KEYS = ["format_version", "method", "config", "modules", "parameters", "trained_steps", "base_model",
              "generation", "fingerprint", "adapterkit_version"]


@st.composite
def adapter_configs(draw, good: dict):
    """The good adapter's config with some entries (or entries of its parts) replaced, dropped or added."""
    meta = json.loads(json.dumps(good))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["top", "config", "fingerprint", "base_model", "generation"]))
        target = meta if where == "top" else meta.get(where)
        if not isinstance(target, dict):
            continue
        key = draw(st.sampled_from(sorted(target) + ["extra"]) if where != "top" else st.sampled_from(_META_KEYS))
        if draw(st.booleans()):
            target.pop(key, None)
        else:
            target[key] = draw(JSON_VALUES)
    return draw(st.just(meta) | JSON_VALUES) if draw(st.integers(0, 9)) == 0 else meta


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=2, alpha=4))
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(0.1)
    adapted.records["default"].trained_steps = 1
    folder = tmp_path_factory.mktemp("good-adapter")
    adapted.save(folder)
    return folder


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_adapter_config_loads_or_one_error(good_adapter, data):
    good = json.loads((good_adapter / "adapter_config.json").read_text())
    meta = data.draw(adapter_configs(good))
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "adapter"
        shutil.copytree(good_adapter, folder)
        (folder / "adapter_config.json").write_text(json.dumps(meta))
        try:
            ak.load(tiny_model("llama"), folder)
        except ak.AdapterkitError as exc:
            assert "\n" not in str(exc).strip()


def test_a_good_adapter_passes_the_same_path(good_adapter):
    """The property test above is not vacuous: the unchanged config loads."""
    adapted = ak.load(tiny_model("llama"), good_adapter)
    assert adapted.records["default"].trained_steps == 1
    assert math.isfinite(sum(t.float().sum().item() for t in adapted.adapter_state_dict().values()))
