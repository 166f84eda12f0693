"""Every registered method on every supported family, through one scenario (cases in method_cases.py);
the architecture table against the models themselves."""

import pytest
import torch
from method_cases import CASES
from safetensors.torch import load_file
from tiny_models import FAMILIES, LAYERS, greedy_without_cache, tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.architectures import ModelLayout, is_linear
from adapterkit.training import causal_lm_loss, train_steps


def _cycle(batch):
    while True:
        yield batch


def test_every_registered_method_has_a_case():
    missing, unknown = sorted(set(ak.METHODS) - set(CASES)), sorted(set(CASES) - set(ak.METHODS))
    assert not missing, f"registered methods without a case in tests/method_cases.py: {missing}"
    assert not unknown, f"cases in tests/method_cases.py for no registered method: {unknown}"
    for name, case in CASES.items():
        assert case.config("llama").method == name
        assert case.mergeable == ak.METHODS[name].mergeable, name


@pytest.mark.parametrize("method", sorted(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_method_on_family(family, method, tmp_path):
    case = CASES[method]
    refusal = case.refuses(family) if case.refuses else None
    if refusal:  # the method does not take this family's layers: one clear error, nothing attached
        with pytest.raises(ak.AdapterkitError, match=refusal):
            ak.adapt(tiny_model(family), case.config(family))
        return
    batch = tiny_batch()
    length = batch["input_ids"].shape[1]
    model = tiny_model(family)
    with torch.no_grad():
        base = model(**batch).logits
    adapted = ak.adapt(model, case.config(family))
    if case.check_attached:
        case.check_attached(family, adapted)
    assert adapted.trainable_parameters()[0] == case.trainable(family, adapted)

    # Outputs have exactly the input's length; the loss is the causal LM loss of the returned logits.
    with torch.no_grad():
        out = adapted(**batch, output_hidden_states=True)
        assert out.logits.shape[:2] == batch["input_ids"].shape
        assert len(out.hidden_states) == LAYERS + 1 and all(h.shape[1] == length for h in out.hidden_states)
        assert torch.allclose(out.loss, causal_lm_loss(out.logits, batch["labels"]), atol=1e-5)
        with adapted.disabled():
            assert torch.equal(adapted(**batch).logits, base)
    if case.starts_as_base:
        assert torch.equal(out.logits, base)
    else:
        assert (out.logits - base).abs().max() > 1e-5  # the adapter changes the output from the start

    # Loss falls on a fixed batch; every adapter weight moves; the frozen base gets no gradient.
    start = {key: t.clone() for key, t in adapted.adapter_state_dict().items()}
    losses = train_steps(adapted, _cycle(batch), case.steps, lr=case.lr)
    assert losses[-1] < losses[0] - case.loss_drop, losses
    assert all(p.grad is None for p in adapted.causal_lm.parameters() if not p.requires_grad)
    unmoved = [key for key, t in adapted.adapter_state_dict().items() if torch.equal(t, start[key])]
    assert not unmoved

    # Cached generation with left padding equals recomputing the sequence without a cache.
    ids = batch["input_ids"][:, :6].clone()
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ids[1, :2] = 0
    cached = adapted.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
    assert cached.shape == (2, 6 + 5)
    assert torch.equal(cached, greedy_without_cache(adapted, ids, mask, 5))

    # Save -> load on a fresh base gives identical logits; training then continues identically.
    with torch.no_grad():
        trained = adapted(**batch).logits
    assert (trained - base).abs().max() > 1e-3
    adapted.save(tmp_path)
    if case.check_saved:
        case.check_saved(adapted, load_file(tmp_path / "adapter_model.safetensors"))
    frozen = ak.load(tiny_model(family), tmp_path)  # for inference: nothing trainable
    reloaded = ak.load(tiny_model(family), tmp_path, trainable=True)
    assert frozen.trainable_parameters()[0] == 0
    assert reloaded.trainable_parameters()[0] == case.trainable(family, adapted)
    with torch.no_grad():
        assert torch.equal(frozen(**batch).logits, trained)
        assert torch.equal(reloaded(**batch).logits, trained)
    torch.manual_seed(1)  # some families train with dropout: same seed, same masks
    train_steps(adapted, _cycle(batch), 2, lr=1e-2)
    torch.manual_seed(1)
    train_steps(reloaded, _cycle(batch), 2, lr=1e-2)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, adapted(**batch).logits)

    # Merged logits equal unmerged ones and unmerge restores the base weights; or merge is refused.
    if not case.mergeable:
        with pytest.raises(ak.AdapterkitError, match="cannot be merged"):
            frozen.merge()
        return
    frozen.merge()
    with torch.no_grad():
        assert (frozen(**batch).logits - trained).abs().max() <= 1e-4
        frozen.unmerge()
        assert (frozen(**batch).logits - trained).abs().max() <= 1e-4
        with frozen.disabled():
            assert (frozen(**batch).logits - base).abs().max() <= 1e-5


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
    roles = ["attn_out"] + (["qkv"] if layout.arch.qkv else ["q", "k", "v"]) + (["mlp_out"] if layout.arch.mlp_in else [])
    for role in roles:
        assert is_linear(model.get_submodule(layout.site(1, role))), role
    if layout.arch.experts:  # a mixture-of-experts block: fused 3-D expert weights, a router
        experts = model.get_submodule(layout.site(1, "experts"))
        assert any(p.dim() == 3 for p in experts.parameters(recurse=False))
        assert model.get_submodule(layout.site(1, "router")).weight.shape[0] == \
            next(p for p in experts.parameters(recurse=False) if p.dim() == 3).shape[0]
    for path in layout.arch.mlp_in:
        assert is_linear(model.get_submodule(f"{layout.layer_path(0)}.{path}"))
    assert isinstance(model.get_submodule(layout.arch.embeddings), torch.nn.Embedding)
    assert model.get_submodule(layout.arch.embeddings) is model.get_input_embeddings()


def test_unknown_family_lists_supported_ones():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ak.AdapterkitError, match="supported: bloom, (.*, )?falcon, .*register_architecture"):
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
    losses = train_steps(adapted, _cycle(batch), 15, lr=1e-2, autocast=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in adapted.parameters() if p.requires_grad)
    assert losses[-1] < losses[0] - 0.25, losses
    with torch.no_grad():
        logits = adapted(**batch).logits  # no autocast: bf16 activations meet fp32 LoRA weights
    assert causal_lm_loss(logits, batch["labels"]).item() < losses[0]
