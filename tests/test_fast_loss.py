"""The training loss computes logits only at labelled positions; it must equal the full computation."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.architectures import ModelLayout
from adapterkit.methods.prompt import PrefixTuningConfig, PromptTuningConfig
from adapterkit.training import causal_lm_loss, labelled_loss
from adapterkit.training.loss import FusedHeadCrossEntropy

CONFIGS = {"lora": lambda: ak.LoraConfig(r=4, init="gaussian"),
           "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=3),
           "prefix-tuning": lambda: PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=8)}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_labelled_loss_equals_full_loss(family, method, monkeypatch):
    batch = tiny_batch(batch=3)
    batch["labels"][0, :4] = -100  # a masked prompt
    batch["labels"][1, :7] = -100
    batch["attention_mask"][2, -3:] = 0  # right padding
    batch["labels"][2, -3:] = -100
    results, fused = [], []
    monkeypatch.setattr(FusedHeadCrossEntropy, "forward", _spy(FusedHeadCrossEntropy.forward, fused))
    for loss_fn in (lambda m: causal_lm_loss(m(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits, batch["labels"]),
                    lambda m: labelled_loss(m, batch)):
        torch.manual_seed(0)
        adapted = ak.adapt(tiny_model(family), CONFIGS[method]())
        loss = loss_fn(adapted)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in adapted.parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1].abs().max() > 0
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert bool(fused) == ModelLayout(tiny_model(family)).plain_head  # the fused head ran where it may


def _spy(function, calls: list):
    def spied(*args, **kwargs):
        calls.append(1)
        return function(*args, **kwargs)
    return staticmethod(spied)


@pytest.mark.parametrize("family", FAMILIES)
def test_architecture_table_says_which_heads_are_plain(family):
    """The table's `logit_transforms` against transformers' own forward: logits equal the head applied to the
    decoder's last hidden state exactly where the table says so. The head is scaled up so soft-capping
    (tanh(x / cap) x cap), which is close to the identity on small logits, shows."""
    model = tiny_model(family)
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(300.0)
        batch = tiny_batch()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        raw = head(hidden)
        plain = torch.allclose(raw, logits, rtol=1e-4, atol=1e-4 * raw.abs().max().item())
    assert raw.abs().max() > 50
    assert plain == ModelLayout(model).plain_head


def test_fused_head_loss_matches_fp64_oracle():
    """Head + cross-entropy fused, over several blocks, against the plain fp64 computation: loss and the
    rows' gradient, with an upstream gradient other than 1 and a bias."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000)
    rows = torch.randn(300, 16).requires_grad_()
    targets = torch.randint(0, 1000, (300,))
    exact = rows.detach().double().requires_grad_()
    reference = torch.nn.functional.cross_entropy(torch.nn.functional.linear(
        exact, head.weight.double(), head.bias.double()), targets)
    (reference * 3.0).backward()
    loss = FusedHeadCrossEntropy.apply(rows, head.weight.detach(), head.bias.detach(), targets)
    (loss * 3.0).backward()
    assert abs(loss.item() - reference.item()) < 1e-5 * reference.item()
    assert torch.allclose(rows.grad.double(), exact.grad, rtol=1e-4, atol=1e-7)
    assert exact.grad.abs().max() > 1e-4


def test_bf16_fused_head_matches_logits_then_loss():
    """Under bf16 autocast (train's default on this CPU) the fused path and the logits-then-loss path
    give the same loss and LoRA gradients, up to bf16 rounding."""
    batch = tiny_batch(batch=3, length=24)
    batch["labels"][0, :6] = -100
    results = []
    for fuse in (False, True):
        torch.manual_seed(0)
        adapted = ak.adapt(tiny_model("llama").to(torch.bfloat16), ak.LoraConfig(r=4, init="gaussian"))
        adapted.train()
        if not fuse:
            adapted.causal_lm.get_output_embeddings().register_forward_hook(lambda *args: None)  # opts out
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = labelled_loss(adapted, batch)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in adapted.parameters() if p.requires_grad])
        results.append((loss.item(), grads))
    (loss_plain, grads_plain), (loss_fused, grads_fused) = results
    assert abs(loss_plain - loss_fused) < 1e-3 * loss_plain
    assert (grads_plain - grads_fused).norm() < 0.02 * grads_plain.norm()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [5, 300])  # one block and several (blocks of 128 rows)
def test_low_precision_cross_entropy_matches_fp64(dtype, rows):
    from adapterkit.training import LowPrecisionCrossEntropy

    torch.manual_seed(0)
    logits = (torch.randn(rows, 1000) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (rows,))
    exact = logits.detach().double().requires_grad_()
    reference = torch.nn.functional.cross_entropy(exact, targets)
    reference.backward(torch.tensor(2.0, dtype=torch.float64))  # an upstream gradient other than 1
    loss = LowPrecisionCrossEntropy.apply(logits, targets)
    (loss * 2.0).backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert abs(loss.item() - reference.item()) < 1e-5 * reference.item()
    # the gradient differs from the fp64 one only by its rounding to the logits' dtype (subnormals too)
    info = torch.finfo(dtype)
    tolerance = info.eps * exact.grad.abs() + info.eps * info.smallest_normal
    assert torch.all((logits.grad.double() - exact.grad).abs() <= tolerance)
    assert exact.grad.abs().max() > 0


def test_bf16_labelled_loss_uses_fp32_arithmetic():
    """The fused loss on a bf16 model equals cross_entropy of the same logits cast to fp32."""
    torch.manual_seed(0)
    adapted = ak.adapt(tiny_model("llama").to(torch.bfloat16), ak.LoraConfig(r=4, init="gaussian"))
    batch = tiny_batch(batch=3)
    batch["labels"][0, :4] = -100
    logits = adapted(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = causal_lm_loss(logits.float(), batch["labels"])
    assert torch.allclose(labelled_loss(adapted, batch).float(), expected, atol=1e-5)
