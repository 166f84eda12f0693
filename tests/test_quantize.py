"""A quantized frozen base (bitsandbytes int8 / NF4) under every method; gradient checkpointing."""

import importlib.util

import bitsandbytes.functional as bnbf
import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit import quantization
from adapterkit.cli import main
from adapterkit.models import load_model
from adapterkit.training import causal_lm_loss, train_steps

CONFIGS = {
    "lora": ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "adapter-h": ak.AdapterHConfig(bottleneck_size=8),
    "adapter-p": ak.AdapterPConfig(bottleneck_size=8),
    "parallel": ak.ParallelConfig(bottleneck_size=8),
    "prompt-tuning": ak.PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning": ak.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix-tuning": ak.PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "p-tuning-v2": ak.PTuningV2Config(num_virtual_tokens=4, prefix_init="random"),
    "ia3": ak.get_method("ia3").config_class(),
    "loha": ak.get_method("loha").config_class(r=4, alpha=8),
    "lokr": ak.get_method("lokr").config_class(r=4, alpha=8),
    "vera": ak.get_method("vera").config_class(r=16),
    "oft": ak.get_method("oft").config_class(),
    "adalora": ak.get_method("adalora").config_class(init_r=4, target_r=2, tinit=2, tfinal=3),
}
LR = {"ia3": 5e-2, "prompt-tuning": 5e-2, "p-tuning": 1e-2, "prefix-tuning": 1e-2, "p-tuning-v2": 5e-2}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny LLaMA 64 wide: bitsandbytes' CPU inference path packs weights in blocks of 64 inputs."""
    import transformers as T
    from tiny_models import tiny_config, tiny_tokenizer

    config = T.LlamaConfig(**{**tiny_config("llama").to_dict(), "hidden_size": 64, "intermediate_size": 128,
                              "head_dim": 16})
    folder = tmp_path_factory.mktemp("tiny-llama-64")
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _full_model(folder):
    return load_model(str(folder), "fp32")[0]


def test_every_method_has_a_quantized_config():
    assert sorted(CONFIGS) == sorted(ak.METHODS)


def _cycle(batch):
    while True:
        yield batch


@torch.no_grad()
def test_lora_on_an_nf4_linear_equals_the_update_added_by_hand(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), "fp32", "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    # the library's own dequantized reference, in fp32: the precision asked for (not its packed bf16 kernel)
    torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-5, atol=1e-5)
    full = _full_model(tiny_llama_dir).model.layers[0].self_attn.q_proj.weight
    assert 0 < (weight - full).abs().max() <= 0.2 * full.abs().max()  # really quantized, and close
    adapted = ak.adapt(model, ak.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    effect = adapted.causal_lm.model.layers[0].self_attn.q_proj.effects["default"]
    effect.lora_B.normal_(0, 0.3)
    got = adapted.causal_lm.model.layers[0].self_attn.q_proj(x)
    expected = x @ weight.T + 2.0 * (x @ effect.lora_A.T) @ effect.lora_B.T
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got.float() - x @ weight.T).abs().max() > 0.1  # the update is there
    with pytest.raises(ak.AdapterkitError, match="stored quantized"):
        adapted.merge()


@torch.no_grad()
def test_an_fp32_nf4_model_computes_in_fp32(tiny_llama_dir):
    """Its logits equal those of the same model with the nf4 weights dequantized into float layers
    (transformers' dequantize), whatever bitsandbytes' CPU kernels would round to bf16; a bf16 model keeps
    the packed kernel."""
    ids = torch.randint(0, 100, (2, 12))
    model, _ = load_model(str(tiny_llama_dir), "fp32", "nf4")
    reference = quantization.dequantized(load_model(str(tiny_llama_dir), "fp32", "nf4")[0])
    assert quantization.quantized_layers(model) > 0 and quantization.quantized_layers(reference) == 0
    for rows in (ids, ids[:1, :1]):  # a prefill, and one row of one token (a decoding step)
        torch.testing.assert_close(model(rows).logits, reference(rows).logits, rtol=1e-5, atol=1e-5)
    bf16, _ = load_model(str(tiny_llama_dir), "bf16", "nf4")
    layers = [m for m in bf16.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and all(m.support_avx512bf16_for_cpu == bnbf.has_avx512bf16() for m in layers)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_method_trains_on_an_nf4_base_and_loads_on_the_full_one(method, tiny_llama_dir, tmp_path):
    model, _ = load_model(str(tiny_llama_dir), "fp32", "nf4")
    adapted = ak.adapt(model, CONFIGS[method])
    batch = tiny_batch()
    losses = train_steps(adapted, _cycle(batch), 15, lr=LR.get(method, 1e-2))
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(p.dtype == torch.float32 for p in adapted.parameters() if p.requires_grad)
    out = adapted.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=3,
                           do_sample=False, pad_token_id=0)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3
    adapted.records["default"].trained_steps = 15
    adapted.save(tmp_path / "a")
    with pytest.warns(ak.AdapterkitWarning, match="quantize=nf4"):
        full = ak.load(_full_model(tiny_llama_dir), tmp_path / "a")
    with torch.no_grad():
        on_full = causal_lm_loss(full(**batch).logits, batch["labels"]).item()
    assert on_full < losses[0]  # what it learnt carries over to the full-precision base


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_the_quantizing_load_equals_transformers_own(quantize, tiny_llama_dir):
    """load_model reads the checkpoint with pread (no file pages resident); the model is from_pretrained's."""
    import transformers as T

    ours, _ = load_model(str(tiny_llama_dir), "fp32", quantize)
    theirs = T.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, device_map="cpu",
                                                    quantization_config=quantization.quantization_config(quantize, torch.float32))
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert ours.config.to_dict() == theirs.config.to_dict()
    assert ours.generation_config.to_dict() == theirs.generation_config.to_dict()
    x = torch.randint(0, 100, (2, 8))
    quantization.keep_precision(theirs, torch.float32)  # the same kernel as ours (the load is compared here)
    with torch.no_grad():
        assert torch.equal(ours(x).logits, theirs(x).logits)


