"""PEFT-format interop (issue 7), with Hugging Face PEFT as the independent reader and writer.

Both directions must give the same logits (<= 1e-5) and clearly differ from the base model's, for every
method PEFT has (LoRA, rsLoRA, DoRA, per-module rank/alpha, prompt tuning, P-Tuning, prefix tuning), on
tiny LLaMA (grouped key/value heads) and GPT-2 (Conv1D c_attn, fan_in_fan_out):
- export: an adapterkit adapter with random non-trivial weights -> PEFT folder -> PeftModel.from_pretrained;
- import: a PEFT model with random non-trivial weights -> save_pretrained -> adapterkit reads the folder.
PEFT's prompt-tuning/P-Tuning logits start with the k virtual positions; only the real positions compare.
"""

import dataclasses
import json
import os
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit import cli
from adapterkit.io import peft as peft_format
from adapterkit.methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
from adapterkit.recipes.export import ExportSettings, export
from adapterkit.sites import AdapterSite

K, ENC, R, ALPHA = 4, 16, 4, 8
FAMILIES = ["llama", "gpt2"]
TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
RANKS = {"llama": {"layers.1.self_attn.v_proj": 2}, "gpt2": {"h.1.attn.c_attn": 2}}
ALPHAS = {"llama": {"layers.0.self_attn.q_proj": 3}, "gpt2": {"h.0.attn.c_attn": 3}}


def _peft_lora(family, rslora=False, **kw):
    kw.setdefault("target_modules", TARGETS[family])
    return peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, use_rslora=rslora,
                           fan_in_fan_out=family == "gpt2", **kw)


def _peft_prompt(cls, **kw):
    return lambda family: cls(task_type="CAUSAL_LM", num_virtual_tokens=K, **kw)


# case: (adapterkit config for a family, PEFT config for a family or None where PEFT has no such method)
CASES = {
    "lora": (lambda f: ak.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS[f]), _peft_lora),
    "rslora": (lambda f: ak.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS[f], use_rslora=True),
               lambda f: _peft_lora(f, rslora=True)),
    "dora": (lambda f: ak.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS[f], use_dora=True),
             lambda f: _peft_lora(f, use_dora=True)),
    "lora-patterns": (lambda f: ak.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS[f],
                                              rank_pattern=RANKS[f], alpha_pattern=ALPHAS[f]),
                      lambda f: _peft_lora(f, rank_pattern=RANKS[f], alpha_pattern=ALPHAS[f])),
    "lora-all-linear": (lambda f: ak.LoraConfig(r=R, alpha=ALPHA, target_modules="all-linear"),
                        lambda f: _peft_lora(f, target_modules="all-linear")),
    "lora-layer-1": (lambda f: ak.LoraConfig(r=R, alpha=ALPHA, target_modules=TARGETS[f], layers=[1]),
                     lambda f: _peft_lora(f, layers_to_transform=[1])),
    "prompt-tuning": (lambda f: PromptTuningConfig(num_virtual_tokens=K),
                      _peft_prompt(peft.PromptTuningConfig)),
    "p-tuning-mlp": (lambda f: PTuningConfig(num_virtual_tokens=K, encoder_hidden_size=ENC),
                     _peft_prompt(peft.PromptEncoderConfig, encoder_hidden_size=ENC)),
    "p-tuning-lstm": (lambda f: PTuningConfig(num_virtual_tokens=K, encoder_type="lstm",
                                              encoder_hidden_size=ENC),
                      _peft_prompt(peft.PromptEncoderConfig, encoder_hidden_size=ENC,
                                   encoder_reparameterization_type="LSTM")),
    "prefix-projection": (lambda f: PrefixTuningConfig(num_virtual_tokens=K, encoder_hidden_size=ENC),
                          _peft_prompt(peft.PrefixTuningConfig, prefix_projection=True,
                                       encoder_hidden_size=ENC)),
    "prefix-direct": (lambda f: PrefixTuningConfig(num_virtual_tokens=K, prefix_projection=False),
                      _peft_prompt(peft.PrefixTuningConfig, prefix_projection=False)),
    "p-tuning-v2": (lambda f: PTuningV2Config(num_virtual_tokens=K), None),
}


def _logits(model, batch):
    """Logits at the real input positions (PEFT prepends k virtual positions for prompt/P-Tuning)."""
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, logits.shape[1] - n:]


def _randomised(adapted, seed=5, scale=0.3):
    """Random weights; DoRA's magnitudes stay near the weight norms they start at."""
    generator = torch.Generator().manual_seed(seed)
    noise = {k: torch.randn(v.shape, generator=generator) for k, v in adapted.adapter_state_dict().items()}
    adapted.load_adapter_state_dict({k: v * (1 + 0.2 * noise[k]) if k.endswith(".magnitude")
                                     else noise[k] * scale for k, v in adapted.adapter_state_dict().items()})
    return adapted


def _adapted(family, case):
    adapted = ak.adapt(tiny_model(family, seed=0), CASES[case][0](family))
    adapted.eval()
    return _randomised(adapted)


