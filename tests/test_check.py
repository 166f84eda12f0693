"""`adapterkit check DIR --target T` (issue 25): one table of (adapter, target) -> expected finding that
reaches every rule of recipes/check.py's RULES, then the command on real folders: the PEFT export of
every method with a PEFT type passes --target peft, DoRA fails --target vllm with the documented fix,
and check's PEFT verdict agrees with the PEFT writer's own refusals."""

from __future__ import annotations

import json

import pytest
import torch

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.io.peft import PEFT_TYPES, refuse_unexportable
from adapterkit.methods.prompt import PrefixTuningConfig, PromptTuningConfig, PTuningConfig, PTuningV2Config
from adapterkit.recipes.check import RULES, CheckSettings, Facts, findings

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ODD = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def lora(**kw):
    return ak.LoraConfig(**{"r": 8, "alpha": 16, **kw})


def _modules(config, layers=2):
    if isinstance(config, ak.LoraConfig):
        chosen = config.layers if config.layers is not None else range(layers)
        return [f"model.layers.{i}.self_attn.{m}" for i in chosen for m in ("q_proj", "v_proj")]
    return ["inputs"]


def facts(config, model_type="llama", layers=2, modules=None, generation=None, merged=False) -> Facts:
    modules = modules or _modules(config, layers)
    ranks, alphas = {}, {}
    if isinstance(config, ak.LoraConfig):
        for path in modules:
            ranks[path], alphas[path] = config.rank_and_alpha(path)
    return Facts("DIR", config, tuple(modules), ranks, alphas, model_type, layers, generation or {}, merged)


