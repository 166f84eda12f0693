"""`train --shard zero3` (DeepSpeed ZeRO-3 on its CPU accelerator, gloo, 2 processes) against 1 plain process.

- LoRA (torchrun) and AdapterH (accelerate launch) trained 5 steps under ZeRO-3 equal 1 process on the
  same global batches (1e-5, fp32); the checkpoints ZeRO-3 writes are unsharded ones whose AdamW moments
  equal the 1-process run's; the adapter's fingerprint holds on the unsharded model.
- A ZeRO-3 checkpoint resumes on 1 plain process, and a 1-process checkpoint resumes under ZeRO-3, both
  to the uninterrupted run's adapter.
- Without DeepSpeed (the package hidden) `--shard zero3` is one line naming `pip install deepspeed`.

The learning rate is 1e-3 here (1e-2 in test_sharding.py): DeepSpeed's hooks add autograd nodes, which
change the order in which a gradient's contributions are summed (one process under ZeRO-3 already
differs from plain torch in the last bits, ~1e-7 relative); AdamW divides by sqrt(v), so at 1e-2 the
entries whose gradient changes sign between steps carry that to 1e-4 in 5 steps, and at 1e-3 to < 1e-5.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_sharding import _args, _launch, _max_diff, _one_process, _weights, module_setup

from adapterkit.cli import main
from adapterkit.io.checkpoint import checkpoint_dirs

LAUNCHER = {"lora": "torchrun", "adapter-h": "accelerate"}
LR = ["--learning-rate", "1e-3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_llama_dir):
    # every run here, one process or two, takes the logits-then-loss path: ZeRO-3's engine does (the fused
    # head loss leaves a partitioned head alone), and AdamW magnifies the two paths' fp32 rounding apart
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ADAPTERKIT_FUSED_LOSS", "0")
        yield module_setup(tmp_path_factory, tiny_llama_dir, "zero3")


def _run(setup, method: str, processes: int, *extra) -> Path:
    """A finished run, once per module: 2 processes under ZeRO-3 or 1 plain process."""
    key = (method, processes, *extra)
    if key not in setup["runs"]:
        out = setup["root"] / f"{method}-{processes}-{len(setup['runs'])}"
        if processes == 2:
            done = _launch(LAUNCHER[method], _args(setup, method, out, *LR, "--shard", "zero3", *extra))
            assert done.returncode == 0, done.stderr[-3000:]
            assert done.stdout.count("trainable parameters") == 1
        else:
            assert _one_process(_args(setup, method, out, *LR, *extra)) == 0
        setup["runs"][key] = out
    return setup["runs"][key]


def _moments(checkpoint: Path) -> dict:
    return {k: v for k, v in load_file(checkpoint / "optimizer.safetensors").items() if k.startswith("state.")}


@pytest.mark.parametrize("method", list(LAUNCHER))
def test_zero3_on_two_processes_equals_one_process(setup, method):
    two, one = _run(setup, method, 2), _run(setup, method, 1)
    zero3, single = _weights(two), _weights(one)
    assert _max_diff(zero3, single) <= 1e-5
    assert all(t.numel() > 0 for t in zero3.values())
    assert _max_diff(_weights(two / "last"), zero3) == 0.0
    run = json.loads((two / "run.json").read_text())
    assert run["processes"] == 2 and run["settings"]["shard"] == "zero3"
    last = checkpoint_dirs(two)[-1]
    assert last.name == "step-0000005" and not (last / "sharded").exists()  # an unsharded checkpoint
    state = json.loads((last / "trainer_state.json").read_text())
    assert "sharded" not in state and state["scheduler"]["last_epoch"] == 5
    moments, reference = _moments(last), _moments(checkpoint_dirs(one)[-1])
    assert moments.keys() == reference.keys()
    assert _max_diff(moments, reference) <= 1e-6  # AdamW's moments, gathered whole from the partitions
    assert main(["verify", str(two), "--model", str(setup["model"])]) == 0  # its fingerprint holds unsharded


def test_checkpoints_cross_between_zero3_and_one_process(setup):
    uninterrupted = _weights(_run(setup, "lora", 1))
    # ZeRO-3's step-2 checkpoint resumed on 1 plain process
    out = setup["root"] / "zero3-to-one"
    assert _one_process(_args(setup, "lora", out, *LR, "--resume",
                              str(checkpoint_dirs(_run(setup, "lora", 2))[0]))) == 0
    assert checkpoint_dirs(_run(setup, "lora", 2))[0].name == "step-0000002"
    assert _max_diff(_weights(out), uninterrupted) <= 1e-5
    # the 1-process step-2 checkpoint resumed under ZeRO-3 on 2 processes
    out = setup["root"] / "one-to-zero3"
    resume = checkpoint_dirs(_run(setup, "lora", 1))[0]
    done = _launch("torchrun", _args(setup, "lora", out, *LR, "--shard", "zero3", "--resume", str(resume)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _max_diff(_weights(out), uninterrupted) <= 1e-5


@pytest.mark.parametrize(("extra", "env", "hide", "expect"), [
    (["--shard", "zero3"], {"WORLD_SIZE": "2", "RANK": "0"}, True,
     "--shard zero3 needs DeepSpeed, which is not installed: pip install deepspeed"),
    (["--shard", "zero3"], {}, False, "--shard zero3 needs a process group, and this process was started alone; "
                                      "launch it with `torchrun --nproc-per-node 2 -m adapterkit train ... --shard zero3`"),
    (["--shard", "zero3", "--precision", "bf16"], {"WORLD_SIZE": "2", "RANK": "0"}, False,
     "--shard zero3 trains in fp32 here"),
])
def test_bad_zero3_input_is_one_line(setup, tmp_path, monkeypatch, capsys, extra, env, hide, expect):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if hide:
        monkeypatch.setitem(sys.modules, "deepspeed", None)  # find_spec gives None: as if not installed
    out = tmp_path / "out"
    assert main(_args(setup, "lora", out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()
