"""Prompt Tuning, P-Tuning, Prefix Tuning and P-Tuning v2: initialisation, counts, checkpointing, errors.

The scenario on every family (training, cached generation, save/load, resuming) is in test_families.py."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import FAMILIES, tiny_batch, tiny_model, tiny_tokenizer

import adapterkit as ak
from adapterkit.architectures import ModelLayout
from adapterkit.methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
from adapterkit.training import train_steps

K = 4
CONFIGS = {
    "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=K),
    "p-tuning": lambda: PTuningConfig(num_virtual_tokens=K, encoder_hidden_size=16),
    "prefix-tuning": lambda: PrefixTuningConfig(num_virtual_tokens=K, encoder_hidden_size=16),
    "p-tuning-v2": lambda: PTuningV2Config(num_virtual_tokens=K),
}


def _cycle(batch):
    while True:
        yield batch


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_gradient_checkpointing_gives_the_same_gradients(method):
    batch = tiny_batch()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        adapted = ak.adapt(tiny_model("llama"), CONFIGS[method]())
        if checkpointing:
            adapted.gradient_checkpointing_enable()
        adapted.train()
        adapted(**batch).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapted.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_prompt_past_learned_positions_is_a_clear_error(family):
    adapted = ak.adapt(tiny_model(family), PromptTuningConfig(num_virtual_tokens=8))
    ids = torch.randint(3, 100, (1, 60))
    with pytest.raises(ak.AdapterkitError, match="8 virtual tokens \\+ 60 input tokens run past the model's 64"):
        adapted(input_ids=ids)


@torch.no_grad()
def test_batched_generation_equals_one_row_at_a_time():
    adapted = ak.adapt(tiny_model("llama"), PrefixTuningConfig(num_virtual_tokens=K, encoder_hidden_size=16))
    adapted.eval()
    short, long = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9, 10, 11, 12]])
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    both = adapted.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
    alone = [adapted.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
             for x in (short, long)]
    assert both[0, 5:].tolist() == alone[0][0, 3:].tolist()
    assert both[1, 5:].tolist() == alone[1][0, 5:].tolist()


def test_prompt_init_from_text_and_vocabulary():
    model = tiny_model("llama")
    tokenizer = tiny_tokenizer()
    adapted = ak.adapt(model, PromptTuningConfig(num_virtual_tokens=5, prompt_init="text", init_text="ab"),
                       tokenizer=tokenizer)
    ids = tokenizer("ababa", add_special_tokens=False)["input_ids"]  # repeated to length k
    expected = model.get_input_embeddings().weight[ids]
    assert torch.equal(adapted.input_hooks["default"].final(), expected)
    vocab = ak.adapt(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=3, prompt_init="vocab"))
    rows = vocab.input_hooks["default"].final()
    table = vocab.base_model.get_input_embeddings().weight
    assert all((table == row).all(-1).any() for row in rows)
    with pytest.raises(ak.AdapterkitError, match="needs the tokenizer"):
        ak.adapt(tiny_model("llama"), PromptTuningConfig(prompt_init="text", init_text="hi"))


def test_parameter_counts_and_layer_subset():
    shape = ModelLayout(tiny_model("llama")).shape
    prompt = ak.adapt(tiny_model("llama"), PromptTuningConfig(num_virtual_tokens=K))
    assert prompt.trainable_parameters()[0] == K * 32
    deep = ak.adapt(tiny_model("llama"), PTuningV2Config(num_virtual_tokens=K))
    assert deep.trainable_parameters()[0] == K * shape.layers * 2 * shape.kv_heads * shape.head_dim
    subset = ak.adapt(tiny_model("llama"), PTuningV2Config(num_virtual_tokens=K, layers=[1]))
    assert subset.trainable_parameters()[0] == K * 2 * shape.kv_heads * shape.head_dim
    prefixes = subset.input_hooks["default"].final()
    assert prefixes.shape == (2, 2, shape.kv_heads, K, shape.head_dim)
    assert torch.equal(prefixes[0], torch.zeros_like(prefixes[0])) and prefixes[1].abs().sum() > 0


def test_inconsistent_saved_prompt_is_refused(tmp_path):
    adapted = ak.adapt(tiny_model("llama"), PTuningConfig(num_virtual_tokens=K))
    adapted.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["prompt.final"] = tensors["prompt.final"] + 0.1
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ak.AdapterkitError, match="prompt.final recomputed"):
        ak.load(tiny_model("llama"), tmp_path)


def test_lstm_encoder_trains():
    batch = tiny_batch()
    adapted = ak.adapt(tiny_model("qwen2"), PTuningConfig(num_virtual_tokens=K, encoder_type="lstm",
                                                           encoder_hidden_size=8))
    losses = train_steps(adapted, _cycle(batch), 20, lr=3e-2)
    assert losses[-1] < losses[0] - 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_p_tuning_v2_text_init_equals_reading_the_text_first(family):
    """Prefixes initialised from the model's own keys/values of a text: the adapted model then gives
    exactly the base model's logits for that text followed by the input (plain concatenation)."""
    tokenizer = tiny_tokenizer()
    text = "Hi!"  # 3 characters, repeated to K = 4 tokens: "Hi!H"
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    text_ids = torch.tensor((text_ids * K)[:K])
    batch = tiny_batch(seed=5, batch=2, length=6)
    base = tiny_model(family)
    with torch.no_grad():
        joined = torch.cat([text_ids.expand(2, -1), batch["input_ids"]], dim=1)
        expected = base(input_ids=joined).logits[:, K:]
        plain = base(input_ids=batch["input_ids"]).logits
    adapted = ak.adapt(base, PTuningV2Config(num_virtual_tokens=K, prefix_init="text", init_text=text),
                       tokenizer=tokenizer)
    with torch.no_grad():
        got = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (expected - plain).abs().max() > 1e-3, "the text barely changes the logits"
    assert torch.allclose(got, expected, atol=1e-4)


