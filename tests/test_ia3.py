"""(IA)3 against PEFT's IA3 (same vectors, same logits, merged and unmerged) and by hand."""

import peft
import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods.ia3 import IA3Config


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family, targets, feedforward", [
    ("llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),  # Conv1D: weights stored (in, out)
])
def test_ia3_matches_peft(family, targets, feedforward):
    peft_model = peft.get_peft_model(tiny_model(family), peft.IA3Config(
        target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=family == "gpt2")).eval()
    adapted = ak.adapt(tiny_model(family), IA3Config(target_modules=targets, feedforward_modules=feedforward))
    generator = torch.Generator().manual_seed(5)
    state = {}
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if ".ia3_l." in key:
                p.copy_(1 + torch.randn(p.shape, generator=generator) * 0.5)
                state[key.removeprefix("base_model.model.").split(".ia3_l.")[0] + ".ia3_l"] = p.detach().flatten()
    assert sorted(state) == sorted(adapted.adapter_state_dict())
    adapted.load_adapter_state_dict(state)
    batch = tiny_batch()
    expected = _logits(peft_model, batch)
    assert (expected - _logits(tiny_model(family), batch)).abs().max() > 1e-2
    assert (_logits(adapted, batch) - expected).abs().max() <= 1e-5
    adapted.merge()
    assert (_logits(adapted, batch) - expected).abs().max() <= 1e-4
    merged_peft = peft_model.merge_and_unload()
    assert (_logits(merged_peft, batch) - expected).abs().max() <= 1e-4
    adapted.unmerge()
    with adapted.disabled():
        assert (_logits(adapted, batch) - _logits(tiny_model(family), batch)).abs().max() <= 1e-5


def test_ia3_defaults_and_counts():
    adapted = ak.adapt(tiny_model("llama"), ak.get_method("ia3").config_class())
    parts = adapted.records["default"].parts
    assert sorted({p.rpartition(".")[2] for p in parts}) == ["down_proj", "k_proj", "v_proj"]
    # k, v: 16 outputs each (2 kv heads x 8); down_proj: 64 inputs; 2 layers
    assert adapted.trainable_parameters()[0] == 2 * (16 + 16 + 64)
    with pytest.raises(ak.AdapterkitError, match="feedforward_modules must be among target_modules"):
        ak.adapt(tiny_model("llama"), IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"]))