def _peft_saved(family, case, folder):
    """A PEFT model with non-trivial random weights (LoRA B made nonzero), saved with save_pretrained."""
    peft_model = peft.get_peft_model(tiny_model(family, seed=0), CASES[case][1](family)).eval()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, param in peft_model.named_parameters():
            if ".lora_B." in key:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            if ".lora_magnitude_vector." in key:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(folder)
    return peft_model


def _assert_same(got, expected, base):
    assert (expected - base).abs().max().item() > 1e-3, "the adapter barely moves the logits"
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_export_loads_in_peft(tmp_path, family, case):
    batch = tiny_batch(seed=1)
    adapted = _adapted(family, case)
    out = peft_format.export_peft(adapted, tmp_path / "peft")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["adapter_config.json",
                                                                              "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(tiny_model(family, seed=0), out).eval()
    written = json.loads((out / "adapter_config.json").read_text())
    assert set(written) <= {f.name for f in dataclasses.fields(loaded.peft_config["default"])}  # PEFT's
    _assert_same(_logits(loaded, batch), _logits(adapted, batch), _logits(tiny_model(family, seed=0), batch))


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] is not None])
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_saved_adapter_loads(tmp_path, family, case):
    batch = tiny_batch(seed=2)
    peft_model = _peft_saved(family, case, tmp_path / "peft")
    assert peft_format.is_peft_folder(tmp_path / "peft")
    adapted = ak.load(tiny_model(family, seed=0), tmp_path / "peft")
    expected = _logits(peft_model, batch)
    _assert_same(_logits(adapted, batch), expected, _logits(tiny_model(family, seed=0), batch))
    assert not any(p.requires_grad for p in adapted.parameters())  # loaded for inference, as load() does
    method = adapted.records["default"].config.method
    expected_method = "lora" if "lora" in case or case == "dora" else "prefix-tuning" if "prefix" in case \
        else "prompt-tuning"
    assert method == expected_method  # PEFT saves no P-Tuning encoder nor prefix projection: their output


@pytest.mark.parametrize("case", ["lora", "prefix-projection"])
def test_imported_adapter_saves_and_reloads_in_our_format(tmp_path, case):
    batch = tiny_batch(seed=3)
    _peft_saved("llama", case, tmp_path / "peft")
    adapted = ak.load(tiny_model("llama"), tmp_path / "peft")
    expected = _logits(adapted, batch)
    adapted.save(tmp_path / "ours")
    again = ak.load(tiny_model("llama"), tmp_path / "ours")
    assert (_logits(again, batch) - expected).abs().max().item() <= 1e-6
    out = peft_format.export_peft(again, tmp_path / "peft-again")  # and back to PEFT
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), out).eval()
    assert (_logits(loaded, batch) - expected).abs().max().item() <= 1e-5


