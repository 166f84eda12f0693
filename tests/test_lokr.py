"""LoKr against PEFT's LoKr (tests/peft_oracle.py: same logits before and after training, PEFT folders both
ways) with whole and split factors, its factorisation and starting values, and what it refuses."""

import peft
import pytest
import torch
from peft.tuners.lokr.layer import factorization as peft_factorization
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
from adapterkit.methods.lokr import LokrConfig, factorization

NAMES = {n: n for n in ("lokr_w1_a", "lokr_w1_b", "lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_w2")}
TARGETS = ["q_proj", "v_proj", "down_proj"]
OPTIONS = [
    {},                                                     # r 8: both factors whole on 32 x 32 and 32 x 64
    {"r": 1, "alpha": 3},                                   # W2 split
    {"r": 1, "decompose_both": True, "decompose_factor": 2},  # both split, first factors of size 2
    {"r": 2, "rank_pattern": {"down_proj": 8}, "alpha_pattern": {"v_proj": 5}},
]


def _pair(**options):
    peft_model = peft.get_peft_model(tiny_model("llama"), peft.LoKrConfig(target_modules=TARGETS, **options))
    return peft_model.eval(), ak.adapt(tiny_model("llama"), LokrConfig(target_modules=TARGETS, **options))


@pytest.mark.parametrize("options", OPTIONS, ids=["whole", "w2-split", "both-split", "patterns"])
def test_lokr_matches_peft_before_and_after_training(options):
    peft_model, adapted = _pair(**options)
    state = randomize(peft_model, NAMES, scale=0.3)
    assert sorted(state) == sorted(adapted.adapter_state_dict())  # the same factors, whole or split
    adapted.load_adapter_state_dict(state)
    assert_matches_peft(peft_model, adapted)


def test_lokr_factorization_is_peft_s():
    assert all(factorization(d, f) == peft_factorization(d, f)
               for d in range(1, 300) for f in (-1, 1, 2, 3, 4, 5, 8, 10, 16, 33))


def test_lokr_starts_as_peft_does():
    """W1 (or W1a) zero, so the update starts at 0; training from PEFT's own starting values follows PEFT."""
    for options in OPTIONS[1:3]:
        peft_model, adapted = _pair(**options)
        assert torch.equal(logits(adapted, tiny_batch()), logits(tiny_model("llama"), tiny_batch()))
        ours = adapted.adapter_state_dict()
        for key, p in ours.items():
            assert (not p.any()) == key.endswith(("lokr_w1", "lokr_w1_a")), key
        copy_from_peft(peft_model, adapted, NAMES)
        assert_same_training(peft_model, adapted)


def test_lokr_peft_folders_both_ways(tmp_path):
    adapted = ak.adapt(tiny_model("llama"), LokrConfig(r=1, alpha=2, target_modules="all-linear",
                                                      rank_pattern={"down_proj": 8}, decompose_both=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    config = assert_export_loads_in_peft(adapted, "llama", tmp_path / "ours")
    assert config.peft_type == peft.PeftType.LOKR and config.decompose_both
    peft_model, _ = _pair(**OPTIONS[3])
    randomize(peft_model, NAMES, scale=0.3)
    loaded = assert_peft_folder_loads(peft_model, "llama", tmp_path / "theirs")
    parts = loaded.records["default"].parts
    assert parts["model.layers.0.mlp.down_proj"].lokr_w2 is not None  # rank 8: W2 whole
    assert parts["model.layers.0.self_attn.v_proj"].scaling == 5 / 2


def test_lokr_refuses_conv1d_and_bad_options():
    with pytest.raises(ak.AdapterkitError, match="lokr cannot adapt transformer.h.0.attn.c_attn: it is a Conv1D"):
        ak.adapt(tiny_model("gpt2"), LokrConfig())
    with pytest.raises(ak.AdapterkitError, match="lokr decompose_factor must be -1 or a positive integer"):
        LokrConfig(decompose_factor=0)
    with pytest.raises(ak.AdapterkitError, match=r"lokr module_dropout must be in \[0, 1\)"):
        LokrConfig(module_dropout=1.0)
