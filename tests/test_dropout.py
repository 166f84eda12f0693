"""Adapter dropout on bf16/fp16 inputs (adapterkit.sites.Dropout): a cheaper mask than torch's,
checked for its statistics and its exact kept values and gradient."""

import pytest
import torch

from adapterkit.sites import Dropout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_mask_statistics(dtype):
    p, n = 0.05, 4_000_003  # not a multiple of four
    torch.manual_seed(0)
    x = torch.ones(n, dtype=dtype)
    dropped = Dropout(p).train()(x) == 0
    rate = round(p * 65536) / 65536
    sigma = (rate * (1 - rate) / n) ** 0.5
    assert abs(dropped.float().mean().item() - rate) < 5 * sigma
    # neighbours come from the same 64-bit draw: their decisions must still be independent
    pairs = dropped[:-1] & dropped[1:]
    pair_sigma = (rate * rate / n) ** 0.5
    assert abs(pairs.float().mean().item() - rate * rate) < 5 * pair_sigma
    for lane in range(4):  # each of the four 16-bit lanes drops at the same rate
        lane_rate = dropped[lane::4].float().mean().item()
        assert abs(lane_rate - rate) < 5 * sigma * 2


def test_kept_values_and_gradient_are_exact_scaled_copies():
    p = 0.3
    torch.manual_seed(1)
    x = torch.randn(64, 33).to(torch.bfloat16).requires_grad_()
    y = Dropout(p).train()(x)
    keep = y != 0
    scale = 65536 / (65536 - round(p * 65536))
    expected = (x.detach().float() * scale).to(torch.bfloat16)  # one rounding, as torch's dropout
    assert torch.equal(y[keep], expected[keep])
    assert 0.2 < 1 - keep.float().mean().item() < 0.4
    y.float().sum().backward()
    grad_expected = torch.where(keep, torch.tensor(scale).to(torch.bfloat16), torch.tensor(0.0, dtype=torch.bfloat16))
    assert torch.equal(x.grad, grad_expected)


def test_masks_follow_the_seed_and_eval_is_identity():
    x = torch.randn(1000, dtype=torch.bfloat16)
    drop = Dropout(0.5).train()
    torch.manual_seed(3)
    first, second = drop(x), drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), first)
    assert not torch.equal(first, second)
    assert drop.eval()(x) is x
