"""The core API: named adapters, disabling, mixed batches, state dicts, files, HF Trainer."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.sites import AdapterSite


def _random_lora(model, name="default", seed=0, **kw):
    adapted = ak.adapt(model, ak.LoraConfig(r=4, alpha=8, **kw), name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, p in adapted.adapter_state_dict(name).items():
            if key.endswith("lora_B"):
                p.normal_(0, 0.2)
    return adapted


@torch.no_grad()
def test_named_adapters_disable_and_delete():
    batch = tiny_batch()
    model = tiny_model("llama")
    base = model(**batch).logits
    adapted = _random_lora(model, "a", seed=1)
    _random_lora(adapted, "b", seed=2)
    assert adapted.active == ["a"]  # the first adapter added stays active
    out_a = adapted(**batch).logits
    adapted.set_active("b")
    out_b = adapted(**batch).logits
    assert (out_a - base).abs().max() > 1e-3 and (out_b - out_a).abs().max() > 1e-3
    with adapted.disabled():
        assert torch.equal(adapted(**batch).logits, base)
    adapted.delete("b")
    adapted.delete("a")
    assert not any(isinstance(m, AdapterSite) for m in model.modules())
    assert torch.equal(model(**batch).logits, base)
    with pytest.raises(ak.AdapterkitError, match="no adapter named 'a'"):
        adapted.set_active("a")


@torch.no_grad()
def test_mixed_batch_rows_equal_single_adapter_runs():
    batch = tiny_batch(batch=3)
    adapted = _random_lora(tiny_model("llama"), "a", seed=1)
    _random_lora(adapted, "b", seed=2)
    mixed = adapted(input_ids=batch["input_ids"], adapter_names=["b", None, "a"]).logits
    adapted.set_active("a")
    only_a = adapted(input_ids=batch["input_ids"]).logits
    adapted.set_active("b")
    only_b = adapted(input_ids=batch["input_ids"]).logits
    with adapted.disabled():
        base = adapted(input_ids=batch["input_ids"]).logits
    assert torch.allclose(mixed[0], only_b[0], atol=1e-6)
    assert torch.allclose(mixed[1], base[1], atol=1e-6)
    assert torch.allclose(mixed[2], only_a[2], atol=1e-6)
    with pytest.raises(ak.AdapterkitError, match="2 entries for a batch of 3"):
        adapted(input_ids=batch["input_ids"], adapter_names=["a", "b"])


def test_state_dict_holds_adapter_weights_only():
    adapted = _random_lora(tiny_model("llama"))
    state = adapted.state_dict()
    assert state and all(k.startswith("default.") and ".lora_" in k for k in state)
    assert sum(t.numel() for t in state.values()) == adapted.trainable_parameters()[0]
    other = _random_lora(tiny_model("llama"), seed=5)
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key])


def test_saved_files_are_small_and_complete(tmp_path):
    adapted = _random_lora(tiny_model("llama"))
    adapted.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "lora" and meta["format_version"] == 1 and meta["config"]["r"] == 4
    assert meta["parameters"] == adapted.trainable_parameters()[0]
    assert meta["modules"] == sorted(adapted.records["default"].parts)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == set(adapted.adapter_state_dict())


def test_save_refuses_non_finite_and_keeps_old_files(tmp_path):
    adapted = _random_lora(tiny_model("llama"))
    adapted.save(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    with torch.no_grad():
        next(iter(adapted.adapter_state_dict().values())).fill_(float("nan"))
    with pytest.raises(ak.AdapterkitError, match="NaN or inf"):
        adapted.save(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before


def test_config_validation_and_versions(tmp_path):
    with pytest.raises(ak.AdapterkitError, match="r must be a positive integer"):
        ak.LoraConfig(r=0)
    adapted = _random_lora(tiny_model("llama"))
    adapted.save(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "rank": 3}}))
    with pytest.raises(ak.AdapterkitError, match=r"unknown keys \['rank'\]"):
        ak.load(tiny_model("llama"), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ak.AdapterkitError, match="newer than this adapterkit"):
        ak.load(tiny_model("llama"), tmp_path)


def test_adapter_from_another_base_is_refused(tmp_path):
    _random_lora(tiny_model("llama")).save(tmp_path)
    with pytest.raises(ak.AdapterkitError, match="another base model"):
        ak.load(tiny_model("mistral"), tmp_path)


def test_targets_that_match_nothing_list_the_linear_modules():
    with pytest.raises(ak.AdapterkitError, match=r"\['query'\] match no module.*q_proj, k_proj"):
        ak.adapt(tiny_model("llama"), ak.LoraConfig(target_modules=["query"]))
    with pytest.raises(ak.AdapterkitError, match="LlamaAttention, not a linear module"):
        ak.adapt(tiny_model("llama"), ak.LoraConfig(target_modules=["self_attn"]))


@torch.no_grad()
def test_lora_regex_targets_and_layer_subset():
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(target_modules=r".*\.(q|k)_proj", layers=[1]))
    assert sorted(adapted.records["default"].parts) == ["model.layers.1.self_attn.k_proj",
                                                        "model.layers.1.self_attn.q_proj"]


@torch.no_grad()
@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_bias_and_modules_to_save_merge_exactly(family):
    batch = tiny_batch()
    model = tiny_model(family)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    adapted = _random_lora(model, bias="all", modules_to_save=["lm_head"])
    for key, p in adapted.adapter_state_dict().items():
        if key.endswith("bias") or ".module." in key:
            p.add_(torch.randn_like(p) * 0.1)
    unmerged = adapted(**batch).logits
    adapted.merge()
    assert (adapted(**batch).logits - unmerged).abs().max() < 1e-4
    adapted.unmerge()
    assert (adapted(**batch).logits - unmerged).abs().max() < 1e-5


def test_hf_trainer_trains_and_saves_only_adapter(tmp_path):
    from datasets_free import ListDataset  # local helper below
    from transformers import Trainer, TrainingArguments

    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4, alpha=8))
    batch = tiny_batch(batch=8)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=adapted, args=args, train_dataset=ListDataset(rows))
    trainer.train()
    assert any(p.abs().sum() > 0 for k, p in adapted.adapter_state_dict().items() if k.endswith("lora_B"))
    trainer.save_model(str(tmp_path / "out"))
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert set(saved) == set(adapted.state_dict())
    assert sum(t.numel() for t in saved.values()) == adapted.trainable_parameters()[0]


def test_merging_a_trained_copy_of_a_tied_head_is_refused():
    adapted = _random_lora(tiny_model("gpt2"), modules_to_save=["lm_head"])  # GPT-2 ties head and embeddings
    weights = {k: v.clone() for k, v in adapted.base_model.state_dict().items()}
    with pytest.raises(ak.AdapterkitError, match="tied embeddings"):
        adapted.merge()
    assert all(torch.equal(v, weights[k]) for k, v in adapted.base_model.state_dict().items())


@torch.no_grad()
def test_an_adapter_added_to_a_model_in_eval_mode_runs_in_eval_mode():
    model = tiny_model("llama").eval()
    adapted = ak.adapt(model, ak.LoraConfig(r=4, dropout=0.5))
    for p in adapted.adapter_state_dict().values():
        p.normal_(0, 0.3)
    ids = tiny_batch()["input_ids"]
    assert torch.equal(adapted(input_ids=ids).logits, adapted(input_ids=ids).logits)  # no dropout drawn
    assert not any(m.training for m in adapted.modules() if m is not adapted)
