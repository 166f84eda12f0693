"""Faults: kill -9 at a chosen point (a random step, inside a checkpoint write) and `--resume auto`
gives the uninterrupted run's adapter bit for bit; a damaged newest checkpoint is skipped with one
warning line; a full disk or a read-only output folder stops with one line and keeps the last good
checkpoint. Then one test per item of "Nothing lost, nothing silent" (part 1), each failing on the
code before it; item 9 (prefix generation keeps its cache) on every tiny family.

The kills are deterministic: the child is `python -m adapterkit train` with a sitecustomize on its
PYTHONPATH that, at the chosen micro-batch or inside the chosen checkpoint write, touches a marker file
and sleeps. The parent waits for the marker and sends SIGKILL, so the kill can neither land before the
process starts training nor after it has finished.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, TODAY_FAMILIES, greedy_without_cache, tiny_batch, tiny_model

import adapterkit as ak
import adapterkit.io.files as files
import adapterkit.recipes.train as train_recipe
from adapterkit.cli import main
from adapterkit.data import read_records
from adapterkit.io.checkpoint import checkpoint_dirs, read_checkpoint

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
           for a in range(6) for b in range(6)]
STEPS, SAVE_EVERY, MICRO_PER_STEP = 12, 3, 4  # batch 8 of micro-batches of 2
STEP_FLAGS = ["--max-steps", str(STEPS), "--save-steps", str(SAVE_EVERY), "--eval-steps", "5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

PAUSER = textwrap.dedent('''
    """Loaded by the child through PYTHONPATH: pause (marker file, then sleep) at a chosen point."""
    import os, pathlib, time
    _where, _marker = os.environ.get("AK_PAUSE", ""), os.environ.get("AK_PAUSE_MARKER")

    def _pause():
        pathlib.Path(_marker).write_text("paused")
        time.sleep(600)

    if _where.startswith("loss:"):  # before the n-th training micro-batch's forward
        import adapterkit.training.loop as _loop
        _real, _calls = _loop.labelled_loss, [0]
        def _counting(model, batch):
            _calls[0] += 1
            if _calls[0] == int(_where[5:]):
                _pause()
            return _real(model, batch)
        _loop.labelled_loss = _counting
    elif _where.startswith("save:"):  # inside checkpoint n, its adapter and optimizer files written
        import adapterkit.io.checkpoint as _ckpt
        _real, _calls = _ckpt.save_tensors, [0]
        def _saving(tensors, path):
            _real(tensors, path)
            _calls[0] += 1
            if _calls[0] == int(_where[5:]):
                _pause()
        _ckpt.save_tensors = _saving
''')


def _args(model_dir, data_file, output, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data_file), "--output", str(output),
            "--batch-size", "8", "--micro-batch-size", "2", "--learning-rate", "1e-2", "--cutoff-len", "40",
            "--val-set-size", "4", "--warmup-steps", "2", "--template", "bare", "--lora-dropout", "0.1",
            *map(str, extra)]


def _cli(*args):
    return [sys.executable, "-m", "adapterkit", *map(str, args)]


def _weights(folder):
    return load_file(Path(folder) / "adapter_model.safetensors")


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("last", "best", "."):
        x, y = _weights(a / name), _weights(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    rows = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, STEPS + 1))
    assert (a / "metrics.jsonl").read_text().count("val_loss") == (b / "metrics.jsonl").read_text().count("val_loss")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault-data") / "data.json"
    path.write_text(json.dumps(RECORDS))
    return path


@pytest.fixture(scope="module")
def whole_run(tiny_llama_dir, data_file, tmp_path_factory):
    """The uninterrupted run, as a subprocess like the killed ones."""
    out = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(_cli(*_args(tiny_llama_dir, data_file, out), *STEP_FLAGS), check=True, capture_output=True,
                   env=ENV)
    return out


@pytest.fixture(scope="module")
def pauser(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pauser")
    (folder / "sitecustomize.py").write_text(PAUSER)
    return folder


def _kill_at(pause: str, args: list[str], pauser: Path, tmp_path: Path) -> None:
    """Run `adapterkit train` until it pauses at `pause`, then SIGKILL it."""
    marker = tmp_path / "paused"
    env = {**ENV, "AK_PAUSE": pause, "AK_PAUSE_MARKER": str(marker),
           "PYTHONPATH": os.pathsep.join([str(pauser), *filter(None, [os.environ.get("PYTHONPATH")])])}
    process = subprocess.Popen(_cli(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    alive = process.poll() is None
    os.kill(process.pid, signal.SIGKILL)
    _, err = process.communicate()
    assert alive and marker.exists(), f"the run never reached {pause}: {err.decode()[-2000:]}"
    assert process.returncode == -signal.SIGKILL


def _resume(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(_cli(*args, "--resume", "auto"), capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_points() -> list:
    """Three seeded random micro-batches after the first checkpoint (mid-step or at a step's start), and
    one in the first step, before any checkpoint exists: resume then starts from the beginning."""
    points = []
    for seed in (0, 1, 2):
        index = random.Random(seed).randrange(SAVE_EVERY * MICRO_PER_STEP + 2, STEPS * MICRO_PER_STEP)
        points.append(pytest.param(index, id=f"seed{seed}-microbatch{index}"))
    return [*points, pytest.param(2, id="before-the-first-checkpoint")]


@pytest.mark.parametrize("index", _kill_points())
def test_kill_at_a_random_step_then_resume_is_bit_identical(index, tiny_llama_dir, data_file, whole_run, pauser,
                                                            tmp_path):
    out = tmp_path / "killed"
    args = [*_args(tiny_llama_dir, data_file, out), *STEP_FLAGS]
    _kill_at(f"loss:{index}", args, pauser, tmp_path)
    finished_steps = (index - 1) // MICRO_PER_STEP
    saved = [int(p.name.removeprefix("step-")) for p in checkpoint_dirs(out)]
    assert not (out / "run.json").exists()
    assert (saved[-1] if saved else 0) == finished_steps // SAVE_EVERY * SAVE_EVERY
    _resume(args)
    _assert_same_run(whole_run, out)


def test_kill_inside_a_checkpoint_write_then_resume_is_bit_identical(tiny_llama_dir, data_file, whole_run, pauser,
                                                                      tmp_path):
    out = tmp_path / "killed"
    args = [*_args(tiny_llama_dir, data_file, out), *STEP_FLAGS]
    # The pauser counts the checkpoints' own optimizer writes: the 2nd is checkpoint step 6's, its adapter
    # file already in the temporary folder, its trainer_state.json not yet.
    _kill_at("save:2", args, pauser, tmp_path)
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    assert leftovers, "the kill did not land inside a checkpoint write"
    assert [p.name for p in checkpoint_dirs(out)] == ["step-0000003"]
    _resume(args)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    _assert_same_run(whole_run, out)


def _short_args(model_dir, data_file, out, *extra):
    return _args(model_dir, data_file, out, "--max-steps", "6", "--save-steps", "2", "--eval-steps", "3", *extra)


def _bar_free(err: str) -> list[str]:
    """stderr without tqdm's progress bar lines."""
    return [line for line in err.splitlines() if line.strip() and not line.lstrip().startswith("train:")]


def _damage_optimizer(ckpt: Path) -> None:
    data = (ckpt / "optimizer.safetensors").read_bytes()
    (ckpt / "optimizer.safetensors").write_bytes(data[: len(data) // 2])


def _delete_adapter(ckpt: Path) -> None:
    (ckpt / "adapter_model.safetensors").unlink()


@pytest.mark.parametrize("damage, reason", [(_damage_optimizer, "is damaged"),
                                            (_delete_adapter, "has no adapter_model.safetensors")],
                         ids=["truncated-optimizer", "deleted-adapter"])
def test_damaged_newest_checkpoint_falls_back_with_one_warning(damage, reason, tiny_llama_dir, data_file, tmp_path,
                                                               capsys):
    out = tmp_path / "run"
    assert main(_short_args(tiny_llama_dir, data_file, out)) == 0
    finished = {name: _weights(out / name) for name in ("last", ".")}
    damage(checkpoint_dirs(out)[-1])
    capsys.readouterr()
    assert main(_short_args(tiny_llama_dir, data_file, out, "--resume", "auto")) == 0
    lines = _bar_free(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("adapterkit: warning: checkpoint step-0000006") and reason in lines[0], lines
    assert "resuming from the checkpoint before it" in lines[0]
    for name, before in finished.items():  # steps 5 and 6 again, from step 4: the same adapter
        after = _weights(out / name)
        assert all(torch.equal(before[k], after[k]) for k in before), name
    read_checkpoint(checkpoint_dirs(out)[-1])  # step 6 was written again, whole


def _fail_writes_in_checkpoint(monkeypatch, step: int, exc: OSError) -> None:
    """Every write into checkpoint `step` (its temporary folder) raises `exc`: a disk that fills up, or a
    folder that becomes read-only, while the run goes on."""
    tag = f"step-{step:07d}"
    real_save, real_write = files.save_file, Path.write_text

    def save(tensors, path, *args, **kwargs):
        if tag in str(path):
            raise exc
        return real_save(tensors, path, *args, **kwargs)

    def write_text(self, *args, **kwargs):
        if tag in str(self):
            raise exc
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(files, "save_file", save)
    monkeypatch.setattr(Path, "write_text", write_text)


def _stops_with_one_line_and_keeps_step_2(argv, out: Path, capsys, expect: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = _bar_free(err)
    assert len(lines) == 1 and lines[0].startswith("adapterkit: error: cannot write ") and expect in lines[0], err
    assert "Traceback" not in err
    assert [p.name for p in checkpoint_dirs(out)] == ["step-0000002"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    saved = read_checkpoint(checkpoint_dirs(out)[0])  # whole: every file reads back
    assert saved["state"]["step"] == 2 and all(torch.isfinite(t).all() for t in saved["weights"].values())


def test_full_disk_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_llama_dir, data_file, tmp_path,
                                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    _fail_writes_in_checkpoint(monkeypatch, 4, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    _stops_with_one_line_and_keeps_step_2(_short_args(tiny_llama_dir, data_file, out), out, capsys,
                                          "no space left on the disk")
    monkeypatch.undo()  # space again: the run continues from its last checkpoint
    assert main(_short_args(tiny_llama_dir, data_file, out, "--resume", "auto")) == 0
    assert [p.name for p in checkpoint_dirs(out)] == ["step-0000002", "step-0000004", "step-0000006"]


def test_read_only_output_stops_with_one_line_and_keeps_the_last_checkpoint(tiny_llama_dir, data_file, tmp_path,
                                                                           monkeypatch, capsys):
    """The output folder turns read-only after checkpoint 2. As root (these tests' usual user) chmod does not
    stop writes, so there every write into checkpoint 4 fails with EACCES instead, as a read-only folder's do."""
    out = tmp_path / "run"
    if os.geteuid() == 0:
        _fail_writes_in_checkpoint(monkeypatch, 4, PermissionError(errno.EACCES, os.strerror(errno.EACCES)))
    else:
        real = train_recipe.save_checkpoint

        def read_only_from_step_4(output, step, *args, **kwargs):
            if step == 4:
                for folder in (output, output / "checkpoints"):
                    folder.chmod(0o555)
            return real(output, step, *args, **kwargs)

        monkeypatch.setattr(train_recipe, "save_checkpoint", read_only_from_step_4)
    try:
        _stops_with_one_line_and_keeps_step_2(_short_args(tiny_llama_dir, data_file, out), out, capsys,
                                              "Permission denied")
    finally:
        for folder in (out, out / "checkpoints"):
            folder.chmod(0o755)


def test_folders_that_only_look_like_checkpoints_are_skipped(tmp_path):
    for name in ("step-0000002", "step-abc", "step-0000004 copy", ".tmp-step-0000006"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "trainer_state.json").write_text("{}")
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-0000002"]


# ----- one test per item of part 1 -----------------------------------------------------------------
def _trained_lora(tmp_path: Path, family: str = "llama") -> Path:
    adapted = ak.adapt(tiny_model(family), ak.LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.2)
    adapted.records["default"].trained_steps = 3
    folder = tmp_path / "adapter"
    adapted.save(folder)
    return folder


def _edit_meta(folder: Path, change) -> None:
    meta = json.loads((folder / "adapter_config.json").read_text())
    change(meta)
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def test_item_overwrite_keeps_files_adapterkit_did_not_write(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_short_args(tiny_llama_dir, data_file, out, "--max-steps", "2")) == 0
    (out / "notes.txt").write_text("my notes")
    capsys.readouterr()
    assert main(_short_args(tiny_llama_dir, data_file, out, "--overwrite")) == 2
    assert "also holds notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "my notes" and checkpoint_dirs(out)
    (out / "notes.txt").unlink()
    assert main(_short_args(tiny_llama_dir, data_file, out, "--overwrite", "--save-steps", "3")) == 0
    assert [p.name for p in checkpoint_dirs(out)] == ["step-0000003", "step-0000006"]  # the old run's are gone


def test_item_nan_weights_are_refused_on_load(tmp_path):
    folder = _trained_lora(tmp_path)
    weights = _weights(folder)
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(ak.AdapterkitError, match=f"adapter weight {key} holds NaN or inf"):
        ak.load(tiny_model("llama"), folder)
    with pytest.raises(ak.AdapterkitError, match="holds NaN or inf"):
        ak.load(tiny_model("llama"), folder, force=True)  # --force does not make NaN usable


@pytest.mark.parametrize("missing", ["fingerprint", "base_model"])
def test_item_unverified_adapter_is_refused_unless_forced(missing, tmp_path):
    folder = _trained_lora(tmp_path)
    _edit_meta(folder, lambda meta: meta.pop(missing))
    with pytest.raises(ak.AdapterkitError, match=f"records no {missing}.*pass --force"):
        ak.load(tiny_model("llama"), folder)
    with pytest.warns(ak.errors.AdapterkitWarning, match="loading it unverified because of --force"):
        ak.load(tiny_model("llama"), folder, force=True)


def test_item_fingerprint_dtype_cannot_widen_the_tolerance(tmp_path):
    folder = _trained_lora(tmp_path)

    def tamper(meta):  # adapted logits off by ~1% (fp32's tolerance is 1e-4), and a dtype that would allow it
        meta["fingerprint"]["adapted"] = [[v * 1.01 for v in row] for row in meta["fingerprint"]["adapted"]]
        meta["fingerprint"]["dtype"] = "int8"
    _edit_meta(folder, tamper)
    with pytest.raises(ak.AdapterkitError, match="fingerprint has dtype 'int8'.*altered"):
        ak.load(tiny_model("llama"), folder)


def test_item_cutoff_that_cuts_whole_responses_warns_with_the_count(tiny_llama_dir, tmp_path, capsys):
    long = [{"instruction": "x" * 60, "output": "lost"}] * 3
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS[:13] + long))
    argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(tmp_path / "run"),
            "--batch-size", "2", "--micro-batch-size", "2", "--max-steps", "1", "--cutoff-len", "40",
            "--val-set-size", "0", "--template", "bare", "--learning-rate", "1e-2", "--warmup-steps", "0"]
    capsys.readouterr()
    assert main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("adapterkit: warning:")]
    assert warnings == ["adapterkit: warning: 3 of 16 training records lose their whole response at --cutoff-len 40 "
                        "(their prompt is longer) and train only the end token; raise --cutoff-len"]


def test_item_resume_on_other_data_needs_allow_new_data(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_short_args(tiny_llama_dir, data_file, out, "--max-steps", "2")) == 0
    other = tmp_path / "other.json"
    other.write_text(json.dumps(RECORDS[::-1]))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(_short_args(tiny_llama_dir, other, out, "--max-steps", "4", "--resume", "auto")) == 2
    assert "differs from the data this run was trained on" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(_short_args(tiny_llama_dir, other, out, "--max-steps", "4", "--resume", "auto",
                            "--allow-new-data")) == 0
    assert "continuing the run on new data" in capsys.readouterr().err
    assert [d["path"] for d in json.loads((out / "run.json").read_text())["data"]] == [str(data_file), str(other)]


def test_item_settings_are_checked_before_any_work(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        pytest.fail("the model was loaded before the settings were checked")

    monkeypatch.setattr(train_recipe, "load_model", no_model)
    for flags in (["--learning-rate", "-1"], ["--max-steps", "0"], ["--lora-r", "0"], ["--cutoff-len", "1"],
                  ["--batch-size", "7"]):
        assert main(_short_args(tiny_llama_dir, data_file, tmp_path / "run", *flags)) == 2, flags
    assert not (tmp_path / "run").exists()


def test_item_utf8_errors_name_the_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps([{"instruction": "café", "output": "x"}], ensure_ascii=False).encode("latin-1"))
    with pytest.raises(ak.AdapterkitError, match=f"{path}: not UTF-8 text .*at byte"):
        read_records(path)


def test_item_disk_error_while_saving_an_adapter_is_one_line(tmp_path, monkeypatch):
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=2))
    monkeypatch.setattr(files, "save_file", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(ak.AdapterkitError, match="cannot write .*no space left on the disk") as caught:
        adapted.save(tmp_path / "adapter")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()


def test_item_model_card_is_written_beside_the_adapter(tiny_llama_dir, data_file, tmp_path):
    out = tmp_path / "run"
    assert main(_short_args(tiny_llama_dir, data_file, out, "--max-steps", "2")) == 0
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_llama_dir}" in card and "adapterkit.load" in card and "lora" in card


@pytest.mark.parametrize("method", ["prefix-tuning", "p-tuning-v2"])
@pytest.mark.parametrize("family", sorted({*FAMILIES, *TODAY_FAMILIES}))
def test_item_9_prefix_generation_keeps_its_cache(family, method):
    """generate(use_cache=False), and a base whose generation_config turns the cache off, give the cached
    run's tokens and logits: the prefixes live in the cache, so generation must keep it. Left padding on
    row 1 (BLOOM's ALiBi included). Today's families too: p-tuning-v2's start from the model's own keys
    crashed on sliding-window layers (Gemma 2/3, GPT-OSS), whose cache keeps fewer than k positions."""
    model = tiny_model(family)
    config = ak.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16) if method == "prefix-tuning" \
        else ak.PTuningV2Config(num_virtual_tokens=4)
    adapted = ak.adapt(model, config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.5)
    ids = tiny_batch()["input_ids"][:, :6].clone()
    mask = torch.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 0
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0,
                  eos_token_id=None, return_dict_in_generate=True, output_logits=True)

    def tokens_and_logits(**extra):
        out = adapted.generate(**common, **extra)
        return out.sequences, torch.stack(out.logits)

    with torch.no_grad():
        cached, cached_logits = tokens_and_logits()
        assert torch.equal(cached, greedy_without_cache(adapted, ids, mask, 5))
        tokens, logits = tokens_and_logits(use_cache=False)
        assert torch.equal(tokens, cached) and torch.equal(logits, cached_logits)
        model.generation_config.use_cache = False
        tokens, logits = tokens_and_logits()
        assert torch.equal(tokens, cached) and torch.equal(logits, cached_logits)
        with adapted.disabled():
            plain = model(input_ids=ids, attention_mask=mask).logits
        assert (adapted(input_ids=ids, attention_mask=mask).logits - plain).abs().max() > 1e-3  # prefixes matter
