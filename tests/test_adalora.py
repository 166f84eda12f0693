"""AdaLoRA against PEFT's AdaLoRA (tests/peft_oracle.py): the same logits before and after training, the same
rank allocation when PEFT's update_and_allocate runs at the same points as the loop's hook, PEFT folders both
ways; the budget reached by hand-computed schedule; the orthogonal regulariser by hand; what it refuses."""

import math

import peft
import pytest
import torch
from peft_oracle import (
    assert_export_loads_in_peft,
    assert_matches_peft,
    assert_peft_folder_loads,
    copy_from_peft,
    logits,
    randomize,
)
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.methods.adalora import AdaloraConfig
from adapterkit.training import causal_lm_loss, train_steps

NAMES = {n: n for n in ("lora_A", "lora_B", "lora_E")}
TARGETS = ["q_proj", "v_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=2, tinit=1, tfinal=2, deltaT=1)


def _cycle(batch):
    while True:
        yield batch


def _peft(family: str = "llama", targets=TARGETS, **options):
    config = peft.AdaLoraConfig(target_modules=targets, task_type="CAUSAL_LM", **options)  # (the regulariser
    # is added by PEFT's causal-LM wrapper only)
    return peft.get_peft_model(tiny_model(family), config).eval()


def _pattern_of_peft(peft_model) -> dict:
    """PEFT's rank pattern keyed by module path (its keys: <path>.lora_E.default while training)."""
    pattern = peft_model.peft_config["default"].rank_pattern or {}
    return {key.removesuffix(".default").removesuffix(".lora_E"): value for key, value in pattern.items()}


def _trained_pair(steps: int = 10, lr: float = 2e-2):
    """PEFT's AdaLoRA and ours from the same starting weights (Lambda made non-zero, so every weight gets a
    loss gradient), trained `steps` AdamW steps with the same linear decay: ours by the training loop (its
    hooks: orthogonal regulariser, rank allocator), PEFT's by hand, update_and_allocate(step) after each
    optimizer step. Returns both, our and PEFT's losses, and the rank patterns after each step."""
    peft_model = _peft(targets="all-linear", total_step=steps, lora_alpha=6, orth_reg_weight=0.5, **SCHEDULE)
    randomize(peft_model, {"lora_E": "lora_E"}, scale=0.5)
    adapted = ak.adapt(tiny_model("llama"), AdaloraConfig(target_modules="all-linear", alpha=6, **SCHEDULE))
    copy_from_peft(peft_model, adapted, NAMES)
    batch = tiny_batch()
    ours_patterns = []
    ours = train_steps(adapted, _cycle(batch), steps, lr=lr, max_grad_norm=1e9,
                       on_step=lambda step, loss: ours_patterns.append(
                           dict(adapted.records["default"].config.rank_pattern)))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (steps - step) / steps)
    theirs, theirs_patterns = [], []
    for step in range(steps):
        peft_model.train()
        loss = peft_model(**batch).loss  # PEFT adds its orthogonal regulariser to the labelled loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
        theirs.append(loss.item())
        theirs_patterns.append(_pattern_of_peft(peft_model))
    peft_model.eval()
    return peft_model, adapted, ours, theirs, ours_patterns, theirs_patterns


def test_adalora_matches_peft_forward_training_and_merge():
    """orth_reg_weight 0: PEFT's loss is the plain one, as `model(**batch).loss` is ours."""
    peft_model = _peft(init_r=4, target_r=2, total_step=10, lora_alpha=6, orth_reg_weight=0.0)
    adapted = ak.adapt(tiny_model("llama"), AdaloraConfig(init_r=4, target_r=2, alpha=6, orth_reg_weight=0.0,
                                                          target_modules=TARGETS))
    adapted.load_adapter_state_dict(randomize(peft_model, NAMES, scale=0.3))
    assert_matches_peft(peft_model, adapted)


