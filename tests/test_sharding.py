"""Sharded training (`train --shard fsdp`: FSDP2 over gloo, 2 CPU processes) against 1 unsharded process.

- LoRA, AdapterH and prefix tuning trained 5 steps on 2 sharded processes equal 1 process on the same
  global batches (1e-5, fp32); the saved adapter files equal the full tensors reassembled from the
  checkpoint's shards, and each shard file holds only part of them.
- Process 1 raising in a forward ends the job within 30 s with its error, no adapter written; the run's
  sharded checkpoint then resumes on 1 unsharded process to the uninterrupted run's adapter.
- A 1-process (unsharded) checkpoint resumes on 2 sharded processes to the uninterrupted run's adapter.
- Launched through `torchrun` and through `accelerate launch`; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapterkit.cli import main
from adapterkit.io.checkpoint import checkpoint_dirs

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
           for a in range(6) for b in range(6)]
COMMON = ["--batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "1e-2", "--cutoff-len", "40",
          "--val-set-size", "4", "--warmup-steps", "2", "--template", "bare", "--precision", "fp32",
          "--max-steps", "5", "--save-steps", "2", "--eval-steps", "2"]
METHODS = {
    "lora": ["--method", "lora", "--lora-dropout", "0"],
    "adapter-h": ["--method", "adapter-h", "--bottleneck-size", "8", "--adapter-init", "normal"],
    "prefix-tuning": ["--method", "prefix-tuning", "--num-virtual-tokens", "3", "--encoder-hidden-size", "16"],
}
LAUNCHER = {"lora": "torchrun", "adapter-h": "accelerate", "prefix-tuning": "torchrun"}
BIN = Path(sys.executable).parent
# One thread per process on both sides: another BLAS split changes float sums.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def module_setup(tmp_path_factory, tiny_llama_dir, name: str) -> dict:
    """A module's folder, its training file and the tiny model; `runs` keeps each finished run once."""
    root = tmp_path_factory.mktemp(name)
    data = root / "data.json"
    data.write_text(json.dumps(RECORDS))
    return {"root": root, "data": data, "model": Path(tiny_llama_dir), "runs": {}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    return module_setup(tmp_path_factory, tiny_llama_dir, "sharding")


def _args(setup, method: str, output: Path, *extra) -> list[str]:
    return ["train", "--model", str(setup["model"]), "--data", str(setup["data"]), "--output", str(output),
            *COMMON, *METHODS[method], *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(launcher: str, argv: list[str], script: str | None = None, env: dict | None = None):
    """2 processes on this machine: `torchrun --standalone` or `accelerate launch` (CPU: gloo)."""
    target = [script] if script else ["-m", "adapterkit"]
    if launcher == "torchrun":
        command = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", *target, *argv]
    else:  # --multi_gpu starts the processes through torch.distributed.run; on a CPU they use gloo
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   *(["-m", "adapterkit"] if not script else [script]), *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=240)


def _one_process(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _gathered_from_shards(checkpoint: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's adapter reassembled from its shard files by torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    state = {f"adapter/{k}": torch.full_like(v, float("nan")) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(checkpoint / "sharded")), no_dist=True)
    return {k.removeprefix("adapter/"): v for k, v in state.items()}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _sharded_run(setup, method: str) -> Path:
    if method not in setup["runs"]:
        out = setup["root"] / f"two-{method}"
        done = _launch(LAUNCHER[method], _args(setup, method, out, "--shard", "fsdp"))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("trainable parameters") == 1  # the first process alone prints
        setup["runs"][method] = out
    return setup["runs"][method]


def _single_run(setup, method: str) -> Path:
    out = setup["root"] / f"one-{method}"
    if not out.exists():
        assert _one_process(_args(setup, method, out)) == 0
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_two_sharded_processes_equal_one_and_save_the_gathered_weights(setup, method):
    two = _sharded_run(setup, method)
    one = _single_run(setup, method)
    sharded, single = _weights(two), _weights(one)
    assert _max_diff(sharded, single) <= 1e-5
    run = json.loads((two / "run.json").read_text())
    assert run["processes"] == 2 and run["settings"]["shard"] == "fsdp"
    last = checkpoint_dirs(two)[-1]
    assert last.name == "step-0000005" and json.loads((last / "trainer_state.json").read_text())["sharded"][
        "processes"] == 2
    shards = [load_file(f) for f in sorted((last / "sharded").glob("*.safetensors"))]
    assert len(shards) == 2
    keys = {k.removeprefix("adapter/") for shard in shards for k in shard if k.startswith("adapter/")}
    trained = {k: v for k, v in _weights(last).items() if k in keys}  # the weights, not exported tensors
    assert len(trained) == len(keys)
    assert _max_diff(_gathered_from_shards(last, trained), trained) == 0.0  # the file is the shards, gathered
    assert _max_diff({k: _weights(two / "last")[k] for k in trained}, trained) == 0.0
    in_shard = sum(t.numel() for k, t in shards[0].items() if k.startswith("adapter/"))
    assert 0 < in_shard < sum(t.numel() for t in trained.values())  # a real shard, not a copy
    assert main(["verify", str(two), "--model", str(setup["model"])]) == 0  # its fingerprint holds unsharded


def test_failing_process_stops_the_job_and_the_sharded_checkpoint_resumes_on_one_process(setup):
    out, stamp = setup["root"] / "failing", setup["root"] / "failed-at"
    # 2 micro-batches per process a step: process 1 raises in step 3, after checkpoint step-2
    done = _launch("torchrun", _args(setup, "lora", out, "--shard", "fsdp"),
                   script=str(Path(__file__).with_name("sharding_fault.py")),
                   env={**ENV, "ADAPTERKIT_TEST_FAIL_AFTER": "4", "ADAPTERKIT_TEST_FAIL_STAMP": str(stamp)})
    assert time.time() - float(stamp.read_text()) < 30  # the whole job ended within 30 s of the failure
    assert done.returncode != 0
    assert "injected failure on process 1" in done.stderr, done.stderr[-3000:]
    assert not (out / "adapter_model.safetensors").exists() and not (out / "last").exists()
    assert [p.name for p in checkpoint_dirs(out)] == ["step-0000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    # resume the 2-process sharded checkpoint on 1 process, unsharded
    assert _one_process(_args(setup, "lora", out, "--resume", "auto")) == 0
    assert _max_diff(_weights(out), _weights(_sharded_run(setup, "lora"))) <= 1e-5


def test_an_unsharded_checkpoint_resumes_sharded(setup):
    one = _single_run(setup, "lora")
    out = setup["root"] / "one-to-fsdp"
    step2 = checkpoint_dirs(one)[0]
    assert step2.name == "step-0000002" and not (step2 / "sharded").exists()
    done = _launch("torchrun", _args(setup, "lora", out, "--shard", "fsdp", "--resume", str(step2)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(_weights(out), _weights(one)) <= 1e-5


@pytest.mark.parametrize(("extra", "env", "expect"), [
    (["--shard", "ring"], {}, "--shard must be one of none, fsdp, zero3, got 'ring'"),
    (["--shard", "fsdp"], {}, "--shard fsdp needs a process group, and this process was started alone; launch it "
                              "with `torchrun --nproc-per-node 2"),
    (["--shard", "fsdp", "--batch-size", "6"], {"WORLD_SIZE": "2", "RANK": "0"},
     "--batch-size 6 is not a multiple of --micro-batch-size 2 x 2 processes; use a multiple of 4"),
    (["--shard", "zero3"], {}, "--shard zero3"),
    (["--shard", "fsdp", "--quantize", "nf4"], {"WORLD_SIZE": "2", "RANK": "0"}, "cannot shard a --quantize nf4"),
])
def test_bad_shard_input_is_one_line(setup, tmp_path, monkeypatch, capsys, extra, env, expect):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    assert main(_args(setup, "lora", out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(("gather", "expect"), [
    (lambda t: t[:1], "gave shape (1,"),  # one shard instead of the whole tensor
    (lambda t: t[:0], "gave shape (0,"),  # ZeRO-3's empty placeholder
])
def test_a_gathered_adapter_that_is_not_whole_is_refused(monkeypatch, gather, expect):
    from tiny_models import tiny_model

    import adapterkit as ak
    import adapterkit.training.sharding as sharding
    from adapterkit.errors import AdapterkitError

    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4))
    assert sharding.gathered_adapter(adapted, "default").keys() == adapted.adapter_state_dict().keys()
    monkeypatch.setattr(sharding, "full_tensor", gather)
    with pytest.raises(AdapterkitError, match=r"gathering adapter weight .* " + re.escape(expect)):
        sharding.gathered_adapter(adapted, "default")
