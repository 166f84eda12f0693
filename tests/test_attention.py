"""The CPU training attention (batched products) against torch's scaled_dot_product_attention."""

import pytest
import torch
from tiny_models import FAMILIES, tiny_model

from adapterkit import attention
from adapterkit.packing import block_causal_mask


def _qkv(batch=2, heads=3, q_len=12, k_len=12, dim=8, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=generator).to(dtype) for n in (q_len, k_len, k_len)]


def test_causal_without_mask_equals_sdpa_fp32():
    q, k, v = _qkv()
    ours = attention.matmul_attention(q, k, v, None, scaling=8 ** -0.5, causal=True)
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=0, atol=1e-5)


def test_queries_after_a_cache_see_every_earlier_key():
    q, k, v = _qkv(q_len=3, k_len=10)
    ours = attention.matmul_attention(q, k, v, None, scaling=8 ** -0.5, causal=True)
    mask = torch.ones(10, 10, dtype=torch.bool).tril()[-3:]
    torch.testing.assert_close(ours, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                               rtol=0, atol=1e-5)


def test_packed_mask_keeps_records_apart_and_padding_finite():
    q, k, v = _qkv()
    mask = torch.stack([block_causal_mask([5, 4], 12), block_causal_mask([12], 12)])[:, None]  # row 0 padded
    ours = attention.matmul_attention(q, k, v, mask, scaling=8 ** -0.5, causal=False)
    assert torch.isfinite(ours).all()
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours[0, :, :9], reference[0, :, :9], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], reference[1], rtol=0, atol=1e-5)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))[:, :, :9, :9]
    q9, k9, v9 = (t[:, :, :9] for t in (q, k, v))
    torch.testing.assert_close(attention.matmul_attention(q9, k9, v9, additive, 8 ** -0.5, causal=False),
                               torch.nn.functional.scaled_dot_product_attention(q9, k9, v9, attn_mask=additive),
                               rtol=0, atol=1e-5)


def test_the_path_is_taken_only_while_training_in_bf16():
    q, k, _ = _qkv(dtype=torch.bfloat16)
    assert not attention.takes_matmul_path(q, k, 0.0, {})  # no gradient wanted
    q.requires_grad_(True)
    assert attention.takes_matmul_path(q, k, 0.0, {"position_ids": None, "sliding_window": 4})
    assert not attention.takes_matmul_path(q.float(), k, 0.0, {})
    assert not attention.takes_matmul_path(q, k, 0.1, {})
    assert not attention.takes_matmul_path(q, k, 0.0, {"softcap": 50.0})
    assert not attention.takes_matmul_path(q, k, 0.0, {"s_aux": torch.zeros(3)})  # attention sinks
    with torch.no_grad():
        assert not attention.takes_matmul_path(q, k, 0.0, {})


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_trains_through_it_like_sdpa(family, monkeypatch):
    """bf16 logits and gradients with the installed attention against the same model on sdpa; the matmul
    path runs on every family that uses sdpa, except where soft-capping or sinks send it back to sdpa."""
    reference = tiny_model(family).to(torch.bfloat16)
    model = tiny_model(family).to(torch.bfloat16)
    uses_sdpa = model.config._attn_implementation == "sdpa" and model._can_set_attn_implementation()
    attention.install(model)
    assert (model.config._attn_implementation == attention.NAME) == uses_sdpa
    calls = []
    real = attention.matmul_attention
    monkeypatch.setattr(attention, "matmul_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding in row 1
    outputs = []
    for net in (reference, model):
        logits = net(input_ids=ids, attention_mask=mask).logits.float()
        logits[:, 3:].square().mean().backward()
        grads = torch.cat([p.grad.float().flatten() for p in net.parameters() if p.grad is not None])
        outputs.append((logits[:, 3:], grads))
    (ref_logits, ref_grads), (logits, grads) = outputs
    scale = ref_logits.abs().max()
    assert (logits - ref_logits).abs().max() <= 0.02 * scale
    assert (grads - ref_grads).norm() <= 0.05 * ref_grads.norm()
    softcapped = getattr(model.config, "attn_logit_softcapping", None) is not None
    sinks = any("sinks" in name for name, _ in model.named_parameters())
    assert bool(calls) == (uses_sdpa and not softcapped and not sinks)