def test_adalora_starts_as_peft_does():
    """Lambda zero (the update starts at 0), P and Q ~ N(0, 0.02); scale alpha / (init_r + 1e-5)."""
    adapted = ak.adapt(tiny_model("llama"), AdaloraConfig(init_r=6, target_r=2, alpha=3, target_modules=["down_proj"]))
    batch = tiny_batch()
    assert torch.equal(logits(adapted, batch), logits(tiny_model("llama"), batch))
    part = adapted.records["default"].parts["model.layers.0.mlp.down_proj"]
    assert part.lora_A.shape == (6, 64) and part.lora_B.shape == (32, 6) and part.lora_E.shape == (6, 1)
    assert not part.lora_E.any()
    both = torch.cat([part.lora_A.flatten(), part.lora_B.flatten()])
    assert 0.015 < both.std().item() < 0.025 and abs(both.mean().item()) < 0.005
    assert part.scaling == 3 / (6 + 1e-5)


def test_adalora_training_and_rank_allocation_match_peft(tmp_path):
    peft_model, adapted, ours, theirs, ours_patterns, theirs_patterns = _trained_pair()
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(ours, theirs, strict=True)), (ours, theirs)
    assert ours_patterns == theirs_patterns
    final = ours_patterns[-1]
    assert sum(map(sum, final.values())) == 2 * len(final) and len({sum(v) for v in final.values()}) > 1
    assert min(map(sum, final.values())) == 0  # layers left with no triplet: empty tensors in the PEFT folders
    batch = tiny_batch()
    assert (logits(adapted, batch) - logits(peft_model, batch)).abs().max() <= 1e-4
    assert adapted.records["default"].config.total_step == 10  # from the run's length
    # PEFT's saved folder (only the kept triplets) reads back with the same logits and pattern, and ours
    # exported loads in PEFT with the same logits.
    loaded = assert_peft_folder_loads(peft_model, "llama", tmp_path / "theirs")
    assert loaded.records["default"].config.rank_pattern == final
    config = assert_export_loads_in_peft(adapted, "llama", tmp_path / "ours")
    assert config.peft_type == peft.PeftType.ADALORA and config.init_r == 6 and config.total_step == 10
    assert {k.removesuffix(".lora_E"): v for k, v in config.rank_pattern.items()} == final


def test_adalora_reaches_the_target_budget_on_schedule(tmp_path):
    """init_r 6 -> target_r 2 over 12 steps on all 14 linear layers: after each allocation the triplets left
    are the cubic schedule's budget, computed here by hand; at the end exactly 2 per layer on average, the
    dropped triplets have Lambda = 0, and a reloaded adapter carries the pattern and gives the same logits."""
    steps, tinit, tfinal, layers = 12, 2, 3, 14
    adapted = ak.adapt(tiny_model("llama"), AdaloraConfig(init_r=6, target_r=2, tinit=tinit, tfinal=tfinal,
                                                          target_modules="all-linear"))
    config = adapted.records["default"].config
    kept = []
    train_steps(adapted, _cycle(tiny_batch()), steps, lr=1e-2,
                on_step=lambda step, loss: kept.append(sum(map(sum, config.rank_pattern.values()))))
    for step, total in enumerate(kept):
        if step <= tinit:
            assert total == 0  # no allocation yet: no pattern
        elif step <= steps - tfinal:
            left = 1 - (step - tinit) / (steps - tfinal - tinit)
            assert total == int(4 * layers * left ** 3 + 2 * layers), (step, kept)
        else:
            assert total == 2 * layers
    assert len(config.rank_pattern) == layers
    parts = adapted.records["default"].parts
    for path, keep in config.rank_pattern.items():
        assert torch.equal(parts[path].lora_E.view(-1) != 0, torch.tensor(keep))
    pattern, config.rank_pattern = config.rank_pattern, {}  # as a run resumed in the final phase starts
    adapted.after_optimizer_step(steps - 1)
    assert config.rank_pattern == pattern  # read back from the zeroed Lambdas
    adapted.save(tmp_path)
    reloaded = ak.load(tiny_model("llama"), tmp_path)
    assert reloaded.records["default"].config.rank_pattern == config.rank_pattern
    batch = tiny_batch()
    assert torch.equal(logits(reloaded, batch), logits(adapted, batch))


