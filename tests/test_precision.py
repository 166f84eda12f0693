"""`--precision auto`: bf16 where the hardware multiplies bf16 natively, fp32 elsewhere; recorded in run.json."""

import json

import torch

from adapterkit.cli import main, parse
from adapterkit.hardware import native_bf16, resolve_precision


def test_auto_follows_the_cpu_flags():
    assert resolve_precision("auto", flags={"sse4_2", "avx512f", "avx512_bf16"}) == "bf16"
    assert resolve_precision("auto", flags={"sse4_2", "amx_bf16", "amx_tile"}) == "bf16"
    assert resolve_precision("auto", flags={"sse4_2", "avx2", "avx512f"}) == "fp32"
    assert resolve_precision("fp32", flags={"avx512_bf16"}) == "fp32"  # an explicit choice stays
    assert not native_bf16(torch.device("cpu"), flags=set())


def test_auto_is_the_default_and_run_json_records_the_choice(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"{a}+{b}", "output": str(a + b)} for a in range(4) for b in range(4)]))
    _, settings = parse(["train", "--data", str(data), "--output", str(tmp_path / "o")])
    assert settings.precision == "auto"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                 "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--val-set-size", "0", "--learning-rate", "1e-2", "--warmup-steps", "0",
                 "--template", "bare"]) == 0
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["precision"] == resolve_precision("auto") and run["settings"]["precision"] == "auto"
    assert f"precision {run['precision']} (auto)" in capsys.readouterr().out
