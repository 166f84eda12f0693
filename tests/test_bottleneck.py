"""Bottleneck adapters (AdapterH, AdapterP, Parallel) against hand-computed tensors; placements and options.

The scenario on every family (training, generation, save/load, merge refused) is in test_families.py."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.architectures import ModelLayout
from adapterkit.methods.bottleneck import AdapterHConfig, AdapterPConfig, ParallelConfig


def _randomise(adapted, std=0.2, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.normal_(0, std)


def _by_hand(x, down, up, act, scale):
    return scale * (act(x @ down.weight.T + down.bias) @ up.weight.T + up.bias)


@torch.no_grad()
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_series_adapters_sit_on_sublayer_outputs(family):
    model = tiny_model(family)
    layout = ModelLayout(model)
    adapted = ak.adapt(model, AdapterHConfig(bottleneck_size=6, non_linearity="gelu", scaling=0.7))
    _randomise(adapted)
    seen = {}
    for role in ("attn_out", "mlp_out"):
        site = model.get_submodule(layout.site(1, role))
        site.base_layer.register_forward_hook(lambda m, i, o, role=role: seen.__setitem__(role + ":base", o.clone()))
        site.register_forward_hook(lambda m, i, o, role=role: seen.__setitem__(role + ":site", o.clone()))
        site.effects["default"].adapter_down.register_forward_pre_hook(
            lambda m, i, role=role: seen.__setitem__(role + ":adapter_in", i[0]))
    adapted(**tiny_batch())
    for role in ("attn_out", "mlp_out"):
        effect = model.get_submodule(layout.site(1, role)).effects["default"]
        y = seen[role + ":base"]
        assert torch.equal(seen[role + ":adapter_in"], y)  # the adapter reads the sub-layer output
        expected = y + _by_hand(y, effect.adapter_down, effect.adapter_up, torch.nn.functional.gelu, 0.7)
        assert torch.allclose(seen[role + ":site"], expected, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("location", ["mlp", "attn"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "falcon"])
def test_parallel_adapter_reads_the_sublayer_input(family, location):
    model = tiny_model(family)
    layout = ModelLayout(model)
    adapted = ak.adapt(model, ParallelConfig(bottleneck_size=6, location=location, non_linearity="tanh",
                                             scaling=2.0))
    _randomise(adapted)
    out_role = "mlp_out" if location == "mlp" else "attn_out"
    first = model.get_submodule(layout.input_site(1, location + "_in")).base_layer
    site = model.get_submodule(layout.site(1, out_role))
    seen = {}
    first.register_forward_pre_hook(lambda m, i: seen.__setitem__("sublayer_in", i[0]))
    site.base_layer.register_forward_hook(lambda m, i, o: seen.__setitem__("base", o.clone()))
    site.register_forward_hook(lambda m, i, o: seen.__setitem__("site", o.clone()))  # falcon adds in place later
    effect = site.effects["default"]
    effect.adapter_down.register_forward_pre_hook(lambda m, i: seen.__setitem__("adapter_in", i[0]))
    adapted(**tiny_batch())
    x = seen["sublayer_in"]
    assert torch.equal(seen["adapter_in"], x)  # the normalised hidden state entering the sub-layer
    expected = seen["base"] + _by_hand(x, effect.adapter_down, effect.adapter_up, torch.tanh, 2.0)
    assert torch.allclose(seen["site"], expected, atol=1e-6)


def test_options_reduction_factor_learned_scaling_layers_and_normal_init():
    adapted = ak.adapt(tiny_model("llama"), AdapterPConfig(reduction_factor=4, scaling="learned", layers=[1],
                                                          init="normal"))
    assert list(adapted.records["default"].parts) == ["model.layers.1.mlp.down_proj"]
    b = 32 // 4
    assert adapted.trainable_parameters()[0] == 2 * 32 * b + b + 32 + 1  # + the learned scale
    up = adapted.records["default"].parts["model.layers.1.mlp.down_proj"].adapter_up.weight
    assert 0.01 < up.std().item() < 0.03  # N(0, 0.02), not zero
    with pytest.raises(ak.AdapterkitError, match="not both"):
        AdapterHConfig(bottleneck_size=8, reduction_factor=4)
    with pytest.raises(ak.AdapterkitError, match="non_linearity must be one of"):
        AdapterHConfig(non_linearity="sigmoid")


@pytest.mark.parametrize("family,series_site,parallel_sites", [
    ("llama", ["mlp.gate_proj", "mlp.up_proj"], ["mlp.up_proj", "mlp.down_proj"]),
    ("bloom", ["mlp.dense_4h_to_h"], ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
    ("gptj", ["mlp.fc_out"], ["mlp.fc_in", "mlp.fc_out"]),
])
def test_llm_adapters_preset_placements(family, series_site, parallel_sites):
    series = ak.adapt(tiny_model(family), AdapterHConfig(preset="llm-adapters"))
    layer = ModelLayout(series.causal_lm).layer_path(0)
    assert [p for p in series.records["default"].parts if p.startswith(layer + ".")] == \
        [f"{layer}.{s}" for s in series_site]
    assert series.records["default"].config.bottleneck_size == 256
    assert series.records["default"].config.non_linearity == "tanh"
    kinds = {type(p).__name__ for p in series.records["default"].parts.values()}
    assert kinds == ({"InputAdapter"} if family == "llama" else {"SeriesAdapter"})
    pfeiffer = ak.adapt(tiny_model(family), AdapterPConfig(preset="llm-adapters"))
    assert [p for p in pfeiffer.records["default"].parts if p.startswith(layer + ".")] == \
        [f"{layer}.{ModelLayout(pfeiffer.causal_lm).arch.mlp_out}"]
    parallel = ak.adapt(tiny_model(family), ParallelConfig(preset="llm-adapters"))
    assert sorted(p for p in parallel.records["default"].parts if p.startswith(layer + ".")) == \
        sorted(f"{layer}.{s}" for s in parallel_sites)


@torch.no_grad()
def test_llm_adapters_parallel_on_a_linear_by_hand():
    model = tiny_model("llama")
    adapted = ak.adapt(model, ParallelConfig(target_modules=["up_proj"], bottleneck_size=5, non_linearity="relu"))
    _randomise(adapted)
    site = model.get_submodule("model.layers.0.mlp.up_proj")
    x = torch.randn(3, 32)
    effect = site.effects["default"]
    expected = site.base_layer(x) + _by_hand(x, effect.adapter_down, effect.adapter_up, torch.relu, 1.0)
    assert torch.allclose(site(x), expected, atol=1e-6)


@torch.no_grad()
def test_llm_adapters_input_adapter_by_hand():
    model = tiny_model("llama")
    adapted = ak.adapt(model, AdapterHConfig(target_modules=["gate_proj"], position="input", bottleneck_size=5,
                                             non_linearity="tanh", scaling=0.5))
    _randomise(adapted)
    site = model.get_submodule("model.layers.1.mlp.gate_proj")
    x = torch.randn(3, 32)
    effect = site.effects["default"]
    expected = site.base_layer(x + _by_hand(x, effect.adapter_down, effect.adapter_up, torch.tanh, 0.5))
    assert torch.allclose(site(x), expected, atol=1e-6)


@torch.no_grad()
def test_mixed_batch_with_parallel_and_lora():
    batch = tiny_batch(batch=3)
    adapted = ak.adapt(tiny_model("llama"), ParallelConfig(bottleneck_size=4, location="both"), name="par")
    ak.adapt(adapted, ak.LoraConfig(r=2), name="lora")
    for name in ("par", "lora"):
        for p in adapted.adapter_state_dict(name).values():
            p.normal_(0, 0.2)
    mixed = adapted(input_ids=batch["input_ids"], adapter_names=["lora", "par", None]).logits
    singles = {}
    for name in ("par", "lora"):
        adapted.set_active(name)
        singles[name] = adapted(input_ids=batch["input_ids"]).logits
    with adapted.disabled():
        base = adapted(input_ids=batch["input_ids"]).logits
    assert torch.allclose(mixed[0], singles["lora"][0], atol=1e-6)
    assert torch.allclose(mixed[1], singles["par"][1], atol=1e-6)
    assert torch.allclose(mixed[2], base[2], atol=1e-6)
