"""Works with the tools people already use: HF Trainer in bf16, TRL-style callers and TRL's SFTTrainer,
accelerate's launcher, LLM-Adapters' own command lines, and files others can read."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from datasets_free import ListDataset
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.cli import main, parse
from adapterkit.training.distributed import launcher_mismatch

RECORDS = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"The answer is {a + b}."}
           for a in range(4) for b in range(4)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "math_10k.json"
    path.write_text(json.dumps(RECORDS))
    return path


def _rows(batch):
    return [{k: v[i] for k, v in batch.items()} for i in range(batch["input_ids"].shape[0])]


def test_trainer_bf16_adapter_saves_and_loads_with_its_fingerprint(tmp_path):
    """accelerate's autocast wrapper stays on the model after Trainer(bf16=True); the saved fingerprint
    must still be the fp32 model's, so the adapter loads onto a fresh fp32 base with equal logits."""
    from transformers import Trainer, TrainingArguments

    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4, alpha=8))
    args = TrainingArguments(output_dir=str(tmp_path / "t"), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True, bf16=True)
    Trainer(model=adapted, args=args, train_dataset=ListDataset(_rows(tiny_batch(batch=8)))).train()
    assert "forward" in vars(adapted)  # the wrapper this test is about is really there
    with pytest.warns(ak.AdapterkitWarning, match="forward is wrapped"):
        adapted.save(tmp_path / "adapter")
    loaded = ak.load(tiny_model("llama"), tmp_path / "adapter")  # the fingerprint check runs here
    batch = tiny_batch()
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        want = type(adapted).forward(adapted, **batch).logits
        assert torch.equal(loaded(**batch).logits, want)


@pytest.mark.parametrize("config", [ak.LoraConfig(r=4, alpha=8), ak.PromptTuningConfig(num_virtual_tokens=3),
                                    ak.PTuningV2Config(num_virtual_tokens=3, prefix_init="random")],
                         ids=["lora", "prompt-tuning", "p-tuning-v2"])
def test_trl_style_caller_gets_the_adapted_hidden_states(config):
    """TRL's chunked/fused losses call model.base_model(...) for last_hidden_state, then the head."""
    adapted = ak.adapt(tiny_model("llama"), config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.normal_(0, 0.3)
    batch = tiny_batch()
    with torch.no_grad():
        hidden = adapted.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).last_hidden_state
        logits = adapted.get_output_embeddings()(hidden)
        expected = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with adapted.disabled():
            base = adapted.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    assert hidden.shape[:2] == batch["input_ids"].shape
    assert (logits - expected).abs().max() <= 1e-5
    assert (hidden - base).abs().max() > 1e-3  # the adapter acts on the decoder's output
    assert adapted.get_base_model() is adapted.causal_lm


def test_trl_sft_trainer_with_its_default_loss(tmp_path):
    from datasets import Dataset
    from tiny_models import tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    before = copy.deepcopy(adapted.adapter_state_dict())
    data = Dataset.from_list([{"prompt": r["instruction"], "completion": r["output"]} for r in RECORDS])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], save_strategy="no", use_cpu=True, bf16=False, max_length=32)
    trainer = SFTTrainer(model=adapted, args=args, train_dataset=data, processing_class=tiny_tokenizer())
    trainer.train()
    after = adapted.adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("lora_B"))
    assert all(torch.isfinite(t).all() for t in after.values())


def test_accelerate_cpu_launch_of_several_processes_is_refused(monkeypatch, tmp_path, data_file, capsys):
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # as it sets them
    assert "torchrun" in launcher_mismatch(env)
    assert launcher_mismatch({"ACCELERATE_USE_CPU": "True"}) is None  # --num_processes 1
    assert launcher_mismatch({**env, "WORLD_SIZE": "2", "RANK": "0"}) is None  # a real group
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "out"
    assert main(["train", "--data", str(data_file), "--output", str(out), "--model", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "accelerate launch --cpu started one process" in err
    assert not out.exists()


def test_llm_adapters_command_lines_run(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "trained_models" / "llama-lora"
    argv = ["train", "--base_model", str(tiny_llama_dir), "--data_path", str(data_file), "--output_dir", str(out),
            "--batch_size", "4", "--micro_batch_size", "2", "--num_epochs", "1", "--learning_rate", "3e-4",
            "--cutoff_len", "64", "--val_set_size", "4", "--adapter_name", "lora", "--lora_r", "4",
            "--lora_target_modules", "[q_proj,k_proj,v_proj,up_proj,down_proj]", "--train_on_inputs", "False",
            "--prompt_template_name", "bare", "--use_gradient_checkpointing"]
    _, settings = parse(argv)
    assert settings.method_options["target_modules"] == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert settings.method_options["r"] == 4 and settings.gradient_checkpointing and not settings.train_on_inputs
    assert main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["config"]["r"] == 4
    capsys.readouterr()
    assert main(["eval", "--model", "LLaMA-7B", "--adapter", "LoRA", "--dataset", "gsm8k", "--base_model",
                 str(tiny_llama_dir), "--lora_weights", str(out), "--limit", "2", "--max-new-tokens", "3",
                 "--output", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["task"] == "gsm8k" and results["settings"]["adapter"] == str(out) and results["n"] == 2

    _, bottleneck = parse(["train", "--data_path", "d", "--output_dir", "o", "--adapter_name", "bottleneck",
                           "--use_parallel_adapter", "--bottleneck_size", "64"])
    assert bottleneck.method == "parallel" and bottleneck.method_options == {"bottleneck_size": 64,
                                                                             "preset": "llm-adapters"}
    _, series = parse(["train", "--data_path", "d", "--output_dir", "o", "--use_adapterp", "--adapter_name",
                       "bottleneck", "--target_modules", "[down_proj]"])
    assert series.method == "adapter-p" and series.method_options == {"target_modules": ["down_proj"]}


def test_dict_flags_parse_pairs_and_json():
    _, settings = parse(["train", "--data", "d", "--output", "o", "--rank-pattern", "v_proj=8,q_proj=16",
                         "--alpha-pattern", '{"v_proj": 32}'])
    assert settings.method_options == {"rank_pattern": {"v_proj": 8, "q_proj": 16}, "alpha_pattern": {"v_proj": 32}}


def test_model_card_and_file_modes_follow_the_umask(tiny_llama_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data_file), "--output", str(out),
                     "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "2", "--val-set-size", "4",
                     "--template", "bare", "--cutoff-len", "64"]) == 0
        assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(out), "--output",
                     str(tmp_path / "merged")]) == 0
    finally:
        os.umask(old)
    card = (out / "README.md").read_text()
    assert "adapterkit generate" in card and "adapterkit.load(" in card and "peft.PeftModel.from_pretrained" in card
    assert str(tiny_llama_dir) in card and "sha256" in card
    for path in [out / "adapter_model.safetensors", out / "last" / "adapter_model.safetensors",
                 *(tmp_path / "merged").glob("*.safetensors")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_trainer_output_folder_gets_a_clear_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "trainer_state.json").write_text("{}")
    with pytest.raises(ak.AdapterkitError, match="Trainer output without adapter_config.json; save the adapter with"):
        ak.load(tiny_model("llama"), tmp_path)


def test_prompt_configs_are_exported():
    for name in ("PromptTuningConfig", "PTuningConfig", "PrefixTuningConfig", "PTuningV2Config"):
        assert getattr(ak, name).method == ak.get_method(getattr(ak, name).method).config_class.method
