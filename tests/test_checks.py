"""No silent failures: each check fails on a crafted bad case and passes on the good one."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.recipes.merge import MergeSettings, merge


def _trained_lora(family="llama", seed=0):
    adapted = ak.adapt(tiny_model(family, seed=seed), ak.LoraConfig(r=4, alpha=8))
    torch.manual_seed(3)
    with torch.no_grad():
        for key, p in adapted.adapter_state_dict().items():
            if key.endswith("lora_B"):
                p.normal_(0, 0.2)
    adapted.records["default"].trained_steps = 5
    return adapted


def test_good_adapter_loads_and_its_fingerprint_is_saved(tmp_path):
    _trained_lora().save(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    fp = meta["fingerprint"]
    assert len(fp["adapted"]) == 4 and fp["max_change"] > 1e-3 and fp["adapted"] != fp["base"]
    reloaded = ak.load(tiny_model("llama"), tmp_path)
    assert reloaded.records["default"].trained_steps == 5


def test_adapter_on_another_base_with_the_same_config_is_refused(tmp_path):
    _trained_lora().save(tmp_path)
    with pytest.raises(ak.AdapterkitError, match="another base model"):
        ak.load(tiny_model("llama", seed=1), tmp_path)  # same architecture and sizes, other weights
    with pytest.warns(UserWarning, match="because of --force"):
        ak.load(tiny_model("llama", seed=1), tmp_path, force=True)


def test_renamed_module_in_the_weights_is_refused(tmp_path):
    _trained_lora().save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "model.layers.1.self_attn.v_proj.lora_B"
    tensors[key.replace("v_proj", "k_proj")] = tensors.pop(key)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ak.AdapterkitError, match="missing model.layers.1.self_attn.v_proj.lora_B"):
        ak.load(tiny_model("llama"), tmp_path)


def test_tampered_fingerprint_is_refused(tmp_path):
    _trained_lora().save(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["fingerprint"]["adapted"][0][0] += 1.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ak.AdapterkitError, match="drift from the saved fingerprint"):
        ak.load(tiny_model("llama"), tmp_path)


def test_a_trained_adapter_that_changes_nothing_is_flagged(tmp_path):
    adapted = _trained_lora()
    with torch.no_grad():
        for key, p in adapted.adapter_state_dict().items():
            if key.endswith("lora_B"):
                p.zero_()
    with pytest.raises(ak.AdapterkitError, match="changes nothing"):
        adapted.save(tmp_path / "zero")
    assert not (tmp_path / "zero" / "adapter_config.json").exists()
    _trained_lora().save(tmp_path / "good")  # the same file with its update zeroed on disk is caught at load
    tensors = load_file(tmp_path / "good" / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if k.endswith("lora_B") else v for k, v in tensors.items()},
              tmp_path / "good" / "adapter_model.safetensors")
    with pytest.raises(ak.AdapterkitError, match="drift|changes nothing"):
        ak.load(tiny_model("llama"), tmp_path / "good")


def test_empty_tensor_save_is_refused(tmp_path):
    adapted = _trained_lora()
    record = adapted.records["default"]
    path = next(iter(record.parts))
    record.parts[path].register_parameter("lora_empty", torch.nn.Parameter(torch.empty(0)))
    with pytest.raises(ak.AdapterkitError, match="is empty"):
        adapted.save(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_merge_reports_and_refuses_drift(tiny_llama_dir, tmp_path):
    _trained_lora().save(tmp_path / "adapter")  # tiny_llama_dir holds the same seed-0 weights
    out = tmp_path / "merged"
    with pytest.raises(ak.AdapterkitError, match="merged logits differ from unmerged.*nothing written"):
        merge(MergeSettings(str(tmp_path / "adapter"), str(out), str(tiny_llama_dir), tolerance=0.0))
    assert not out.exists()
    drift = merge(MergeSettings(str(tmp_path / "adapter"), str(out), str(tiny_llama_dir)))
    assert 0 < drift < 1e-4  # reported: exactly what merging changed
    assert json.loads((out / "merge_report.json").read_text())["max_logit_change"] == drift


def test_verify_command(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapted = ak.adapt(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), ak.LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for key, p in adapted.adapter_state_dict().items():
            if key.endswith("lora_B"):
                p.normal_(0, 0.2)
    adapted.save(tmp_path)
    assert main(["verify", str(tmp_path), "--model", str(tiny_llama_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["ok"] * 6 and "fingerprint" in lines[-1]
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["fingerprint"]["adapted"][1][2] -= 3.0
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    assert main(["verify", str(tmp_path), "--model", str(tiny_llama_dir)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines()[-1].startswith("FAIL  fingerprint")
    assert "failed verification" in captured.err


@torch.no_grad()
def test_saved_weights_are_exactly_the_trainable_parameters(tmp_path):
    adapted = _trained_lora()
    adapted.save(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == adapted.trainable_parameters()[0]
    batch = tiny_batch()
    assert torch.equal(ak.load(tiny_model("llama"), tmp_path)(**batch).logits, adapted(**batch).logits)


def _bf16_fingerprint(folder, adapted_shift):
    """The saved fingerprint as if taken in bf16: the adapted logits moved by `adapted_shift(adapted, base)`."""
    meta = json.loads((folder / "adapter_config.json").read_text())
    fp = meta["fingerprint"]
    adapted, base = torch.tensor(fp["adapted"]), torch.tensor(fp["base"])
    fp["adapted"], fp["dtype"] = adapted_shift(adapted, base).tolist(), "bfloat16"
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    return (adapted - base).abs().max() / adapted.abs().max()


def test_fingerprint_taken_in_another_precision(tmp_path):
    """bf16 noise beyond bf16's 5% tolerance passes while the adapter's own change is there (< 50% off);
    an adapter whose change points elsewhere is refused."""
    for case, shift, ok in [
        ("noisy", lambda a, b: a + 0.08 * a.abs().max() * torch.sign(torch.randn(a.shape)) + 0.2 * (a - b), True),
        ("reversed", lambda a, b: 2 * b - a, False),  # the saved change is the opposite of what the weights give
    ]:
        folder = tmp_path / case
        _trained_lora().save(folder)
        torch.manual_seed(0)
        size = _bf16_fingerprint(folder, shift)
        if ok:
            ak.load(tiny_model("llama"), folder)
        else:
            assert size > 0.025  # twice the change exceeds bf16's tolerance on the logits too
            with pytest.raises(ak.AdapterkitError, match="the adapter's change by 2 > 0.5"):
                ak.load(tiny_model("llama"), folder)
    folder = tmp_path / "same-precision"  # the change rule is only for a fingerprint of another precision
    _trained_lora().save(folder)
    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["fingerprint"]["adapted"] = [[v + 1e-2 for v in row] for row in meta["fingerprint"]["adapted"]]
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ak.AdapterkitError, match="drift from the saved fingerprint") as info:
        ak.load(tiny_model("llama"), folder)
    assert "change" not in str(info.value)
