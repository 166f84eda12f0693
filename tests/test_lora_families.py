"""LoRA on every supported family: forward, backward, learning, generation, save/load, merge."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.architectures import ModelLayout, is_linear, linear_shape
from adapterkit.training import causal_lm_loss, train_steps


def _randomise_b(adapted, std=0.1):
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, std)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_on_family(family, tmp_path):
    batch = tiny_batch()
    model = tiny_model(family)
    with torch.no_grad():
        base_logits = model(**batch).logits
    layout = ModelLayout(model)
    default_targets = ak.adapt(tiny_model(family), ak.LoraConfig()).records["default"].parts
    assert len(default_targets) == layout.shape.layers * (1 if layout.arch.qkv else 2)  # query+value or fused
    adapted = ak.adapt(model, ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"))

    # Starts as the base model (B = 0); every linear layer of the decoder is adapted, not the head.
    with torch.no_grad():
        assert torch.equal(adapted(**batch).logits, base_logits)
    targets = adapted.records["default"].parts
    assert len(targets) == layout.shape.layers * (len(layout.arch.mlp_in) + 2 + (1 if layout.arch.qkv else 3))
    assert "lm_head" not in targets
    expected = sum(4 * sum(linear_shape(adapted.base_model.get_submodule(p).base_layer)[:2]) for p in targets)
    assert adapted.trainable_parameters()[0] == expected
    assert all(is_linear(adapted.base_model.get_submodule(p).base_layer) for p in targets)

    # Loss falls over 30 steps on a fixed batch; gradients reach every LoRA weight.
    def same_batch():
        while True:
            yield batch
    losses = train_steps(adapted, same_batch(), 30, lr=1e-2)
    assert losses[-1] < losses[0] - 0.25, losses
    assert all(p.grad is None for p in adapted.base_model.parameters() if not p.requires_grad)

    # Generation runs with the KV cache.
    out = adapted.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)

    # Save -> load gives identical logits on a fresh base.
    with torch.no_grad():
        trained = adapted(**batch).logits
    assert (trained - base_logits).abs().max() > 1e-3
    adapted.save(tmp_path / "adapter")
    reloaded = ak.load(tiny_model(family), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)

    # Merged logits equal unmerged ones; unmerge restores the base weights.
    reloaded.merge()
    with torch.no_grad():
        merged = reloaded(**batch).logits
    assert (merged - trained).abs().max() <= 1e-4
    reloaded.unmerge()
    with torch.no_grad(), reloaded.disabled():
        assert (reloaded(**batch).logits - base_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_table_matches_model(family):
    model = tiny_model(family)
    layout = ModelLayout(model)
    config = model.config
    assert layout.shape.layers == 2 and layout.shape.hidden == 32 and layout.shape.heads == 4
    assert layout.shape.heads * layout.shape.head_dim == 32 or family == "gemma"
    attention = model.get_submodule(f"{layout.layer_path(0)}.{layout.arch.attention}")
    expected_kv = getattr(attention, "num_key_value_heads", None) or getattr(attention, "num_kv_heads", None) \
        or getattr(config, "num_key_value_heads", None) or layout.shape.heads
    if family == "falcon":
        expected_kv = 1  # multi-query
    assert layout.shape.kv_heads == expected_kv
    roles = ["attn_out", "mlp_out"] + (["qkv"] if layout.arch.qkv else ["q", "k", "v"])
    for role in roles:
        assert is_linear(model.get_submodule(layout.site(1, role))), role
    for path in layout.arch.mlp_in:
        assert is_linear(model.get_submodule(f"{layout.layer_path(0)}.{path}"))
    assert isinstance(model.get_submodule(layout.arch.embeddings), torch.nn.Embedding)
    assert model.get_submodule(layout.arch.embeddings) is model.get_input_embeddings()


def test_unknown_family_lists_supported_ones():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ak.AdapterkitError, match="supported: bloom, falcon.*register_architecture"):
        ak.adapt(model, ak.LoraConfig())


def test_new_family_described_by_module_names():
    model = tiny_model("llama")
    model.config.model_type = "my_llama"
    ak.register_architecture("my_llama", ak.Architecture(
        layers="model.layers", embeddings="model.embed_tokens", attention="self_attn",
        attn_out="self_attn.o_proj", mlp_in=("mlp.up_proj",), mlp_out="mlp.down_proj",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", kv_heads="num_key_value_heads"))
    try:
        adapted = ak.adapt(model, ak.LoraConfig())
        assert sorted(adapted.records["default"].parts)[0] == "model.layers.0.self_attn.q_proj"
    finally:
        del ak.ARCHITECTURES["my_llama"]


def test_bf16_base_trains_fp32_adapter():
    """Base in bf16 with autocast: the adapter stays fp32 and keeps changing the model each step."""
    batch = tiny_batch()
    adapted = ak.adapt(tiny_model("llama").to(torch.bfloat16), ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"))

    def same_batch():
        while True:
            yield batch
    losses = train_steps(adapted, same_batch(), 15, lr=1e-2, autocast=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in adapted.parameters() if p.requires_grad)
    assert losses[-1] < losses[0] - 0.25, losses
    with torch.no_grad():
        logits = adapted(**batch).logits  # no autocast: bf16 activations meet fp32 LoRA weights
    assert causal_lm_loss(logits, batch["labels"]).item() < losses[0]
