"""`adapterkit study` end to end on a tiny model: pilots pick the lower validation loss, leaderboard
files and plots, resume retrains nothing finished, bad input gets one line."""

import json
import shutil
import subprocess
from types import SimpleNamespace

import pytest

import adapterkit.recipes.study as study_module
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.recipes.study_report import mcnemar_p

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}.", "answer": str(a + b)}
           for a in range(6) for b in range(6)]


@pytest.fixture
def layout(tmp_path):
    train = tmp_path / "train.json"
    train.write_text(json.dumps(RECORDS))
    data_dir = tmp_path / "llm-adapters"
    (data_dir / "dataset" / "gsm8k").mkdir(parents=True)
    (data_dir / "dataset" / "gsm8k" / "test.json").write_text(json.dumps(
        [{"instruction": f"What is {a} plus {a}?", "answer": str(2 * a)} for a in range(7, 11)] + RECORDS[:2]))
    return train, data_dir


def _argv(model, train, data_dir, out, *extra):
    """The study's flags; a flag in `extra` replaces the default one (list flags add up when repeated)."""
    defaults = {"--model": str(model), "--train-data": str(train), "--data-dir": str(data_dir), "--tasks": "gsm8k",
                "--methods": "lora,prompt-tuning", "--lrs": "1e-3,3e-2", "--budget": "steps=3", "--pilot-steps": "2",
                "--seeds": "1", "--batch-size": "4", "--micro-batch-size": "2", "--cutoff-len": "64",
                "--val-set-size": "8", "--template": "bare", "--eval-limit": "6", "--max-new-tokens": "4",
                "--precision": "fp32", "--output": str(out)}
    return ["study", *(x for flag, value in defaults.items() if flag not in extra for x in (flag, value)), *extra]


