"""The scheduler's prefill hands the output head a contiguous input (transformers' logits_to_keep=1 slice is a
strided view, which torch multiplies row by row reading the whole head weight each time); the logits stay
those of the model without the hook, and the hook leaves with the prefill."""

from __future__ import annotations

import torch
from tiny_models import tiny_model

from adapterkit.serving.scheduler import _contiguous_head_input


@torch.no_grad()
def test_prefill_head_input_is_contiguous_and_logits_unchanged():
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(0))
    seen = []
    probe = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0]))
    plain = model(input_ids=ids, logits_to_keep=1).logits
    with _contiguous_head_input(model):
        hooked = model(input_ids=ids, logits_to_keep=1).logits
    after = model(input_ids=ids, logits_to_keep=1).logits
    probe.remove()
    assert [t.is_contiguous() for t in seen] == [False, True, False]  # only inside the block
    torch.testing.assert_close(hooked, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(after, plain)
    lone = torch.cat([model(input_ids=ids[i:i + 1], logits_to_keep=1).logits for i in range(3)])
    torch.testing.assert_close(hooked, lone, rtol=1e-5, atol=1e-6)
