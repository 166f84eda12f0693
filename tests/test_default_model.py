"""The default model (SmolLM2-135M-Instruct from the packaged GGUF), offline, for real."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.data import Template, collate, encode, read_records
from adapterkit.resources import LLM_ADAPTERS
from adapterkit.training import causal_lm_loss, train_steps

DATA = LLM_ADAPTERS / "ft-training_set" / "math_data.json"


@pytest.fixture(scope="module")
def records():
    return read_records(DATA)[:16]


def test_loads_offline_as_plain_float_model():
    model, tokenizer = ak.load_model()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert getattr(model, "hf_quantizer", None) is None
    assert not hasattr(model.config, "quantization_config")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2


@torch.no_grad()
def _loss(model, batches):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return sum(causal_lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                  b["labels"]).item() for b in batches) / len(batches)


METHOD_CONFIGS = {
    "lora": lambda: ak.LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
    "adapter-h": lambda: ak.get_method("adapter-h").config_class(bottleneck_size=32),
    "adapter-p": lambda: ak.get_method("adapter-p").config_class(bottleneck_size=32),
    "parallel": lambda: ak.get_method("parallel").config_class(bottleneck_size=32),
    "prompt-tuning": lambda: ak.get_method("prompt-tuning").config_class(num_virtual_tokens=10),
    "p-tuning": lambda: ak.get_method("p-tuning").config_class(num_virtual_tokens=10, encoder_hidden_size=128),
    "prefix-tuning": lambda: ak.get_method("prefix-tuning").config_class(num_virtual_tokens=10),
    "p-tuning-v2": lambda: ak.get_method("p-tuning-v2").config_class(num_virtual_tokens=10),
}
# p-tuning at 1e-2 sat where bf16 rounding decided the 10-step outcome (final loss 0.87-1.04 over seeds and
# attention kernels); at 3e-3 it falls by about 0.17 on either
LEARNING_RATES = {"prompt-tuning": 1e-1, "p-tuning": 3e-3, "prefix-tuning": 1e-3, "p-tuning-v2": 3e-2}


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_method_trains_ten_steps_and_loss_falls(records, method):
    """On the real model with its base in bf16 (autocast) and the adapter in fp32: the fast path."""
    model, tokenizer = ak.load_model(dtype="bf16")
    examples = [encode(r, tokenizer, Template("alpaca")) for r in records]
    batches = [collate(examples[i:i + 4], tokenizer.pad_token_id) for i in range(0, 16, 4)]
    torch.manual_seed(0)
    adapted = ak.adapt(model, METHOD_CONFIGS[method]())
    before = _loss(adapted, batches)

    def cycle():
        while True:
            yield from batches
    train_steps(adapted, cycle(), 10, lr=LEARNING_RATES.get(method, 2e-3), autocast=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in adapted.parameters() if p.requires_grad)
    after = _loss(adapted, batches)
    print(f"{method}: loss on the 16 records {before:.4f} -> {after:.4f}")
    assert after < before - 0.05, (before, after)


def test_merge_cli_writes_plain_checkpoint(tmp_path):
    model, tokenizer = ak.load_model()
    adapted = ak.adapt(model, ak.LoraConfig(r=4, alpha=8), tokenizer=tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():
        for key, p in adapted.adapter_state_dict().items():
            if key.endswith("lora_B"):
                p.normal_(0, 0.02)
    adapted.save(tmp_path / "adapter")
    ids = tokenizer("Natalia sold clips to 48 of her friends.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapted(input_ids=ids).logits
        with adapted.disabled():
            assert (adapted(input_ids=ids).logits - expected).abs().max() > 1e-2  # the adapter matters
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "merged")]) == 0
    report = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert report["max_logit_change"] < 1e-3
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - expected).abs().max() < 1e-3
