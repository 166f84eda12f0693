"""Today's families beyond the shared harness: LoRA on fused expert weights (hand computation and PEFT's
target_parameters as oracles), PEFT oracles on Qwen3 and Gemma 2, `adapterkit inspect`, and the error a
family outside the table gets."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.tuners.lora.layer import ParamWrapper
from tiny_models import MOE_FAMILIES, save_tiny, tiny_batch, tiny_model
from torch.func import functional_call

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.methods.lora_experts import ExpertLoraEffect
from adapterkit.training import train_steps


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _experts_only(family, r=2, alpha=4.0, seed=0):
    """LoRA on the fused expert weights alone (q/v left at B = 0), expert updates made nonzero."""
    adapted = ak.adapt(tiny_model(family), ak.LoraConfig(r=r, alpha=alpha, target_parameters=["experts"]))
    torch.manual_seed(seed)
    parts = {p: e for p, e in adapted.records["default"].parts.items() if isinstance(e, ExpertLoraEffect)}
    with torch.no_grad():
        for effect in parts.values():
            for p in effect.parameters():
                p.normal_(0, 0.2)
    return adapted, parts


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_lora_equals_the_weights_updated_by_hand(family):
    adapted, parts = _experts_only(family)
    layout = ak.ARCHITECTURES[family].experts_layout
    assert len(parts) == adapted.layout.shape.layers
    updated = {}
    for path, effect in parts.items():
        experts = effect._base[0]
        for name in effect.names:
            a, b = effect.lora_A[name], effect.lora_B[name]  # [E, r, in], [E, out, r]
            delta = torch.stack([b[e] @ a[e] for e in range(a.shape[0])]) * (4.0 / 2)
            updated[f"{path}.base_layer.{name}"] = getattr(experts, name) + (delta if layout == "out_in" else
                                                                             delta.transpose(1, 2))
    batch = tiny_batch()
    got = _logits(adapted, batch)
    with torch.no_grad(), adapted.disabled():
        base = _logits(adapted, batch)
        want = functional_call(adapted.causal_lm, updated, (), dict(input_ids=batch["input_ids"],
                                                                     attention_mask=batch["attention_mask"])).logits
    assert (got - base).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-5
    adapted.merge()
    assert (_logits(adapted, batch) - got).abs().max() <= 1e-4
    adapted.unmerge()
    with adapted.disabled():
        assert (_logits(adapted, batch) - base).abs().max() <= 1e-5


def test_expert_lora_equals_peft_target_parameters():
    """PEFT's ParamWrapper on Mixtral's fused experts: lora_A [r*E, in], lora_B [out, r*E]."""
    family, r = "mixtral", 2
    names = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    peft_model = peft.get_peft_model(tiny_model(family), peft.LoraConfig(
        r=r, lora_alpha=4, target_modules=[], target_parameters=names)).eval()
    adapted = ak.adapt(tiny_model(family), ak.LoraConfig(r=r, alpha=4.0, target_modules=["q_proj"],
                                                         target_parameters=names))
    generator = torch.Generator().manual_seed(7)
    state = {}
    with torch.no_grad():
        for path, wrapper in peft_model.named_modules():
            if not isinstance(wrapper, ParamWrapper):
                continue
            a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight  # [r*E, in], [out, r*E]
            a.copy_(torch.randn(a.shape, generator=generator) * 0.3)
            b.copy_(torch.randn(b.shape, generator=generator) * 0.3)
            experts = path.removeprefix("base_model.model.").removesuffix(".base_layer")
            count, name = wrapper.num_experts, wrapper.parameter_name
            state[f"{experts}.lora_A.{name}"] = a.reshape(count, r, -1).clone()                     # [E, r, in]
            state[f"{experts}.lora_B.{name}"] = b.reshape(b.shape[0], r, count).permute(2, 0, 1).clone()  # [E, out, r]
    assert len(state) == 2 * 2 * adapted.layout.shape.layers
    for key, value in adapted.adapter_state_dict().items():
        state.setdefault(key, value)  # q_proj LoRA stays at B = 0
    adapted.load_adapter_state_dict(state)
    batch = tiny_batch()
    expected = _logits(peft_model, batch)
    assert (expected - _logits(tiny_model(family), batch)).abs().max() > 1e-2
    assert (_logits(adapted, batch) - expected).abs().max() <= 1e-5


def test_expert_lora_trains_saves_loads_and_refuses_mixed_batches(tmp_path):
    adapted = ak.adapt(tiny_model("qwen3_moe"), ak.LoraConfig(r=2, alpha=4, target_parameters=["experts"]))
    batch = tiny_batch()

    def same():
        while True:
            yield batch
    losses = train_steps(adapted, same(), 20, lr=2e-2)
    assert losses[-1] < losses[0] - 0.2, losses
    adapted.save(tmp_path / "a")
    again = ak.load(tiny_model("qwen3_moe"), tmp_path / "a")
    assert torch.equal(_logits(again, batch), _logits(adapted, batch))
    with pytest.raises(ak.AdapterkitError, match="mixed batch cannot include adapters on mixture-of-experts"):
        again(input_ids=batch["input_ids"], adapter_names=["default", None])
    with pytest.raises(ak.AdapterkitError, match="match no expert weight"):
        ak.adapt(tiny_model("mixtral"), ak.LoraConfig(target_parameters=["mlp.experts.nothing"]))
    with pytest.raises(ak.AdapterkitError, match="has none"):
        ak.adapt(tiny_model("llama"), ak.LoraConfig(target_parameters=["experts"]))


def test_untargeted_experts_are_reported_once():
    with pytest.warns(ak.AdapterkitWarning, match="expert weights are not targeted"):
        ak.adapt(tiny_model("olmoe"), ak.LoraConfig(target_modules="all-linear"))


@pytest.mark.parametrize("family", ["qwen3", "gemma2"])
def test_lora_on_todays_dense_families_matches_peft(family):
    targets = ["q_proj", "v_proj", "down_proj"]
    peft_model = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    peft_model.eval()
    generator = torch.Generator().manual_seed(3)
    state = {}
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if ".lora_" in key:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
                path, kind = key.removeprefix("base_model.model.").split(".lora_")
                state[f"{path}.lora_{kind.split('.')[0]}"] = p.detach().clone()
    adapted = ak.adapt(tiny_model(family), ak.LoraConfig(r=4, alpha=8, target_modules=targets))
    adapted.load_adapter_state_dict(state)
    batch = tiny_batch()
    expected = _logits(peft_model, batch)
    assert (expected - _logits(tiny_model(family), batch)).abs().max() > 1e-2
    assert (_logits(adapted, batch) - expected).abs().max() <= 1e-5


def test_peft_export_of_lora_on_a_new_dense_family_loads_in_peft(tmp_path):
    adapted = ak.adapt(tiny_model("qwen3"), ak.LoraConfig(r=4, alpha=8, target_modules="attn"))
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.normal_(0, 0.3)
    ak.save(adapted, tmp_path / "peft", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_model("qwen3"), str(tmp_path / "peft")).eval()
    batch = tiny_batch()
    assert (_logits(loaded, batch) - _logits(adapted, batch)).abs().max() <= 1e-5


def test_target_groups_resolve_from_the_table():
    model = tiny_model("phi3")
    attn = ak.adapt(model, ak.LoraConfig(target_modules="attn")).records["default"].parts
    assert sorted({p.rpartition(".")[2] for p in attn}) == ["o_proj", "qkv_proj"]
    mlp = ak.adapt(tiny_model("phi3"), ak.LoraConfig(target_modules=["mlp"])).records["default"].parts
    assert sorted({p.rpartition(".")[2] for p in mlp}) == ["down_proj", "gate_up_proj"]


def test_inspect_lists_experts_router_and_counts(tmp_path, capsys):
    folder = save_tiny("mixtral", tmp_path / "mixtral")
    capsys.readouterr()  # saving may import DeepSpeed (through accelerate), which prints its accelerator
    assert main(["inspect", str(folder), "--json", "--method", "lora", "--options",
                 '{"target_modules": ["attn"], "target_parameters": ["experts"]}']) == 0
    report = json.loads(capsys.readouterr().out)
    roles = report["roles"]
    assert roles["experts"]["count"] == 2 and roles["experts"]["shape"]["gate_up_proj"] == [4, 128, 32]
    assert roles["router"]["count"] == 2 and roles["router"]["shape"] == {"weight": [4, 32]}
    assert report["groups"] == {"all-linear": 8, "attn": 8, "mlp": 0, "llm-adapters": 6,  # q, k, v: no MLP linears
                                "experts (target_parameters)": 4}
    assert report["all_linear_reaches_experts"] is False
    # trainable: per layer q(32x32), k(16x32), v(16x32), o(32x32) at r 8, experts at r 8: 4 x (128+32 + 32+64) x 8
    per_layer = 8 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32)) + 4 * 8 * ((32 + 128) + (64 + 32))
    assert report["method"]["trainable"] == 2 * per_layer


def test_an_unknown_family_gets_the_row_it_needs():
    model = tiny_model("qwen3")
    model.config.model_type = "brand_new"
    with pytest.raises(ak.AdapterkitError, match=r"Its layers look like model\.layers \(2\), each with linear "
                                                 r"layers self_attn\.q_proj.*adapterkit inspect"):
        ak.adapt(model, ak.LoraConfig())


@pytest.mark.parametrize("family, expected", [
    ("llama", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]),
    ("gpt2", ["attn.c_attn", "mlp.c_fc", "mlp.c_proj"]),  # fused qkv
])
def test_llm_adapters_target_group_is_the_papers_lora_layers(family, expected):
    """LLM-Adapters' LoRA runs: q, k, v (or the fused qkv), the MLP's up and down projections."""
    from adapterkit.architectures import ModelLayout

    layout = ModelLayout(tiny_model(family))
    prefix = layout.layer_path(1) + "."
    assert [p.removeprefix(prefix) for p in layout.group_sites(1, "llm-adapters")] == expected