def test_orthogonal_regulariser_by_hand():
    """One adapted layer, Q = diag(1, 2) padded (Q Q^T - I = diag(0, 3): norm 3) and P with orthonormal columns
    (norm 0): the regulariser is w (3 + 0) / 2, and the loop's first loss is the base loss plus it."""
    adapted = ak.adapt(tiny_model("llama"), AdaloraConfig(init_r=2, target_r=1, orth_reg_weight=0.4, layers=[0],
                                                          target_modules=["q_proj"]))
    part = next(iter(adapted.records["default"].parts.values()))
    with torch.no_grad():
        part.lora_A.zero_()
        part.lora_A[0, 0], part.lora_A[1, 1] = 1.0, 2.0
        part.lora_B.zero_()
        part.lora_B[3, 0], part.lora_B[5, 1] = 1.0, -1.0
    assert math.isclose(adapted.extra_loss().item(), 0.4 * 1.5, rel_tol=1e-6)
    batch = tiny_batch()
    with torch.no_grad():
        base = causal_lm_loss(tiny_model("llama")(**batch).logits, batch["labels"]).item()
    first = train_steps(adapted, _cycle(batch), 2, lr=1e-3)[0]
    assert math.isclose(first, base + 0.6, rel_tol=1e-5)
    for p in adapted.parameters():  # an adapter not being trained gets no regulariser
        p.requires_grad_(False)
    assert adapted.extra_loss() is None


@pytest.mark.parametrize("family", ["gpt2"])
def test_adalora_on_conv1d_merges_and_exports(family, tmp_path):
    """PEFT's AdaLoRA takes GPT-2's Conv1D (fan_in_fan_out): the update is the same, the merge transposes it."""
    adapted = ak.adapt(tiny_model(family), AdaloraConfig(init_r=4, target_r=2, target_modules="all-linear"))
    train_steps(adapted, _cycle(tiny_batch()), 6, lr=2e-2)
    batch = tiny_batch()
    trained = logits(adapted, batch)
    adapted.merge()
    assert (logits(adapted, batch) - trained).abs().max() <= 1e-4
    adapted.unmerge()
    assert_export_loads_in_peft(adapted, family, tmp_path)


def test_mixed_batch_rows_equal_their_own_adapters():
    adapted = ak.adapt(tiny_model("llama"), AdaloraConfig(init_r=3, target_r=2, target_modules=TARGETS), name="a")
    adapted.add_adapter(AdaloraConfig(init_r=3, target_r=2, target_modules=TARGETS), "b")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    batch = tiny_batch()
    mixed = adapted(**batch, adapter_names=["a", "b"]).logits
    for row, name in enumerate(["a", "b"]):
        adapted.set_active(name)
        assert (adapted(**batch).logits[row] - mixed[row]).abs().max() <= 1e-5


def test_adalora_refuses_bad_options():
    with pytest.raises(ak.AdapterkitError, match=r"adalora target_r \(8\) is above init_r \(4\)"):
        AdaloraConfig(init_r=4, target_r=8)
    with pytest.raises(ak.AdapterkitError, match=r"tinit \(3\) \+ tfinal \(2\) must be below total_step \(5\)"):
        AdaloraConfig(tinit=3, tfinal=2, total_step=5)
    with pytest.raises(ak.AdapterkitError, match="unknown keys"):
        AdaloraConfig.from_dict({"init_rank": 4})
    with pytest.raises(ak.AdapterkitError, match="rank_pattern must map module paths to 12"):
        AdaloraConfig(rank_pattern={"q_proj": [True]})
    # The run's length decides when total_step is unset: refused before the first step changes anything.
    adapted = ak.adapt(tiny_model("llama"), AdaloraConfig(tinit=2, tfinal=1, target_modules=TARGETS))
    before = {k: t.clone() for k, t in adapted.adapter_state_dict().items()}
    with pytest.raises(ak.AdapterkitError, match=r"total_step \(3\), which leaves no steps"):
        train_steps(adapted, _cycle(tiny_batch()), 3)
    assert all(torch.equal(t, before[k]) for k, t in adapted.adapter_state_dict().items())
