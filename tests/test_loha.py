"""LoHa against PEFT's LoHa (tests/peft_oracle.py: same logits before and after training, PEFT folders both
ways), its starting values, its dropouts, and what it refuses."""

import math

import peft
import pytest
import torch
from peft_oracle import (
    assert_export_loads_in_peft,
    assert_matches_peft,
    assert_merges_like_unmerged,
    assert_peft_folder_loads,
    assert_same_training,
    copy_from_peft,
    logits,
    randomize,
)
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods.loha import LohaConfig

NAMES = {n: n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _pair(**options):
    peft_model = peft.get_peft_model(tiny_model("llama"), peft.LoHaConfig(target_modules=TARGETS, **options))
    return peft_model.eval(), ak.adapt(tiny_model("llama"), LohaConfig(target_modules=TARGETS, **options))


def test_loha_matches_peft_before_and_after_training():
    peft_model, adapted = _pair(r=4, alpha=6, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    state = randomize(peft_model, NAMES, scale=0.3)
    adapted.load_adapter_state_dict(state)
    assert_matches_peft(peft_model, adapted)


def test_loha_starts_as_peft_does():
    """W2b zero (the update starts at 0), the other three Kaiming-uniform with PEFT's bounds; training from
    PEFT's own starting values follows PEFT."""
    peft_model, adapted = _pair(r=4)
    batch = tiny_batch()
    assert torch.equal(logits(adapted, batch), logits(tiny_model("llama"), batch))
    for key, p in adapted.adapter_state_dict().items():
        name = key.rpartition(".")[2]
        if name == "hada_w2_b":
            assert not p.any()
        else:
            bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)): 1 / sqrt(fan_in)
            assert p.abs().max() <= bound and p.abs().max() > bound / 2 and p.std() > bound / 4, key
    copy_from_peft(peft_model, adapted, NAMES)
    assert_same_training(peft_model, adapted)


def test_loha_peft_folders_both_ways(tmp_path):
    adapted = ak.adapt(tiny_model("llama"), LohaConfig(r=4, alpha=6, target_modules="all-linear",
                                                      rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3.0}))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    config = assert_export_loads_in_peft(adapted, "llama", tmp_path / "ours")
    assert config.peft_type == peft.PeftType.LOHA and config.r == 4
    peft_model, _ = _pair(r=4, alpha=6, rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    randomize(peft_model, NAMES, scale=0.3)
    loaded = assert_peft_folder_loads(peft_model, "llama", tmp_path / "theirs")
    parts = loaded.records["default"].parts
    assert parts["model.layers.0.mlp.down_proj"].hada_w1_a.shape == (32, 2)
    assert parts["model.layers.0.self_attn.v_proj"].scaling == 3 / 4


def test_loha_dropouts_act_in_training_only():
    adapted = ak.adapt(tiny_model("llama"), LohaConfig(r=4, rank_dropout=0.5, module_dropout=0.5,
                                                      target_modules=TARGETS))
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    adapted.eval()  # (a fresh adapter's parts start in training mode, whatever the model's mode)
    batch = tiny_batch()
    evaluated = logits(adapted, batch)
    assert torch.equal(logits(adapted, batch), evaluated)
    adapted.train()
    torch.manual_seed(0)
    trained = [logits(adapted, batch) for _ in range(4)]
    adapted.eval()
    assert any((t - evaluated).abs().max() > 1e-4 for t in trained)
    assert_merges_like_unmerged(adapted)


def test_loha_refuses_conv1d_and_bad_options():
    with pytest.raises(ak.AdapterkitError, match="loha cannot adapt transformer.h.0.attn.c_attn: it is a Conv1D"):
        ak.adapt(tiny_model("gpt2"), LohaConfig())
    with pytest.raises(ak.AdapterkitError, match=r"loha rank_dropout must be in \[0, 1\)"):
        LohaConfig(rank_dropout=1.0)
    with pytest.raises(ak.AdapterkitError, match="loha r must be at least 1"):
        LohaConfig(r=0)
    with pytest.raises(ak.AdapterkitError, match="loha rank_pattern values must be integers"):
        LohaConfig(rank_pattern={"q_proj": 2.5})
