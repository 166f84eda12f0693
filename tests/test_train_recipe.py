"""The train recipe: YAML + flags, exact resume after SIGKILL, atomic checkpoints, NaN guard, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapterkit.io.checkpoint as checkpoint
import adapterkit.training.loop as training
from adapterkit.cli import main

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
           for a in range(6) for b in range(6)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


def _args(model_dir, data_file, output, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(output),
            "--batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "1e-2", "--cutoff-len", "40",
            "--val-set-size", "4", "--warmup-steps", "2", "--template", "bare", "--lora-dropout", "0.1", "--precision", "fp32", *extra]


def _weights(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


def test_yaml_config_and_flag_precedence(tiny_llama_dir, data_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning-rate: 0.005\nlora_r: 8\ntarget_modules: [q_proj, o_proj]\nmax_steps: 2\n"
                      "eval-steps: 1\n")
    out = tmp_path / "out"
    assert main([*_args(tiny_llama_dir, data_file, out), "--config", str(config), "--lora-r", "4"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["learning_rate"] == 1e-2  # the flag beats the YAML
    assert run["adapter_config"]["r"] == 4  # the flag beats the YAML
    assert run["adapter_config"]["target_modules"] == ["q_proj", "o_proj"]  # from the YAML
    assert run["steps"] == 2 and run["settings"]["eval_steps"] == 1  # from the YAML
    effective = (out / "config.yaml").read_text()
    assert "r: 4" in effective and "learning_rate: 0.01" in effective
    config.write_text("lora_rank: 8\n")
    assert main([*_args(tiny_llama_dir, data_file, tmp_path / "o2"), "--config", str(config)]) == 2
    assert not (tmp_path / "o2").exists()


def _cli(*args):
    return [sys.executable, "-m", "adapterkit", *map(str, args)]


def test_interrupted_checkpoint_write_leaves_the_previous_one(tiny_llama_dir, data_file, tmp_path, monkeypatch,
                                                              capsys):
    out = tmp_path / "out"
    real_save = checkpoint.save_tensors
    calls = {"n": 0}

    def crash_on_second_checkpoint(tensors, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            real_save(tensors, path, *args, **kwargs)
            raise KeyboardInterrupt  # as a kill in the middle of writing the folder
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_tensors", crash_on_second_checkpoint)
    assert main([*_args(tiny_llama_dir, data_file, out), "--max-steps", "6", "--save-steps", "2"]) == 130
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-0000002"]
    monkeypatch.setattr(checkpoint, "save_tensors", real_save)
    assert main([*_args(tiny_llama_dir, data_file, out), "--max-steps", "6", "--save-steps", "2",
                 "--resume", "auto"]) == 0
    assert [p.name for p in checkpoint.checkpoint_dirs(out)] == ["step-0000002", "step-0000004", "step-0000006"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_llama_dir, data_file, tmp_path, monkeypatch, capsys):
    real_loss = training.labelled_loss
    calls = {"n": 0}

    def nan_from_step_three(model, batch):
        calls["n"] += 1
        loss = real_loss(model, batch)
        return loss * float("nan") if calls["n"] > 2 * 4 else loss  # 4 micro-batches a step

    monkeypatch.setattr(training, "labelled_loss", nan_from_step_three)
    out = tmp_path / "out"
    assert main([*_args(tiny_llama_dir, data_file, out), "--max-steps", "6", "--save-steps", "2",
                 "--val-set-size", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("adapterkit: error: loss became nan at step 3")
    saved = checkpoint.checkpoint_dirs(out)
    assert [p.name for p in saved] == ["step-0000002"]
    assert all(torch.isfinite(t).all() for t in _weights(saved[0]).values())


def test_two_processes_equal_one(tiny_llama_dir, data_file, tmp_path):
    steps = ["--max-steps", "4", "--save-steps", "100", "--lora-dropout", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    # One thread per process on both sides: a different BLAS split changes float sums, and Adam's first,
    # sign-like step magnifies such differences in near-zero gradients.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli(*_args(tiny_llama_dir, data_file, one), *steps), check=True, capture_output=True, env=env)
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "adapterkit",
                           *map(str, _args(tiny_llama_dir, data_file, two)), *steps],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert json.loads((two / "run.json").read_text())["processes"] == 2