# (case, facts, target, the finding expected, or None for none); every RULES row is reached below.
CASES = [
    ("lora-peft", facts(lora()), "peft", None),
    ("lora-vllm", facts(lora()), "vllm", None),
    ("lora-tgi", facts(lora()), "tgi", None),
    ("lora-gguf", facts(lora()), "llamacpp", None),
    ("lora-ollama", facts(lora()), "ollama", None),
    ("adapter-h-peft", facts(ak.AdapterHConfig(bottleneck_size=4)), "peft",
     "PEFT has no adapter-h (adapter method); fix: keep adapterkit's own format"),
    ("adapter-h-vllm", facts(ak.AdapterHConfig(bottleneck_size=4)), "vllm", "this target serves LoRA adapters only"),
    ("adapter-h-tgi", facts(ak.AdapterHConfig(bottleneck_size=4)), "tgi", "this target serves LoRA adapters only"),
    ("adapter-h-gguf", facts(ak.AdapterHConfig(bottleneck_size=4)), "llamacpp",
     "serves LoRA adapters only; fix: keep adapterkit's own format; adapter-h cannot be merged"),
    ("adapter-h-gguf-merged", facts(ak.AdapterHConfig(bottleneck_size=4), merged=True), "llamacpp",
     "adapter-h cannot be merged into the base weights"),
    ("prompt-vllm", facts(PromptTuningConfig(num_virtual_tokens=4)), "vllm", "prompt-tuning is a prompt method"),
    ("prompt-peft", facts(PromptTuningConfig(num_virtual_tokens=4)), "peft", None),
    ("prompt-ollama", facts(PromptTuningConfig(num_virtual_tokens=4)), "ollama", "serves LoRA adapters only"),
    ("prefix-layers-peft", facts(PTuningV2Config(num_virtual_tokens=4, layers=[0])), "peft",
     "prefixes in layers [0] only"),
    ("experts-peft", facts(lora(target_parameters=["experts"])), "peft", "fused expert weights"),
    ("experts-gguf", facts(lora(target_parameters=["experts"])), "llamacpp",
     "or expert weights; fix: export the merged model instead: adapterkit export --adapter DIR --format gguf "
     "--merged"),
    ("bias-peft", facts(lora(bias="all")), "peft", "bias='all'"),
    ("copies-vllm", facts(lora(modules_to_save=["lm_head"])), "vllm", "modules_to_save=['lm_head']"),
    ("dora-vllm", facts(lora(use_dora=True)), "vllm", "vllm: DoRA (a trained magnitude per output feature) is not "
     "supported; fix: merge it first (adapterkit merge --adapter DIR --output OUT) and serve OUT as the model"),
    ("dora-tgi", facts(lora(use_dora=True)), "tgi", "magnitudes would be dropped without a word"),
    ("dora-gguf", facts(lora(use_dora=True)), "llamacpp", "no DoRA magnitude"),
    ("dora-gguf-merged", facts(lora(use_dora=True), merged=True), "llamacpp", None),
    ("rank-16-vllm", facts(lora(r=16)), "vllm", None),
    ("rank-24-vllm", facts(lora(r=24)), "vllm", "rank 24 is above vLLM's default --max-lora-rank 16; fix: serve it "
     "with --max-lora-rank 32"),
    ("rank-64-vllm", facts(lora(r=64)), "vllm", "fix: serve it with --max-lora-rank 64"),
    ("rank-600-vllm", facts(lora(r=600)), "vllm", "fix: lower the rank to at most 512 (retrain), or merge it first"),
    ("patterns-vllm", facts(lora(rank_pattern={"layers.1.self_attn.v_proj": 4})), "vllm",
     "1 module(s) have their own rank or alpha"),
    ("patterns-tgi", facts(lora(alpha_pattern={"q_proj": 4})), "tgi", "2 module(s) have their own rank or alpha"),
    ("rslora-vllm", facts(lora(use_rslora=True)), "vllm", None),
    ("layer-1-tgi", facts(lora(layers=[1])), "tgi", "q_proj, v_proj adapted in only some of the 2 layers"),
    ("layer-1-vllm", facts(lora(layers=[1])), "vllm", None),
    ("no-arch-gguf", facts(lora(), model_type="gpt_neo"), "llamacpp", "no architecture for gpt_neo"),
    ("unknown-base-ollama", facts(lora(), model_type=None), "ollama", "the base model's family is unknown"),
    ("conversion-gguf", facts(lora(), model_type="gpt2"), "llamacpp", "reshapes, transposes or splits tensors"),
    ("unmapped-gguf", facts(lora(), modules=["model.layers.0.self_attn.rotary_emb"]), "llamacpp",
     "modules the GGUF layout cannot carry: model.layers.0.self_attn.rotary_emb"),
    ("chatml-ollama", facts(lora(), generation={"template": "chat", "chat_template": CHATML}), "ollama", None),
    ("odd-template-ollama", facts(lora(), generation={"template": "chat", "chat_template": ODD}), "ollama",
     "ollama: the adapter's chat template is not ChatML (adapterkit translates alpaca, bare, chat (ChatML) to "
     "Ollama); fix: write the Modelfile's TEMPLATE yourself"),
    ("odd-template-gguf", facts(lora(), generation={"template": "chat", "chat_template": ODD}), "llamacpp", None),
]


@pytest.mark.parametrize("case, fact, target, expected", CASES, ids=[c[0] for c in CASES])
def test_rule_table(case, fact, target, expected):
    lines = findings(fact, target)
    if expected is None:
        assert lines == []
    else:
        assert any(expected in line for line in lines), lines
        assert all(line.startswith(f"{target}: ") and "; fix: " in line for line in lines)


def test_every_rule_is_reached_by_a_case():
    reached = set()
    for _, fact, target, expected in CASES:
        for index, rule in enumerate(RULES):
            applies = target in rule.targets and (rule.merged is None or rule.merged == fact.merged)
            if applies and expected is not None and rule.finding(fact):
                reached.add(index)
    assert reached == set(range(len(RULES))), [RULES[i].finding.__name__ for i in set(range(len(RULES))) - reached]


def test_target_spellings():
    assert CheckSettings("DIR", "llama.cpp").target == "llamacpp"
    assert CheckSettings("DIR", "LLaMA-CPP").target == "llamacpp"
    with pytest.raises(ak.AdapterkitError, match="--target must be one of vllm, llamacpp, ollama, peft, tgi"):
        CheckSettings("DIR", "triton")


