"""OFT against PEFT 0.21's OFT (tests/peft_oracle.py: same logits before and after training, PEFT folders both
ways) with the Cayley-Neumann series and the exact transform; its start; what it refuses."""

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
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods.oft import OftConfig

NAMES = {"oft_R": "oft_R"}
TARGETS = ["q_proj", "v_proj", "down_proj"]  # inputs 32, 32, 64


def _pair(block_size=8, **options):
    peft_model = peft.get_peft_model(tiny_model("llama"), peft.OFTConfig(
        target_modules=TARGETS, oft_block_size=block_size, **options))
    ours = ak.adapt(tiny_model("llama"), OftConfig(target_modules=TARGETS, block_size=block_size, **options))
    return peft_model.eval(), ours


@pytest.mark.parametrize("options", [{}, {"num_cayley_neumann_terms": 3}, {"use_cayley_neumann": False}],
                         ids=["neumann-5", "neumann-3", "exact"])
def test_oft_matches_peft_before_and_after_training(options):
    peft_model, adapted = _pair(**options)
    state = randomize(peft_model, NAMES, scale=0.1)
    adapted.load_adapter_state_dict(state)
    assert_matches_peft(peft_model, adapted)


def test_oft_starts_as_peft_does():
    """Q zero, so R = I and the logits are exactly the base model's; [in / b, b (b - 1) / 2] per layer."""
    peft_model, adapted = _pair(block_size=32)  # PEFT 0.21's default size
    assert torch.equal(logits(adapted, tiny_batch()), logits(tiny_model("llama"), tiny_batch()))
    shapes = {k.split(".")[-2]: tuple(p.shape) for k, p in adapted.adapter_state_dict().items()}
    assert shapes == {"q_proj": (1, 496), "v_proj": (1, 496), "down_proj": (2, 496)}
    assert all(not p.any() for p in adapted.adapter_state_dict().values())
    copy_from_peft(peft_model, adapted, NAMES)
    assert_same_training(peft_model, adapted)


def test_oft_peft_folders_both_ways(tmp_path):
    adapted = ak.adapt(tiny_model("llama"), OftConfig(block_size=4, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.1)
    config = assert_export_loads_in_peft(adapted, "llama", tmp_path / "ours")
    assert config.peft_type == peft.PeftType.OFT and config.oft_block_size == 4
    peft_model, _ = _pair(block_size=16)
    randomize(peft_model, NAMES, scale=0.1)
    loaded = assert_peft_folder_loads(peft_model, "llama", tmp_path / "theirs")
    assert loaded.records["default"].config.block_size == 16


def test_oft_refuses_conv1d_and_block_sizes_that_do_not_divide():
    with pytest.raises(ak.AdapterkitError, match="oft cannot adapt transformer.h.0.attn.c_attn: it is a Conv1D"):
        ak.adapt(tiny_model("gpt2"), OftConfig())
    with pytest.raises(ak.AdapterkitError, match="oft block_size 5 does not divide the 32 input features of "
                                                 r"model.layers.0.self_attn.q_proj; .*\(e.g. --oft-block-size 4\)"):
        ak.adapt(tiny_model("llama"), OftConfig(block_size=5))
    with pytest.raises(ak.AdapterkitError, match="oft block_size must be at least 2"):
        OftConfig(block_size=1)
