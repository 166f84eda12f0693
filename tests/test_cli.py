"""The command line on a tiny model: train -> generate -> merge, and one clear line per mistake."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from adapterkit.cli import main

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
           for a in range(4) for b in range(4)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def _train_args(model_dir, data_file, output, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(output),
            "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "3", "--learning-rate", "1e-2",
            "--cutoff-len", "64", "--val-set-size", "4", "--warmup-steps", "0", "--template", "bare", *extra]


def test_train_generate_merge(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_llama_dir, data_file, out, "--lora-r", "4", "--target-modules", "q_proj,v_proj")) == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "run.json", "loss.png",
            "config.yaml", "checkpoints", "best", "last"} <= {p.name for p in out.iterdir()}
    run = json.loads((out / "run.json").read_text())
    assert run["adapter_config"]["r"] == 4 and run["adapter_config"]["target_modules"] == ["q_proj", "v_proj"]
    assert run["train_examples"] == 12 and run["validation_examples"] == 4 and run["steps"] == 3
    assert len(run["data_sha256"]) == 64 and run["versions"]["torch"].startswith("2.")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3] and [r["step"] for r in rows if "val_loss" in r] == [3]

    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_llama_dir), "--adapter", str(out), "--prompt", "Add 1 and 2.",
                 "--max-new-tokens", "5", "--template", "bare"]) == 0
    assert capsys.readouterr().out.strip() != ""

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(out), "--output", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged)  # transformers alone reads it
    import adapterkit as ak
    adapted = ak.load(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - adapted(input_ids=ids).logits).abs().max() < 1e-4


def test_methods_and_info(tiny_gpt2_dir, capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "lora" in text and "--lora-r" in text and "default 8" in text
    assert main(["info", str(tiny_gpt2_dir), "--method", "lora"]) == 0
    text = capsys.readouterr().out
    assert "family: gpt2" in text and "layers: 2" in text and "c_attn" in text and "trainable parameters" in text


def _fails_cleanly(argv, capsys, pattern):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert pattern in err, err


def test_bad_input_one_line_each(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    _fails_cleanly(_train_args(tiny_llama_dir, data_file, out, "--method", "lorax"), capsys, "unknown method 'lorax'")
    _fails_cleanly(_train_args(tiny_llama_dir, data_file, out, "--lora-r", "0"), capsys, "r must be a positive")
    _fails_cleanly(_train_args(tiny_llama_dir, data_file, out, "--target-modules", "query"), capsys,
                   "q_proj, k_proj, v_proj, o_proj")
    _fails_cleanly(_train_args(tiny_llama_dir, tmp_path / "none.json", out), capsys, "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([RECORDS[0], {"input": "x"}]))
    _fails_cleanly(_train_args(tiny_llama_dir, bad, out), capsys, "record 2 lacks")
    bad.write_text("[]")
    _fails_cleanly(_train_args(tiny_llama_dir, bad, out), capsys, "empty")
    _fails_cleanly(_train_args(tiny_llama_dir, data_file, out, "--template", "fancy"), capsys, "--template must be one of alpaca, bare, chat")
    _fails_cleanly(_train_args(tiny_llama_dir, data_file, out, "--micro-batch-size", "8"), capsys, "not a multiple")
    _fails_cleanly(["train", "--data", str(data_file)], capsys, "--output")
    assert not out.exists()  # nothing was written by any of them

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails_cleanly(_train_args(tiny_llama_dir, data_file, out), capsys, "not empty")
    assert (out / "keep.txt").read_text() == "precious"


def test_bad_adapter_folders(tiny_llama_dir, data_file, tmp_path, capsys):
    gen = ["generate", "--model", str(tiny_llama_dir), "--prompt", "hi", "--adapter"]
    _fails_cleanly([*gen, str(tmp_path / "missing")], capsys, "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    _fails_cleanly([*gen, str(empty)], capsys, "pickle files are never loaded")
    out = tmp_path / "run"
    assert main(_train_args(tiny_llama_dir, data_file, out)) == 0
    capsys.readouterr()
    (out / "adapter_model.safetensors").write_bytes(b"garbage")
    _fails_cleanly([*gen, str(out)], capsys, "not a readable safetensors file")
    (out / "adapter_config.json").write_text("{not json")
    _fails_cleanly([*gen, str(out)], capsys, "not valid JSON")


def test_module_entry_point_exit_code(tmp_path):
    done = subprocess.run([sys.executable, "-m", "adapterkit", "generate", "--model", str(tmp_path / "nope"),
                           "--prompt", "x"], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"adapterkit: error: {tmp_path / 'nope'}: no such model folder"]


@pytest.mark.parametrize("method,flags", [
    ("adapter-h", ["--bottleneck-size", "4", "--non-linearity", "tanh"]),
    ("adapter-p", ["--reduction-factor", "8", "--scaling", "learned"]),
    ("parallel", ["--bottleneck-size", "4", "--location", "both", "--adapter-init", "normal"]),
    ("parallel", ["--preset", "llm-adapters", "--bottleneck-size", "4"]),
    ("prompt-tuning", ["--num-virtual-tokens", "3", "--prompt-init", "text", "--init-text", "Add"]),
    ("p-tuning", ["--num-virtual-tokens", "3", "--encoder-type", "lstm", "--encoder-hidden-size", "8"]),
    ("prefix-tuning", ["--num-virtual-tokens", "3", "--encoder-hidden-size", "8"]),
    ("p-tuning-v2", ["--num-virtual-tokens", "3", "--layers", "1", "--prefix-projection"]),
])
def test_train_generate_each_non_mergeable_method(tiny_gpt2_dir, data_file, tmp_path, capsys, method, flags):
    out = tmp_path / "run"
    _fails_cleanly(_train_args(tiny_gpt2_dir, data_file, out, "--method", "prompt-tuning", "--cutoff-len", "70"),
                   capsys, "--cutoff-len 70 + 20 virtual tokens exceeds the model's 64 positions")
    assert main(_train_args(tiny_gpt2_dir, data_file, out, "--method", method, *flags, "--cutoff-len", "48")) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["method"] == method
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_gpt2_dir), "--adapter", str(out), "--prompt", "Add 1 and 2.",
                 "--max-new-tokens", "4", "--template", "bare"]) == 0
    _fails_cleanly(["merge", "--model", str(tiny_gpt2_dir), "--adapter", str(out), "--output",
                    str(tmp_path / "merged")], capsys, "cannot be merged")
    assert not (tmp_path / "merged").exists()


def test_flag_of_another_method_is_refused(tiny_llama_dir, data_file, tmp_path, capsys):
    _fails_cleanly(_train_args(tiny_llama_dir, data_file, tmp_path / "o", "--method", "adapter-h", "--lora-r", "4"),
                   capsys, "--lora-r is not an option of adapter-h")


def test_bench_passes_its_flags_to_the_benchmark_script(tmp_path):
    assert main(["bench", "--help"]) == 0  # the script's own help, from a subprocess
    report, results = tmp_path / "BENCHMARKS.md", tmp_path / "results.json"
    report.write_text("kept\n")
    code = main(["bench", "--sections", "train", "--only", "no configuration has this", "--write", str(report),
                 "--json", str(results)])
    assert code != 0 and report.read_text() == "kept\n" and not results.exists()


def test_list_flags_repeat_or_take_commas():
    from adapterkit.cli import parse

    _, repeated = parse(["serve", "--adapter", "a=/x", "--adapter", "b=/y,c=/z"])
    _, commas = parse(["serve", "--adapter", "a=/x,b=/y,c=/z"])
    assert repeated.adapter == commas.adapter == ["a=/x", "b=/y", "c=/z"]
    _, train = parse(["train", "--data", "d.json", "--output", "o", "--target-modules", "q_proj",
                      "--target-modules", "v_proj"])
    assert train.method_options["target_modules"] == ["q_proj", "v_proj"]
    _, once = parse(["train", "--data", "d.json", "--output", "o", "--lora-dropout", "0.1"])
    assert once.method_options["dropout"] == 0.1  # a flag of one value is not a list