PEFT_METHODS = {
    "lora": lora(r=4, alpha=8),
    "lora-dora": lora(r=4, alpha=8, use_dora=True),
    "lora-rslora-patterns": lora(r=4, alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}),
    "prompt-tuning": PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning": PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix-tuning": PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "p-tuning-v2": PTuningV2Config(num_virtual_tokens=4),
    **{name: ak.get_method(name).config_class() for name in ("loha", "lokr", "vera", "oft", "adalora")},
}


def _saved(model_dir, config, folder):
    model, tokenizer = ak.load_model(str(model_dir))
    adapted = ak.adapt(model, config, tokenizer=tokenizer)
    generator = torch.Generator().manual_seed(1)
    adapted.load_adapter_state_dict({k: v + 0.2 * torch.randn(v.shape, generator=generator)
                                     for k, v in adapted.adapter_state_dict().items()})
    adapted.save(folder)
    return folder


def test_methods_cover_every_peft_type():
    assert {c.method for c in PEFT_METHODS.values()} == set(PEFT_TYPES)


@pytest.mark.parametrize("case", list(PEFT_METHODS))
def test_peft_export_passes_check_peft(tiny_llama_dir, tmp_path, case, capsys):
    native = _saved(tiny_llama_dir, PEFT_METHODS[case], tmp_path / "native")
    assert main(["check", str(native), "--target", "peft"]) == 0
    peft_dir = tmp_path / "peft"
    assert main(["export", "--adapter", str(native), "--format", "peft", "--output", str(peft_dir)]) == 0
    capsys.readouterr()
    assert main(["check", str(peft_dir), "--target", "peft"]) == 0
    assert capsys.readouterr().out.strip() == f"ok: peft can serve {peft_dir} as it is"


def test_dora_fails_vllm_with_the_documented_fix(tiny_llama_dir, tmp_path, capsys):
    native = _saved(tiny_llama_dir, lora(r=4, alpha=8, use_dora=True), tmp_path / "dora")
    fix = f"fix: merge it first (adapterkit merge --adapter {native} --output OUT) and serve OUT as the model"
    capsys.readouterr()
    assert main(["check", str(native), "--target", "vllm"]) == 1
    assert capsys.readouterr().out.strip().splitlines() == [
        f"vllm: DoRA (a trained magnitude per output feature) is not supported; {fix}"]
    assert main(["export", "--adapter", str(native), "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    assert main(["check", str(tmp_path / "peft"), "--target", "vllm"]) == 1  # read from PEFT's own config too
    assert "DoRA" in capsys.readouterr().out
    assert main(["check", str(native), "--target", "llama.cpp"]) == 1
    assert main(["check", str(native), "--target", "llama.cpp", "--merged"]) == 0
    capsys.readouterr()
    assert main(["export", "--adapter", str(native), "--format", "gguf", "--output", str(tmp_path / "d.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no DoRA magnitude" in err[0] and "--merged" in err[0]
    assert not (tmp_path / "d.gguf").exists()


@pytest.mark.parametrize("config", [ak.AdapterHConfig(bottleneck_size=4), lora(bias="all"),
                                    PTuningV2Config(num_virtual_tokens=4, layers=[0]), *PEFT_METHODS.values()],
                         ids=lambda c: c.method)
def test_check_peft_agrees_with_the_peft_writer(config):
    try:
        refuse_unexportable(config)
        writable = True
    except ak.AdapterkitError:
        writable = False
    assert (findings(facts(config), "peft") == []) == writable


def test_unreadable_folders_exit_2(tmp_path, capsys):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    capsys.readouterr()
    assert main(["check", str(tmp_path / "bad"), "--target", "vllm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not valid JSON" in err[0]
    assert main(["check", str(tmp_path / "missing"), "--target", "tgi"]) == 2
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({"method": "lora", "config": {}}))
    assert main(["check", str(tmp_path / "bad"), "--target", "tgi"]) == 2
