"""LoRA variants (DoRA, per-module rank/alpha, LoRA+), adapter combination and stacking, mixed generation."""

import math

import peft
import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.training import make_optimizer


def _peft_pair(family, peft_kwargs, ak_kwargs, target):
    """PEFT and adapterkit LoRA on identical bases, adapterkit loaded with PEFT's (randomised) weights."""
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(tiny_model(family), peft.LoraConfig(target_modules=[target], **peft_kwargs))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
            if "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.eval()
    adapted = ak.adapt(tiny_model(family), ak.LoraConfig(target_modules=[target], **ak_kwargs))
    tensors = {}
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            path = name.removeprefix("base_model.model.").split(".lora_")[0]
            kind = name.split(".lora_")[1].split(".")[0]
            key = {"A": "lora_A", "B": "lora_B", "magnitude_vector": "magnitude"}[kind]
            tensors[f"{path}.{key}"] = p.detach().clone()
    adapted.load_adapter_state_dict(tensors)
    return peft_model, adapted


@torch.no_grad()
@pytest.mark.parametrize("family,target", [("llama", "v_proj"), ("gpt2", "c_attn")])
def test_dora_matches_peft_and_merges(family, target):
    fan = {"fan_in_fan_out": True} if family == "gpt2" else {}
    peft_model, adapted = _peft_pair(family, {"r": 4, "lora_alpha": 8, "use_dora": True, **fan},
                                     {"r": 4, "alpha": 8, "use_dora": True}, target)
    batch = tiny_batch()
    expected = peft_model(input_ids=batch["input_ids"]).logits
    got = adapted(input_ids=batch["input_ids"]).logits
    with adapted.disabled():
        base = adapted(input_ids=batch["input_ids"]).logits
    assert (expected - base).abs().max() > 1e-3
    assert (got - expected).abs().max() <= 1e-5
    adapted.merge()
    assert (adapted(input_ids=batch["input_ids"]).logits - expected).abs().max() <= 1e-4
    adapted.unmerge()
    with adapted.disabled():
        assert (adapted(input_ids=batch["input_ids"]).logits - base).abs().max() <= 1e-5


@torch.no_grad()
def test_rank_and_alpha_patterns_match_peft():
    peft_model, adapted = _peft_pair(
        "llama", {"r": 4, "lora_alpha": 8, "rank_pattern": {"layers.1.self_attn.v_proj": 2},
                  "alpha_pattern": {"layers.0.self_attn.v_proj": 3}},
        {"r": 4, "alpha": 8, "rank_pattern": {"layers.1.self_attn.v_proj": 2},
         "alpha_pattern": {"layers.0.self_attn.v_proj": 3}}, "v_proj")
    parts = adapted.records["default"].parts
    assert parts["model.layers.1.self_attn.v_proj"].lora_A.shape[0] == 2
    assert parts["model.layers.0.self_attn.v_proj"].scaling == 3 / 4
    batch = tiny_batch()
    expected = peft_model(input_ids=batch["input_ids"]).logits
    assert (adapted(input_ids=batch["input_ids"]).logits - expected).abs().max() <= 1e-5


def test_loraplus_gives_b_a_larger_learning_rate():
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(loraplus_lr_ratio=16))
    _, optimizer, _ = make_optimizer(adapted, 1e-3, 0, 10)
    by_lr = {group["lr"]: group["params"] for group in optimizer.param_groups}
    b_ids = {id(p) for k, p in adapted.named_parameters() if k.endswith("lora_B")}
    assert set(by_lr) == {1e-3, 16e-3}
    assert {id(p) for p in by_lr[16e-3]} == b_ids and not b_ids & {id(p) for p in by_lr[1e-3]}


def _random_lora(adapted, name, r, alpha, seed):
    if name not in adapted.records:
        ak.adapt(adapted, ak.LoraConfig(r=r, alpha=alpha), name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapter_state_dict(name).values():
            p.normal_(0, 0.3)


@torch.no_grad()
def test_weighted_combinations_by_hand():
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=2, alpha=4), name="a")
    _random_lora(adapted, "a", 2, 4, seed=1)
    _random_lora(adapted, "b", 3, 3, seed=2)
    _random_lora(adapted, "c", 2, 1, seed=3)
    path = "model.layers.0.self_attn.q_proj"
    parts = {n: adapted.records[n].parts[path] for n in "abc"}

    def delta(p):
        return p.scaling * p.lora_B @ p.lora_A

    adapted.add_weighted_adapter(["a", "b"], [0.7, -1.5], "cat", combination="cat")
    combined = adapted.records["cat"].parts[path]
    assert combined.lora_A.shape[0] == 5
    assert torch.allclose(delta(combined), 0.7 * delta(parts["a"]) - 1.5 * delta(parts["b"]), atol=1e-6)

    adapted.add_weighted_adapter(["a", "c"], [0.5, 2.0], "lin", combination="linear")
    lin = adapted.records["lin"].parts[path]
    ka, kc = math.sqrt(0.5 * parts["a"].scaling), math.sqrt(2.0 * parts["c"].scaling)
    expected = (ka * parts["a"].lora_B + kc * parts["c"].lora_B) @ (ka * parts["a"].lora_A + kc * parts["c"].lora_A)
    assert lin.scaling == 1.0 and torch.allclose(delta(lin), expected, atol=1e-6)
    with pytest.raises(ak.AdapterkitError, match="equal ranks"):
        adapted.add_weighted_adapter(["a", "b"], [1, 1], "bad", combination="linear")


@torch.no_grad()
def test_stacked_bottleneck_adapters_by_hand():
    model = tiny_model("llama")
    adapted = ak.adapt(model, ak.AdapterPConfig(bottleneck_size=4), name="language")
    ak.adapt(adapted, ak.AdapterPConfig(bottleneck_size=4, non_linearity="tanh"), name="task")
    torch.manual_seed(0)
    for name in ("language", "task"):
        for p in adapted.adapter_state_dict(name).values():
            p.normal_(0, 0.3)
    adapted.set_active("language", "task")
    site = model.get_submodule("model.layers.0.mlp.down_proj")
    x = torch.randn(2, 3, 64)
    y = site.base_layer(x)
    lang, task = site.effects["language"], site.effects["task"]

    def series(effect, h, act):
        return h + act(h @ effect.adapter_down.weight.T + effect.adapter_down.bias) @ effect.adapter_up.weight.T \
            + effect.adapter_up.bias

    expected = series(task, series(lang, y, torch.relu), torch.tanh)  # the task adapter on top
    assert torch.allclose(site(x), expected, atol=1e-6)
    adapted.set_active("task", "language")
    assert not torch.allclose(site(x), expected, atol=1e-4)  # the order matters, and is the one given


@torch.no_grad()
def test_mixed_batch_generation_equals_single_adapter_runs():
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4), name="a")
    _random_lora(adapted, "a", 4, 8, seed=1)
    _random_lora(adapted, "b", 4, 8, seed=2)
    ids = tiny_batch(batch=3, length=6)["input_ids"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    mixed = adapted.generate(input_ids=ids, adapter_names=["b", None, "a"], **kwargs)
    adapted.set_active("a")
    only_a = adapted.generate(input_ids=ids, **kwargs)
    adapted.set_active("b")
    only_b = adapted.generate(input_ids=ids, **kwargs)
    with adapted.disabled():
        base = adapted.generate(input_ids=ids, **kwargs)
    assert torch.equal(mixed[0], only_b[0]) and torch.equal(mixed[1], base[1]) and torch.equal(mixed[2], only_a[2])
    assert not torch.equal(only_a, only_b)
