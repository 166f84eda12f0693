"""LoRA's base-changing starts (pissa, pissa_niter_N, olora, loftq) against PEFT 0.21.2 as the oracle.

PiSSA and OLoRA: PEFT's get_peft_model with the same init_lora_weights on an identical tiny base must give
the same A, B and residual base weight (the randomised SVD seeded alike in both), the same logits at step 0
(the base model's) and after Adam steps; merged equals unmerged; the converted PEFT export loads in PEFT on
the ORIGINAL base with our logits; the native folder reloads onto a fresh original base with equal logits.
LoftQ: PEFT's loftq_init runs on CUDA only (its compute device is hard-coded), so on the CPU it is checked
against PEFT's own pieces (its _low_rank_decomposition, bitsandbytes' Params4bit as PEFT calls it).
"""

import importlib.util
import json

import peft
import peft.tuners.lora.layer as peft_lora_layer
import pytest
import torch
from peft.utils.loftq_utils import _low_rank_decomposition
from peft_oracle import assert_merges_like_unmerged, assert_same_training, logits
from safetensors.torch import load_file
from tiny_models import tiny_batch, tiny_model
from transformers import AutoModelForCausalLM

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.io import hotswap
from adapterkit.io.gguf import lora_tensors
from adapterkit.methods.lora_init import changed_base, starting_values

R, ALPHA = 4, 8
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@pytest.fixture
def seeded_peft_svd(monkeypatch):
    """PEFT's randomised SVD drawing what ours draws (torch.svd_lowrank after manual_seed(0))."""
    real = torch.svd_lowrank

    def seeded(*args, **kwargs):
        torch.manual_seed(0)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_lora_layer, "svd_lowrank", seeded)


def _pair(family: str, init: str, **extra):
    peft_model = peft.get_peft_model(tiny_model(family), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=TARGETS[family], init_lora_weights=init,
        fan_in_fan_out=family == "gpt2", **extra)).eval()
    adapted = ak.adapt(tiny_model(family), ak.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS[family],
                                                         init=init, use_rslora=extra.get("use_rslora", False),
                                                         rank_pattern=extra.get("rank_pattern", {})))
    return peft_model, adapted.eval()


def _peft_state(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's A, B and base weights keyed as adapterkit keys them (base weights as path.base)."""
    state = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, peft_lora_layer.LoraLayer):
            state[f"{name}.lora_A"] = module.lora_A["default"].weight.detach()
            state[f"{name}.lora_B"] = module.lora_B["default"].weight.detach()
            state[f"{name}.base"] = module.get_base_layer().weight.detach()
    return state


def _our_state(adapted) -> dict[str, torch.Tensor]:
    state = dict(adapted.adapter_state_dict())
    for path, site in adapted.sites():
        state[f"{path}.base"] = site.base_layer.weight.detach()
    return state


def _weights(model) -> dict[str, torch.Tensor]:
    """The base model's weights by their own names (adapter sites wrap a layer as .base_layer)."""
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()
            if not any(part in k for part in (".effects.", "lora_"))}


def _assert_same_start(peft_model, adapted, tolerance: float) -> None:
    theirs, ours = _peft_state(peft_model), _our_state(adapted)
    assert sorted(theirs) == sorted(ours)
    for key, value in theirs.items():
        assert (ours[key] - value).abs().max() <= tolerance, key


@pytest.mark.parametrize(("family", "init"), [("llama", "pissa"), ("llama", "pissa_niter_4"), ("llama", "olora"),
                                              ("gpt2", "pissa"), ("gpt2", "pissa_niter_2")])
def test_start_and_training_match_peft(family, init, seeded_peft_svd):
    peft_model, adapted = _pair(family, init)
    _assert_same_start(peft_model, adapted, tolerance=1e-6)
    batch = tiny_batch()
    original = logits(tiny_model(family), batch)
    assert (logits(adapted, batch) - original).abs().max() <= 1e-5  # the output is unchanged at step 0
    assert (logits(peft_model, batch) - original).abs().max() <= 1e-5
    path, site = next(adapted.sites())
    assert (site.base_layer.weight - tiny_model(family).get_submodule(path).weight).abs().max() > 1e-2
    assert_same_training(peft_model, adapted, steps=3)
    assert (logits(adapted, batch) - original).abs().max() > 1e-2
    assert_merges_like_unmerged(adapted)


@pytest.mark.parametrize(("family", "init", "rslora", "ranks"), [
    ("llama", "pissa", False, {"v_proj": 2}), ("llama", "olora", True, {}), ("gpt2", "pissa", False, {})])