def test_prefix_init_options_and_errors():
    assert PTuningV2Config(num_virtual_tokens=K).initial_prefixes() == "vocab"
    assert PTuningV2Config(num_virtual_tokens=K, prefix_projection=True).initial_prefixes() == "random"
    assert PrefixTuningConfig(num_virtual_tokens=K).initial_prefixes() == "random"  # PEFT's start: the MLP's
    torch.manual_seed(0)
    random = ak.adapt(tiny_model("llama"), PTuningV2Config(num_virtual_tokens=K, prefix_init="random"))
    assert abs(random.input_hooks["default"].final().std().item() - 1.0) < 0.1
    for bad in (dict(prefix_init="words"), dict(prefix_init="text"), dict(init_text="x"),
                dict(prefix_projection=True, prefix_init="vocab")):
        with pytest.raises(ak.AdapterkitError):
            PTuningV2Config(num_virtual_tokens=K, **bad)


@pytest.mark.parametrize("config", [
    PromptTuningConfig(num_virtual_tokens=K, prompt_init="text", init_text="Hi!"),
    PTuningV2Config(num_virtual_tokens=K, prefix_init="text", init_text="Hi!")], ids=lambda c: c.method)
def test_text_initialised_adapter_loads_without_a_tokenizer(config, tmp_path):
    """The starting values are replaced by the saved weights, so loading needs no tokenizer."""
    batch = tiny_batch(seed=6, batch=2, length=6)
    adapted = ak.adapt(tiny_model("llama"), config, tokenizer=tiny_tokenizer())
    train_steps(adapted, _cycle(batch), 2, lr=1e-2)
    adapted.eval()
    adapted.save(tmp_path)
    reloaded = ak.load(tiny_model("llama"), tmp_path)  # no tokenizer given
    assert reloaded.records["default"].config == config  # the record keeps how the adapter started
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, adapted(**batch).logits)