def test_study_end_to_end_and_resume(tiny_llama_dir, layout, tmp_path, monkeypatch, capsys):
    train, data_dir = layout
    out = tmp_path / "study"
    real_train = study_module._train

    def failing_pilot(settings, method, lr, *rest):  # as a rate that leaves the model unchanged does
        if method == "prompt-tuning" and lr == 1e-3:
            raise AdapterkitError("adapter 'default' gives exactly the base model's logits")
        return real_train(settings, method, lr, *rest)

    monkeypatch.setattr(study_module, "_train", failing_pilot)
    assert main(_argv(tiny_llama_dir, train, data_dir, out)) == 0
    monkeypatch.undo()
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["method"]: r for r in board["rows"]}
    assert sorted(rows) == ["base", "lora", "prompt-tuning"]
    for method, info in board["runs"].items():
        sweep = {float(k): v for k, v in info["sweep"].items()}
        tried = {lr: loss for lr, loss in sweep.items() if loss is not None}
        assert len(sweep) == 2 and float(info["lr"]) == min(tried, key=tried.get), method
        pilots = {float(p.name.removeprefix("pilot-lr")): json.loads((p / "run.json").read_text())["best_val_loss"]
                  for p in (out / "runs" / method).glob("pilot-lr*") if (p / "run.json").is_file()}
        assert pilots == tried  # the recorded sweep is what the pilots measured
        assert rows[method]["trainable"] > 0 and "gsm8k beats base" in rows[method]
    prompt_sweep = board["runs"]["prompt-tuning"]["sweep"]
    assert prompt_sweep["0.001"] is None and prompt_sweep["0.03"] > 0  # the failed rate is recorded, not chosen
    assert board["runs"]["prompt-tuning"]["lr"] == 0.03
    assert "| base |" in (out / "leaderboard.md").read_text()
    assert (out / "leaderboard.csv").read_text().splitlines()[0].startswith("method,")
    for name in ("accuracy_vs_parameters", "loss_curves", "lr_sweep", "accuracy_per_task"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    assert "study: 1 of" in capsys.readouterr().out

    calls = []
    real = subprocess.run
    monkeypatch.setattr(study_module.subprocess, "run", lambda *a, **k: calls.append(a) or real(*a, **k))
    shutil.rmtree(next((out / "runs" / "lora").glob("lr*-seed1")))  # as if killed before that run finished
    assert main(_argv(tiny_llama_dir, train, data_dir, out, "--resume")) == 0
    assert len(calls) == 1  # only the missing run trains again; the failed pilot is not retried
    resumed = {r["method"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert resumed["prompt-tuning"]["gsm8k beats base"] == rows["prompt-tuning"]["gsm8k beats base"]  # read back


def test_mcnemar_exact():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # all 6 discordant pairs one way
    assert mcnemar_p(3, 3) == 1.0


@pytest.mark.parametrize("extra, message", [
    (["--methods", "lorax"], "unknown method 'lorax'"),
    (["--methods", ""], "--methods is empty"),
    (["--tasks", "nosuchtask"], "unknown task 'nosuchtask'"),
    (["--tasks", "boolq"], "no test file for task boolq"),
    (["--budget", "steps=0"], "N must be positive"),
    (["--budget", "epochs=3"], "use steps=N, tokens=N or seconds=N"),
    (["--seeds", "1,two"], "--seeds"),
    (["--lrs", "fast"], "--lrs must be numbers or auto"),
    (["--train-data", "missing.json"], "--train-data missing.json: no such file"),
])
def test_bad_study_input_one_line(tiny_llama_dir, layout, tmp_path, capsys, extra, message):
    train, data_dir = layout
    out = tmp_path / "study"
    assert main(_argv(tiny_llama_dir, train, data_dir, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_commonsense_mix_reads_train_splits_only_and_balances(tmp_path):
    from adapterkit.tasks import commonsense_mix

    root = tmp_path / "llm-adapters" / "dataset"
    for task, count in (("boolq", 7), ("openbookqa", 3), ("piqa", 0)):
        (root / task).mkdir(parents=True)
        (root / task / "test.json").write_text(json.dumps([{"instruction": f"test {task}", "answer": "x"}]))
        if count:
            (root / task / "train.json").write_text(json.dumps(
                [{"instruction": f"{task} {i}", "output": "o", "answer": "a"} for i in range(count)]))
    mix, counts = commonsense_mix(tmp_path / "llm-adapters")
    assert counts == {"boolq": 3, "openbookqa": 3}  # piqa has no train split; each cut to the smallest
    assert len(mix) == 6 and not any(r["instruction"].startswith("test") for r in mix)
    assert len({r["instruction"] for r in mix}) == 6
    with pytest.raises(AdapterkitError, match="no commonsense train split"):
        commonsense_mix(tmp_path / "nowhere")


def test_study_training_sources_take_equal_shares(layout, tmp_path):
    train, data_dir = layout
    (data_dir / "dataset" / "boolq").mkdir(parents=True)
    (data_dir / "dataset" / "boolq" / "train.json").write_text(json.dumps(
        [{"instruction": f"Is {i} even?", "output": "o", "answer": "true"} for i in range(100)]))
    settings = study_module.StudySettings(output=str(tmp_path / "s"), train_data=[str(train), "commonsense"],
                                          data_dir=str(data_dir), tasks=["gsm8k"], methods=["lora"])
    path = study_module.training_data(settings, tmp_path / "s")
    records = json.loads(path.read_text())
    assert len(records) == 2 * len(RECORDS)  # the 100 boolq records are cut to the file's 36
    assert sum(r.get("source") == "boolq" for r in records) == len(RECORDS)
    assert json.loads((tmp_path / "s" / "train_sources.json").read_text()) == {str(train): 36, "commonsense": 36}


def test_progress_time_left_ignores_items_a_resume_skips(monkeypatch, capsys):
    clock = iter([0.0, 0.0, 0.1, 0.2, 60.2, 180.2])  # start; a; two skipped items; items of 60 s and 120 s
    monkeypatch.setattr(study_module, "time", SimpleNamespace(time=lambda: next(clock)))
    progress = study_module.Progress(6)
    for name in "abcde":
        progress.step(name)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:3] == ["study: 2 of 6: b", "study: 3 of 6: c"]  # nothing measured yet
    assert lines[3] == "study: 4 of 6: d, about 3 min left"  # d, e, f left at the 60 s that c took
    assert lines[4] == "study: 5 of 6: e, about 3 min left"  # e, f left at the mean of 60 s and 120 s


@pytest.mark.parametrize("best, expected", [
    (10 ** -2.4, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),  # best beyond the top: extended until the loss rises
    (1e-9, [1e-4, 3e-4, 1e-3, 3e-5, 1e-5, 3e-6]),  # falling all the way down: at most 3 more rates
    (3e-4, [1e-4, 3e-4, 1e-3]),  # best inside the sweep: nothing added
])
def test_auto_sweep_extends_past_an_edge(monkeypatch, tmp_path, best, expected):
    import math

    tried = []

    def pilot(settings, method, lr, *rest):
        tried.append(lr)
        return {"best_val_loss": (math.log10(lr) - math.log10(best)) ** 2}

    monkeypatch.setattr(study_module, "_train", pilot)
    settings = SimpleNamespace(lrs=["auto"], seeds=[1], pilot_steps=2, val_set_size=8)
    progress = study_module.Progress(3)
    sweep = study_module._sweep(settings, "lora", [1e-4, 3e-4, 1e-3], tmp_path, progress)
    assert tried == pytest.approx(expected) and sorted(sweep) == pytest.approx(sorted(expected))
    assert progress.total == len(expected)
    settings.lrs = ["1e-4", "3e-4", "1e-3"]  # rates the user gave are kept as given
    tried.clear()
    study_module._sweep(settings, "lora", [1e-4, 3e-4, 1e-3], tmp_path, study_module.Progress(3))
    assert tried == [1e-4, 3e-4, 1e-3]


def test_llm_adapters_preset_runs_the_papers_settings(tiny_llama_dir, layout, tmp_path):
    """--preset llm-adapters: each method at its published settings (LoRA r 32 / alpha 64 on q, k, v, up,
    down at 3e-4 for 3 epochs of batch 16; prefix tuning 10 virtual tokens at 3e-2 for 5 epochs of batch 8)."""
    train, data_dir = layout
    out = tmp_path / "paper"
    argv = ["study", "--preset", "llm-adapters", "--model", str(tiny_llama_dir), "--train-data", str(train),
            "--data-dir", str(data_dir), "--tasks", "gsm8k", "--methods", "lora,prefix-tuning", "--eval-limit", "2",
            "--max-new-tokens", "2", "--precision", "fp32", "--output", str(out)]
    assert main(argv) == 0
    lora = next((out / "runs" / "lora").glob("lr*-seed1"))
    meta = json.loads((lora / "adapter_config.json").read_text())
    assert meta["config"]["r"] == 32 and meta["config"]["alpha"] == 64.0
    layer0 = sorted(m.removeprefix("model.layers.0.") for m in meta["modules"] if m.startswith("model.layers.0."))
    assert layer0 == ["mlp.down_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"]
    run = json.loads((lora / "run.json").read_text())
    examples = run["train_examples"]
    assert run["settings"]["learning_rate"] == 3e-4 and run["steps"] == 3 * examples // 16  # epochs of full batches
    prefix = json.loads((next((out / "runs" / "prefix-tuning").glob("lr*-seed1")) / "run.json").read_text())
    assert prefix["settings"]["learning_rate"] == 3e-2 and prefix["steps"] == 5 * examples // 8
    assert prefix["adapter_config"]["num_virtual_tokens"] == 10
    assert not list(out.glob("runs/*/pilot-*"))  # the paper's rates, no sweep


def test_llm_adapters_preset_refusals(tiny_llama_dir, layout, tmp_path, capsys):
    train, data_dir = layout
    for extra, message in ((["--methods", "ia3", "--train-data", str(train)], "not ia3; drop the preset"),
                           ([], "math_10k.json, which is not shipped")):
        argv = ["study", "--preset", "llm-adapters", "--model", str(tiny_llama_dir), "--data-dir", str(data_dir),
                "--tasks", "gsm8k", "--output", str(tmp_path / "x"), *extra]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