def test_converted_export_loads_in_peft_on_original_base(family, init, rslora, ranks, tmp_path):
    peft_model, adapted = _pair(family, init, use_rslora=rslora, rank_pattern=ranks)
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe: save the start
    peft_model.save_pretrained(tmp_path / "start")
    peft_model.peft_config["default"].init_lora_weights = init
    assert_same_training(peft_model, adapted, steps=2)
    batch = tiny_batch()
    ours = logits(adapted, batch)
    ak.save(adapted, tmp_path / "peft", format="peft")
    loaded = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "peft").eval()  # the ORIGINAL base
    config = loaded.peft_config["default"]
    assert config.r == 2 * R and config.init_lora_weights is True
    assert config.lora_alpha == pytest.approx(ALPHA * (2 ** 0.5 if rslora else 2))
    assert (logits(loaded, batch) - ours).abs().max() <= 1e-5
    # PEFT's own conversion of its trained twin: the same tensors and options
    peft_model.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=tmp_path / "start")
    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("theirs", "peft"))
    assert sorted(theirs) == sorted(mine)
    assert all((theirs[k] - mine[k]).abs().max() <= 1e-4 for k in theirs)
    their_config = peft.PeftConfig.from_pretrained(tmp_path / "theirs")
    assert (their_config.r, their_config.lora_alpha) == (config.r, pytest.approx(config.lora_alpha))
    merged = loaded.merge_and_unload()
    assert (logits(merged, batch) - ours).abs().max() <= 1e-4


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora", "loftq"])
def test_native_folder_reloads_onto_original_base(init, tmp_path):
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=R, alpha=R, init=init, loftq_iter=2))
    batch = tiny_batch()
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    adapted.records["default"].trained_steps = 1
    ours = logits(adapted, batch)
    adapted.save(tmp_path / "a")
    fresh = ak.load(tiny_model("llama"), tmp_path / "a")
    assert (logits(fresh, batch) - ours).abs().max() <= 1e-6
    for (path, site), (_, their_site) in zip(fresh.sites(), adapted.sites(), strict=True):
        assert torch.equal(site.base_layer.weight, their_site.base_layer.weight), path
    merged = fresh.merge_and_unload()  # merged on what was loaded as the original base
    assert (logits(merged, batch) - ours).abs().max() <= 1e-5


def _peft_loftq(weight: torch.Tensor, r: int, iters: int):
    """PEFT's loftq_init on the CPU, from its pieces: Params4bit(compress_statistics=False, nf4) quantization
    and _low_rank_decomposition, alternated as PEFT does."""
    import bitsandbytes as bnb

    res = weight.clone()
    for i in range(iters):
        q = bnb.nn.Params4bit(res, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        dequantized = bnb.functional.dequantize_4bit(q.data, q.quant_state)
        out = _low_rank_decomposition(weight - dequantized, reduced_rank=r)
        if i + 1 < iters:
            res = weight - torch.mm(out["L"], out["R"])
    return dequantized, out["R"], out["L"]


@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_matches_peft_algorithm(iters):
    weight = tiny_model("llama").model.layers[0].mlp.down_proj.weight.detach().float()  # 32 x 64
    q_peft, a_peft, b_peft = _peft_loftq(weight, R, iters)
    lora_A, lora_B, change = starting_values(weight, "loftq", R, 1.0, iters)
    q_ours = changed_base(weight, "loftq", 1.0, change)
    assert (q_ours != q_peft).float().mean() <= 2e-3  # a float difference may flip a rare rounding boundary
    assert (lora_B @ lora_A - b_peft @ a_peft).abs().max() <= 1e-4
    assert (q_ours + lora_B @ lora_A - weight).norm() < (q_ours - weight).norm()  # LoftQ's point
    if iters == 1:
        assert torch.equal(q_ours, q_peft) and not change


def test_loftq_model_approximates_base_better_than_nf4():
    batch = tiny_batch()
    original = logits(tiny_model("llama"), batch)
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=R, alpha=R, init="loftq", target_modules="all-linear"))
    with_lora = logits(adapted, batch)
    with adapted.disabled():
        nf4_only = logits(adapted, batch)
    assert (with_lora - original).abs().max() < (nf4_only - original).abs().max()
    assert (nf4_only - original).abs().max() > 1e-3  # the base is quantized indeed
    assert_merges_like_unmerged(adapted)


def test_delete_restores_the_original_base_exactly():
    model = tiny_model("llama")
    before = _weights(model)
    adapted = ak.adapt(model, ak.LoraConfig(r=R, init="pissa", target_modules="all-linear"))
    now = _weights(model)
    assert sorted(now) == sorted(before)
    assert sum(not torch.equal(before[k], now[k]) for k in before) == 7 * 2  # every linear layer of 2 layers
    adapted.delete("default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("init", "words"), [
    ("bogus", "default, gaussian, pissa, pissa_niter_N, olora, loftq"), ("pissa_niter_0", "positive integer"),
    ("pissa_niter_x", "positive integer"), ("pissa_niter_", "positive integer"), ("PiSSA", "one of")])
