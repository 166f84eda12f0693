"""adapterkit LoRA checked against Hugging Face PEFT as an independent oracle.

Two identical tiny base models are built; one gets PEFT LoRA (with random, nonzero B so the
update is not zero), the other gets adapterkit LoRA loaded with PEFT's A and B. Their logits
must agree, unmerged and merged, and must differ clearly from the plain base model's logits.
"""

import re

import peft
import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak

R, ALPHA = 4, 8
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_[AB])\.default\.weight$")


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _build_pair(family, use_rslora=False, dropout=0.0):
    """(peft_model, adapted) on identical bases, sharing PEFT's LoRA weights (B made nonzero)."""
    peft_config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS[family], lora_dropout=dropout,
                                  use_rslora=use_rslora, fan_in_fan_out=family == "gpt2")
    peft_model = peft.get_peft_model(tiny_model(family, seed=0), peft_config).eval()
    generator = torch.Generator().manual_seed(1234)
    tensors = {}
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            match = PEFT_KEY.match(key)
            if match is None:
                continue
            if match.group(2) == "lora_B":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            tensors[f"{match.group(1)}.{match.group(2)}"] = param.detach().clone()
    assert len(tensors) == 2 * len(TARGETS[family]) * peft_model.config.num_hidden_layers

    config = ak.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS[family], use_rslora=use_rslora,
                           init="gaussian", dropout=dropout)
    adapted = ak.adapt(tiny_model(family, seed=0), config)
    adapted.eval()
    assert sorted(adapted.adapter_state_dict()) == sorted(tensors)
    adapted.load_adapter_state_dict(tensors)
    return peft_model, adapted


def _check_unmerged(family, use_rslora):
    batch = tiny_batch(seed=1, batch=2, length=10)
    peft_model, adapted = _build_pair(family, use_rslora)
    expected = _logits(peft_model, batch)
    got = _logits(adapted, batch)
    base = _logits(tiny_model(family, seed=0), batch)
    assert (expected - base).abs().max().item() > 1e-3, "the LoRA update barely moves the logits"
    assert (got - expected).abs().max().item() <= 1e-5


def test_lora_matches_peft_llama():
    _check_unmerged("llama", use_rslora=False)


def test_lora_matches_peft_gpt2_conv1d():
    _check_unmerged("gpt2", use_rslora=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_rslora_matches_peft(family):
    _check_unmerged(family, use_rslora=True)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_matches_peft_merge_and_unload(family):
    batch = tiny_batch(seed=2, batch=2, length=10)
    peft_model, adapted = _build_pair(family)
    unmerged = _logits(peft_model, batch)
    merged_reference = peft_model.merge_and_unload().eval()
    expected = _logits(merged_reference, batch)
    base = _logits(tiny_model(family, seed=0), batch)
    assert (expected - base).abs().max().item() > 1e-3, "the merged update barely moves the logits"
    assert (unmerged - expected).abs().max().item() <= 1e-4  # the oracle agrees with itself

    adapted.merge()
    assert (_logits(adapted, batch) - expected).abs().max().item() <= 1e-4
    adapted.unmerge()
    assert (_logits(adapted, batch) - unmerged).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fp32_training_dropout_draws_peft_masks(family):
    """In fp32, LoRA dropout is torch's: for a given seed, training-mode outputs equal PEFT's."""
    batch = tiny_batch(seed=3, batch=2, length=10)
    peft_model, adapted = _build_pair(family, dropout=0.3)
    outputs = []
    for model in (peft_model, adapted, adapted):
        model.train()
        torch.manual_seed(7)
        outputs.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    torch.manual_seed(8)
    other_seed = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (outputs[1] - outputs[0]).abs().max().item() <= 1e-5
    assert (other_seed - outputs[0]).abs().max().item() > 1e-3, "dropout changed nothing"
