"""The training loss computes logits only at labelled positions; it must equal the full computation."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods.prompt import PrefixTuningConfig, PromptTuningConfig
from adapterkit.training import causal_lm_loss, labelled_loss

CONFIGS = {"lora": lambda: ak.LoraConfig(r=4, init="gaussian"),
           "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=3),
           "prefix-tuning": lambda: PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8)}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_labelled_loss_equals_full_loss(family, method):
    batch = tiny_batch(batch=3)
    batch["labels"][0, :4] = -100  # a masked prompt
    batch["labels"][1, :7] = -100
    batch["attention_mask"][2, -3:] = 0  # right padding
    batch["labels"][2, -3:] = -100
    results = []
    for loss_fn in (lambda m: causal_lm_loss(m(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"]),
                    lambda m: labelled_loss(m, batch)):
        torch.manual_seed(0)
        adapted = ak.adapt(tiny_model(family), CONFIGS[method]())
        loss = loss_fn(adapted)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in adapted.parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1].abs().max() > 0
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