def test_bad_init_is_one_clear_line(init, words):
    with pytest.raises(AdapterkitError, match=words):
        ak.LoraConfig(init=init)


def test_loftq_without_bitsandbytes_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(AdapterkitError, match=r"adapterkit\[quant\]"):
        ak.LoraConfig(init="loftq")


def test_refusals_leave_the_base_unchanged(tmp_path):
    with pytest.raises(AdapterkitError, match="use_dora"):
        ak.LoraConfig(init="olora", use_dora=True)
    with pytest.raises(AdapterkitError, match="loftq_iter"):
        ak.LoraConfig(init="loftq", loftq_iter=0)
    model = tiny_model("llama")
    before = _weights(model)
    with pytest.raises(AdapterkitError, match="r <= min"):  # v_proj is 16 x 32; q_proj would have passed first
        ak.adapt(model, ak.LoraConfig(r=20, init="pissa"))
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    adapted = ak.adapt(model, ak.LoraConfig(r=R))
    with pytest.raises(AdapterkitError, match="cannot share that layer"):
        adapted.add_adapter(ak.LoraConfig(r=R, init="pissa"), "second")
    assert _weights(model).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    pissa = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=R, init="pissa"))
    with pytest.raises(AdapterkitError, match="'default' rewrote the base weight"):
        pissa.add_adapter(ak.LoraConfig(r=R, target_modules=["v_proj"]), "plain")
    with pytest.raises(AdapterkitError, match="rewrote the base"):  # a GGUF LoRA applies to the original base
        lora_tensors(pissa, "default")
    pissa.save(tmp_path / "pissa")
    with pytest.raises(AdapterkitError, match="cannot hot-swap"):  # its base fits the old start only
        hotswap(pissa, tmp_path / "pissa", "default")
    loftq = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=R, alpha=R, init="loftq"))
    with pytest.raises(AdapterkitError, match="LoftQ adapter fits only"):
        ak.save(loftq, tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_cli_trains_merges_and_refuses(tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}."}
                                for a in range(4) for b in range(4)]))
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--batch-size", "4", "--max-steps", "2",
            "--learning-rate", "1e-2", "--cutoff-len", "32", "--val-set-size", "4", "--template", "bare",
            "--lora-r", "4"]
    assert main([*args, "--output", str(tmp_path / "run"), "--lora-init", "pissa_niter_2"]) == 0
    batch = tiny_batch()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    adapted = ak.load(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), tmp_path / "run")
    assert (logits(adapted, batch) - logits(base, batch)).abs().max() > 1e-4  # trained, on the rebuilt base
    assert main(["merge", "--model", str(tiny_llama_dir), "--adapter", str(tmp_path / "run"),
                 "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, batch) - logits(adapted, batch)).abs().max() <= 1e-5
    assert main(["verify", str(tmp_path / "run"), "--model", str(tiny_llama_dir)]) == 0
    assert main(["export", "--adapter", str(tmp_path / "run"), "--output", str(tmp_path / "peft"),
                 "--model", str(tiny_llama_dir)]) == 0
    in_peft = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "peft")
    assert (logits(in_peft.eval(), batch) - logits(adapted, batch)).abs().max() <= 1e-5
    for bad, words in ((["--lora-init", "pissa_niter_x"], "pissa_niter_N must be a positive integer"),
                       (["--lora-init", "olora", "--quantize", "nf4"], "--quantize none")):
        capsys.readouterr()
        assert main([*args, "--output", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()


def test_resumed_run_rebuilds_the_same_base(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """A run killed after its first checkpoint and resumed ends where an uninterrupted run ends: the
    randomised SVD draws the same start again (seeded), so the resumed adapter runs on the same base."""
    import adapterkit.io.checkpoint as checkpoint

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}."}
                                for a in range(4) for b in range(4)]))

    def args(out):
        return ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output", str(out), "--batch-size",
                "4", "--max-steps", "4", "--save-steps", "2", "--learning-rate", "1e-2", "--cutoff-len", "32",
                "--val-set-size", "0", "--template", "bare", "--lora-r", "4", "--lora-init", "pissa_niter_2"]

    assert main(args(tmp_path / "straight")) == 0
    real_save, calls = checkpoint.save_tensors, {"n": 0}

    def killed_at_second_checkpoint(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_save(*a, **k)

    monkeypatch.setattr(checkpoint, "save_tensors", killed_at_second_checkpoint)
    assert main(args(tmp_path / "resumed")) == 130
    monkeypatch.setattr(checkpoint, "save_tensors", real_save)
    assert main([*args(tmp_path / "resumed"), "--resume", "auto"]) == 0
    straight, resumed = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("straight", "resumed"))
    assert sorted(straight) == sorted(resumed) and any(".base_change." in k for k in straight)
    assert all(torch.allclose(straight[k], resumed[k], atol=1e-6) for k in straight)
