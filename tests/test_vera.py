"""VeRA against PEFT's VeRA (tests/peft_oracle.py: same logits before and after training, PEFT folders both
ways) on nn.Linear and Conv1D layers; its seeded projections bit-equal to PEFT's; what it refuses."""

import peft
import pytest
import torch
from peft_oracle import (
    assert_export_loads_in_peft,
    assert_matches_peft,
    assert_peft_folder_loads,
    assert_same_training,
    copy_from_peft,
    logits,
    randomize,
)
from safetensors.torch import load_file, save_file
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods.vera import VeraConfig

NAMES = {"vera_lambda_b": "vera_lambda_b", "vera_lambda_d": "vera_lambda_d"}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}  # gpt2: Conv1D


def _pair(family: str, **options):
    peft_model = peft.get_peft_model(tiny_model(family), peft.VeraConfig(
        target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2", **options))
    return peft_model.eval(), ak.adapt(tiny_model(family), VeraConfig(target_modules=TARGETS[family], **options))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vera_matches_peft_before_and_after_training(family):
    peft_model, adapted = _pair(family, r=16, projection_prng_key=7)
    state = randomize(peft_model, NAMES, scale=0.5)
    adapted.load_adapter_state_dict(state)
    assert_matches_peft(peft_model, adapted, family)


def test_vera_projections_and_start_are_peft_s():
    """A [r, largest in] and B [largest out, r] bit-equal to PEFT's for the same key; lambda_b zero (the
    update starts at 0), lambda_d = d_initial; only the two vectors are trained."""
    peft_model, adapted = _pair("llama", r=16, projection_prng_key=3, d_initial=0.2)
    projection = next(iter(adapted.records["default"].parts.values())).projection
    assert torch.equal(projection.a, peft_model.base_model.vera_A["default"])
    assert torch.equal(projection.b, peft_model.base_model.vera_B["default"])
    assert projection.a.shape == (16, 64) and projection.b.shape == (32, 16)  # down_proj reads 64 features
    assert torch.equal(logits(adapted, tiny_batch()), logits(tiny_model("llama"), tiny_batch()))
    for key, p in adapted.adapter_state_dict().items():
        assert torch.equal(p, torch.zeros_like(p) if key.endswith("lambda_b") else torch.full_like(p, 0.2)), key
    assert adapted.trainable_parameters()[0] == 2 * (32 + 16 + 16 + 16 + 32 + 16)  # lambda_b out + lambda_d r
    copy_from_peft(peft_model, adapted, NAMES)
    assert_same_training(peft_model, adapted)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_vera_peft_folders_both_ways(family, tmp_path):
    adapted = ak.adapt(tiny_model(family), VeraConfig(r=8, projection_prng_key=11, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.5)
    config = assert_export_loads_in_peft(adapted, family, tmp_path / "ours")
    assert config.peft_type == peft.PeftType.VERA and config.projection_prng_key == 11
    peft_model, _ = _pair(family, r=16, projection_prng_key=5)
    randomize(peft_model, NAMES, scale=0.5)
    loaded = assert_peft_folder_loads(peft_model, family, tmp_path / "theirs")
    assert loaded.records["default"].config.projection_prng_key == 5


def test_vera_refuses_other_projections_and_bad_options(tmp_path):
    peft_model, _ = _pair("llama", r=16)
    peft_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    weights["base_model.vera_A"] = weights["base_model.vera_A"] * 2
    save_file(weights, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ak.AdapterkitError, match="vera_A/vera_B are not the ones projection_prng_key=0 draws"):
        ak.load(tiny_model("llama"), tmp_path)
    with pytest.raises(ak.AdapterkitError, match=r"vera dropout must be in \[0, 1\)"):
        VeraConfig(dropout=1.0)
    with pytest.raises(ak.AdapterkitError, match="vera r must be at least 1"):
        VeraConfig(r=0)
