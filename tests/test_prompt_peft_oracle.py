"""adapterkit's prompt methods checked against Hugging Face PEFT as an independent oracle.

For prompt tuning, P-Tuning (MLP and LSTM encoders) and prefix tuning (with and without the
reparameterisation MLP), two identical tiny base models are built; one gets the PEFT method with
its random initial weights, the other the adapterkit method loaded with those same weights. The
logits at the real input positions must agree (PEFT's prompt-tuning/P-Tuning logits start with the k
virtual positions, adapterkit's do not), with and without explicit position ids, and must differ
clearly from the plain base model's logits. LLaMA has grouped key/value heads (4 heads, 2 kv heads),
so the prefix (and the projection's input embedding) is sized by kv_heads * head_dim, as PEFT's;
GPT-2 has learned absolute positions.
"""

import peft
import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig

K, ENC = 4, 16
FAMILIES = ["llama", "gpt2"]
# method: (PEFT config, adapterkit config, whether PEFT's logits include the k virtual positions)
METHODS = {
    "prompt-tuning": (lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K),
                      lambda: PromptTuningConfig(num_virtual_tokens=K), True),
    "p-tuning-mlp": (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=K,
                                                      encoder_hidden_size=ENC,
                                                      encoder_reparameterization_type="MLP"),
                     lambda: PTuningConfig(num_virtual_tokens=K, encoder_type="mlp", encoder_hidden_size=ENC), True),
    "p-tuning-lstm": (lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=K,
                                                       encoder_hidden_size=ENC,
                                                       encoder_reparameterization_type="LSTM"),
                      lambda: PTuningConfig(num_virtual_tokens=K, encoder_type="lstm", encoder_hidden_size=ENC),
                      True),
    "prefix-projection": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K,
                                                          prefix_projection=True, encoder_hidden_size=ENC),
                          lambda: PrefixTuningConfig(num_virtual_tokens=K, prefix_projection=True,
                                                     encoder_hidden_size=ENC), False),
    "prefix-direct": (lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=K,
                                                      prefix_projection=False),
                      lambda: PrefixTuningConfig(num_virtual_tokens=K, prefix_projection=False), False),
}
RENAME = {"mlp_head": "mlp", "lstm_head": "lstm", "transform": "projection"}


def _logits(model, batch, positions):
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if positions:
        kwargs["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        return model(**kwargs).logits


def _peft_tensors(peft_model):
    """PEFT's prompt-encoder weights under adapterkit's names (prompt_encoder.default.X -> prompt.X)."""
    tensors = {}
    for key, param in peft_model.named_parameters():
        if key.startswith("prompt_encoder.default."):
            name = key.removeprefix("prompt_encoder.default.")
            head, _, rest = name.partition(".")
            tensors[f"prompt.{RENAME.get(head, head)}.{rest}"] = param.detach().clone()
    return tensors


def _build_pair(family, method):
    """(peft_model, adapted) on identical bases, adapterkit loaded with PEFT's random prompt weights."""
    peft_config, ak_config, _ = METHODS[method]
    peft_model = peft.get_peft_model(tiny_model(family, seed=0), peft_config()).eval()
    tensors = _peft_tensors(peft_model)
    adapted = ak.adapt(tiny_model(family, seed=0), ak_config())
    adapted.eval()
    own = adapted.adapter_state_dict()
    assert sorted(own) == sorted(tensors)
    assert {k: v.shape for k, v in own.items()} == {k: v.shape for k, v in tensors.items()}
    adapted.load_adapter_state_dict(tensors)
    return peft_model, adapted


@pytest.mark.parametrize("positions", [False, True], ids=["implicit-positions", "explicit-positions"])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_method_matches_peft(family, method, positions):
    batch = tiny_batch(seed=1, batch=2, length=10)
    n = batch["input_ids"].shape[1]
    peft_model, adapted = _build_pair(family, method)
    expected = _logits(peft_model, batch, positions)
    assert expected.shape[1] == (K + n if METHODS[method][2] else n)
    expected = expected[:, expected.shape[1] - n:]
    got = _logits(adapted, batch, positions)
    base = _logits(tiny_model(family, seed=0), batch, False)
    assert got.shape == base.shape
    assert (expected - base).abs().max().item() > 1e-4, "the PEFT prompt barely moves the logits"
    assert (got - base).abs().max().item() > 1e-4, "the adapterkit prompt barely moves the logits"
    assert (got - expected).abs().max().item() <= 1e-5


def test_llama_prefix_is_sized_by_key_value_heads():
    """PEFT and adapterkit both size the GQA prefix as layers * 2 * kv_heads * head_dim = 2 * 2 * 2 * 8."""
    peft_model, adapted = _build_pair("llama", "prefix-direct")
    assert peft_model.peft_config["default"].token_dim == 16
    assert adapted.adapter_state_dict()["prompt.embedding.weight"].shape == (K, 64)
    assert adapted.input_hooks["default"].final().shape == (2, 2, 2, K, 8)
