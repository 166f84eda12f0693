"""PEFT as the oracle of a weight-changing method (LoHa, LoKr, VeRA, OFT): the same starting weights give
the same logits, before and after a few optimizer steps; adapterkit's PEFT export loads in PEFT, and
PEFT's saved folder loads in adapterkit, with the same logits. Keys are mapped here from PEFT's parameter
names (`<module path>.<name>.default[.weight]`), not from adapterkit's format table."""

from __future__ import annotations

import peft
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def our_key(peft_name: str, names: dict[str, str]) -> str | None:
    """adapterkit's key of a PEFT parameter (names: PEFT's parameter name -> adapterkit's), or None."""
    path = peft_name.removeprefix("base_model.model.")
    for theirs, ours in names.items():
        marker = f".{theirs}.default"
        if marker in path:
            module, _, rest = path.partition(marker)
            return f"{module}.{ours}"
    return None


def randomize(peft_model, names: dict[str, str], scale: float, seed: int = 5) -> dict[str, torch.Tensor]:
    """Give PEFT's adapter parameters random values (so the update is not zero); the same values keyed
    as adapterkit keys them."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            key = our_key(name, names)
            if key is not None:
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
                state[key] = p.detach().clone()
    return state


def copy_from_peft(peft_model, adapted, names: dict[str, str]) -> None:
    state = {our_key(n, names): p.detach().clone() for n, p in peft_model.named_parameters()
             if our_key(n, names) is not None}
    assert sorted(state) == sorted(adapted.adapter_state_dict())
    adapted.load_adapter_state_dict(state)


def assert_same_training(peft_model, adapted, steps: int = 3, lr: float = 1e-2, tolerance: float = 1e-4) -> None:
    """Adam steps on one batch in both, in training mode; the logits stay equal after each."""
    batch = tiny_batch()
    models = (peft_model, adapted)
    optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr) for m in models]
    for step in range(steps):
        for model, optimizer in zip(models, optimizers, strict=True):
            torch.manual_seed(step)  # the base model's own dropout (some families have it): the same masks
            model.train()
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
            model.eval()
        assert (logits(peft_model, batch) - logits(adapted, batch)).abs().max() <= tolerance


def assert_matches_peft(peft_model, adapted, family: str = "llama") -> None:
    """Both holding the same weights: they change the base model's logits, ours equal PEFT's (1e-5) and
    still do after a few Adam steps; merged equals unmerged, and PEFT's merge_and_unload equals ours."""
    batch = tiny_batch()
    assert (logits(peft_model, batch) - logits(tiny_model(family), batch)).abs().max() > 1e-2
    assert (logits(adapted, batch) - logits(peft_model, batch)).abs().max() <= 1e-5
    assert_same_training(peft_model, adapted)
    assert_merges_like_unmerged(adapted)
    merged = peft_model.merge_and_unload()
    assert (logits(merged, batch) - logits(adapted, batch)).abs().max() <= 1e-4


def assert_merges_like_unmerged(adapted, tolerance: float = 1e-4) -> None:
    batch = tiny_batch()
    unmerged = logits(adapted, batch)
    adapted.merge()
    assert (logits(adapted, batch) - unmerged).abs().max() <= tolerance
    adapted.unmerge()
    assert (logits(adapted, batch) - unmerged).abs().max() <= tolerance


def assert_export_loads_in_peft(adapted, family: str, folder) -> dict:
    """adapterkit's PEFT export, loaded by peft.PeftModel.from_pretrained: the same logits. Returns its config."""
    batch = tiny_batch()
    ak.save(adapted, folder, format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_model(family), folder).eval()
    assert (logits(loaded, batch) - logits(adapted, batch)).abs().max() <= 1e-5
    return loaded.peft_config["default"]


def assert_peft_folder_loads(peft_model, family: str, folder) -> ak.AdaptedModel:
    """PEFT's save_pretrained folder, loaded by adapterkit: the same logits. Returns the adapted model."""
    batch = tiny_batch()
    peft_model.save_pretrained(folder)
    adapted = ak.load(tiny_model(family), folder)
    assert (logits(adapted, batch) - logits(peft_model, batch)).abs().max() <= 1e-5
    return adapted