def test_export_folder_loads_in_peft_without_adapterkit(tmp_path, tiny_llama_dir):
    """The CLI's job: adapter folder + the base recorded in it -> PEFT folder, read in a process where
    importing adapterkit fails, with the base found through PEFT's base_model_name_or_path."""
    model, tokenizer = ak.load_model(str(tiny_llama_dir))
    adapted = _randomised(ak.adapt(model, CASES["lora"][0]("llama"), tokenizer=tokenizer))
    adapted.save(tmp_path / "ours")
    out = export(ExportSettings(str(tmp_path / "ours"), str(tmp_path / "peft")))
    batch = tiny_batch(seed=4)
    save_file({"input_ids": batch["input_ids"], "expected": _logits(adapted, batch)}, str(tmp_path / "io.st"))
    script = (
        "import sys\nsys.modules['adapterkit'] = None\n"
        "import peft, torch\nfrom safetensors.torch import load_file\n"
        "io = load_file(sys.argv[2])\n"
        "model = peft.AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()\n"
        "with torch.no_grad():\n    got = model(input_ids=io['input_ids']).logits\n"
        "print((got - io['expected']).abs().max().item())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "io.st")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.strip().splitlines()[-1]) <= 1e-5


def test_export_refuses_an_existing_output_and_a_peft_folder(tmp_path):
    adapted = _adapted("llama", "lora")
    peft_format.export_peft(adapted, tmp_path / "peft")
    with pytest.raises(ak.AdapterkitError, match="not empty"):
        peft_format.export_peft(adapted, tmp_path / "peft")
    peft_format.export_peft(adapted, tmp_path / "peft", overwrite=True)
    with pytest.raises(ak.AdapterkitError, match="PEFT adapter folder already"):
        export(ExportSettings(str(tmp_path / "peft"), str(tmp_path / "again")))


@pytest.mark.parametrize("config, match", [
    (ak.AdapterHConfig(bottleneck_size=4), r"PEFT has no adapter-h .*own format.*cannot be merged"),
    (ak.AdapterPConfig(bottleneck_size=4), r"PEFT has no adapter-p .*adapterkit's own format"),
    (ak.ParallelConfig(bottleneck_size=4), r"PEFT has no parallel .*adapterkit's own format"),
    (PTuningV2Config(num_virtual_tokens=K, layers=[0]), r"every layer.*layers=\[0\].*own format"),
    (ak.LoraConfig(r=R, target_modules=["q_proj"], bias="all"), r"bias='all'.*adapterkit merge"),
], ids=["adapter-h", "adapter-p", "parallel", "p-tuning-v2-layers", "lora-bias"])
def test_export_refuses_what_peft_lacks(tmp_path, config, match):
    adapted = ak.adapt(tiny_model("llama"), config)
    with pytest.raises(ak.AdapterkitError, match=match):
        peft_format.export_peft(adapted, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_bin_only_peft_folder_is_refused(tmp_path):
    _peft_saved("llama", "lora", tmp_path / "peft")
    os.replace(tmp_path / "peft" / "adapter_model.safetensors", tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(ak.AdapterkitError, match="adapter_model.bin, a pickle file"):
        ak.load(tiny_model("llama"), tmp_path / "peft")


@pytest.mark.parametrize("edit, match", [
    ({"lora_bias": True}, "lora_bias=True has no adapterkit equivalent"),
    ({"use_dora": True}, "lacks lora_magnitude_vector of model.layers.0.self_attn.q_proj"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ({"peft_type": "IA3"}, "PEFT type 'IA3' has no adapterkit equivalent"),
    ({"task_type": "SEQ_CLS"}, "task SEQ_CLS"),
])
def test_peft_options_we_lack_are_refused(tmp_path, edit, match):
    _peft_saved("llama", "lora", tmp_path / "peft")
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    model = tiny_model("llama")
    with pytest.raises(ak.AdapterkitError, match=match):
        ak.load(model, tmp_path / "peft")
    assert not any(isinstance(m, AdapterSite) for m in model.modules())  # nothing left attached


def test_peft_lora_keys_without_the_peftmodel_prefix_load(tmp_path):
    """Adapters saved through transformers' own PEFT integration may lack `base_model.model.`."""
    batch = tiny_batch(seed=6)
    peft_model = _peft_saved("llama", "lora", tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights))
    adapted = ak.load(tiny_model("llama"), tmp_path / "peft")
    assert (_logits(adapted, batch) - _logits(peft_model, batch)).abs().max().item() <= 1e-5


def test_peft_lora_key_we_lack_is_refused(tmp_path):
    _peft_saved("llama", "lora", tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(R, 128)
    save_file(tensors, str(weights))
    with pytest.raises(ak.AdapterkitError, match="LoRA on an embedding layer"):
        ak.load(tiny_model("llama"), tmp_path / "peft")


@pytest.mark.parametrize("case, match", [("prefix-direct", "load it onto its own base model"),
                                         ("lora", r"target_modules \[.*\] match no module")])
def test_peft_adapter_for_another_model_is_refused(tmp_path, case, match):
    _peft_saved("llama", case, tmp_path / "peft")
    model = tiny_model("gpt2")
    with pytest.raises(ak.AdapterkitError, match=match):
        ak.load(model, tmp_path / "peft")
    assert not any(isinstance(m, AdapterSite) for m in model.modules())


def test_adapterkit_load_reads_a_peft_folder(tmp_path):
    batch = tiny_batch(seed=5)
    peft_model = _peft_saved("gpt2", "lora", tmp_path / "peft")
    adapted = ak.load(tiny_model("gpt2"), tmp_path / "peft")
    assert (_logits(adapted, batch) - _logits(peft_model, batch)).abs().max().item() <= 1e-5
    os.replace(tmp_path / "peft" / "adapter_model.safetensors", tmp_path / "peft" / "adapter_model.bin")
    with pytest.raises(ak.AdapterkitError, match="pickle"):
        ak.load(tiny_model("gpt2"), tmp_path / "peft")


def test_cli_export(tmp_path, tiny_llama_dir, capsys):
    model, tokenizer = ak.load_model(str(tiny_llama_dir))
    adapted = ak.adapt(model, CASES["prefix-projection"][0]("llama"), tokenizer=tokenizer)
    _randomised(adapted).save(tmp_path / "ours")
    out = tmp_path / "out"
    argv = ["export", "--adapter", str(tmp_path / "ours"), "--format", "peft", "--output", str(out)]
    assert cli.main(argv) == 0
    base, _ = ak.load_model(str(tiny_llama_dir))
    loaded = peft.PeftModel.from_pretrained(base, out).eval()
    batch = tiny_batch(seed=7)
    assert (_logits(loaded, batch) - _logits(adapted, batch)).abs().max().item() <= 1e-5
    model, tokenizer = ak.load_model(str(tiny_llama_dir))
    ak.adapt(model, ak.AdapterHConfig(bottleneck_size=4), tokenizer=tokenizer).save(tmp_path / "bottleneck")
    capsys.readouterr()
    argv = ["export", "--adapter", str(tmp_path / "bottleneck"), "--output", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "PEFT has no adapter-h" in err
    assert not (tmp_path / "x").exists()