def test_int8_base_trains_lora(tiny_llama_dir):
    model, _ = load_model(str(tiny_llama_dir), "fp32", "int8")
    adapted = ak.adapt(model, ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    losses = train_steps(adapted, _cycle(tiny_batch()), 20, lr=1e-2)
    assert losses[-1] < losses[0] - 0.2


def test_cli_trains_on_nf4_and_merges_into_the_dequantized_base(tiny_llama_dir, tmp_path, capsys):
    """By default the merge adds B A to the nf4 weights the adapter trained on, dequantized (bitsandbytes'
    own dequantize_4bit, by hand here); --quantize none adds it to the full-precision weights."""
    import json

    from safetensors.torch import load_file

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": f"{a}+{b}", "output": str(a + b)} for a in range(5) for b in range(5)]))
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(run), "--quantize",
                 "nf4", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "4", "--learning-rate", "1e-2",
                 "--warmup-steps", "0", "--val-set-size", "0", "--template", "bare", "--precision", "fp32"]) == 0
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["base_model"]["quantize"] == "nf4"
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(run), "--output", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "nf4 base dequantized to fp32" in out and "merged checkpoint written" in out
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(run), "--output", str(tmp_path / "full"),
                 "--quantize", "none"]) == 0
    report = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert report["base"] == "nf4, dequantized to fp32"
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    adapter = load_file(run / "adapter_model.safetensors")
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj" in k and "lora_A" in k)
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj" in k and "lora_B" in k)
    update = (config.get("alpha", 16) / config.get("r", 8)) * b @ a
    nf4, _ = load_model(str(tiny_llama_dir), "fp32", "nf4")
    layer = nf4.model.layers[0].self_attn.q_proj
    dequantized = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    full = _full_model(tiny_llama_dir).model.layers[0].self_attn.q_proj.weight
    key = "model.layers.0.self_attn.q_proj.weight"
    merged_q, merged_full = (load_file(tmp_path / name / "model.safetensors")[key] for name in ("m", "full"))
    assert update.abs().max() > 1e-4  # it trained
    torch.testing.assert_close(merged_q, dequantized + update, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged_full, full + update, rtol=0, atol=1e-5)


def test_quantize_bad_input(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--quantize", "int4"]) == 2
    assert "--quantize must be one of none, int8, nf4, got 'int4'" in capsys.readouterr().err
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    assert main(["generate", "--model", str(tiny_llama_dir), "--prompt", "x", "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'adapterkit[quant]'" in err


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_gradient_checkpointing_gives_the_same_gradients(method):
    batch = tiny_batch()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        adapted = ak.adapt(tiny_model("llama"), CONFIGS[method])
        with torch.no_grad():
            for p in adapted.adapter_state_dict().values():
                p.add_(torch.randn_like(p) * 0.05)
        if checkpointing:
            adapted.gradient_checkpointing_enable()
        adapted.train()
        causal_lm_loss(adapted(**batch).logits, batch["labels"]).backward()
        record = adapted.records["default"]
        grads.append({k: p.grad.clone() for k, p in adapted._parameters_of(record).items() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all((grads[0][k] - grads[1][k]).abs().max() <= 1e-6 for k in grads[0])


class _Dense(torch.nn.Linear):
    """A linear layer of another type: bitsandbytes' conversion takes torch.nn.Linear itself only."""


def test_a_model_with_nothing_to_quantize_is_one_error_line(tmp_path, capsys):
    """Every linear layer of this model is a subclass transformers' bitsandbytes integration leaves as it is."""
    import transformers as T
    from tiny_models import tiny_config, tiny_tokenizer

    class DenseConfig(T.LlamaConfig):
        model_type = "adapterkit-test-dense"

    class DenseModel(T.LlamaForCausalLM):
        config_class = DenseConfig

        def __init__(self, config):
            super().__init__(config)
            for path, module in list(self.named_modules()):
                if type(module) is torch.nn.Linear:
                    parent, _, name = path.rpartition(".")
                    dense = _Dense(module.in_features, module.out_features, bias=module.bias is not None)
                    setattr(self.get_submodule(parent) if parent else self, name, dense)
            self.post_init()

    T.AutoConfig.register(DenseConfig.model_type, DenseConfig, exist_ok=True)
    T.AutoModelForCausalLM.register(DenseConfig, DenseModel, exist_ok=True)
    DenseModel(DenseConfig(**tiny_config("llama").to_dict())).save_pretrained(tmp_path / "dense")
    tiny_tokenizer().save_pretrained(tmp_path / "dense")
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "dense"), "--prompt", "x", "--quantize", "nf4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no linear layer bitsandbytes can quantize" in err[0], err
