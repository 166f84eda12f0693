"""GGUF and Ollama export (issue 25), with independent readers: transformers' own GGUF loader
(`from_pretrained(folder, gguf_file=...)`, which undoes llama.cpp's q/k reordering itself) for merged
models, and the gguf package's GGUFReader for LoRA adapters, whose tensors are applied here the way
llama.cpp applies them (W + alpha / r * B A, r read from lora_b) and the result read by transformers.

The tiny LLaMA (vocab 128) gets a byte-level BPE tokenizer built in code: 5 special tokens, the 96
printable bytes and newline in GPT-2's byte spelling, and 27 merges (transformers' GGUF reader and
llama.cpp need a real BPE vocabulary; the tests' character tokenizer is word-level). It is trained for 40
steps on CORPUS first, so its next-token predictions there are as confident as a real model's on text: a
random tiny model's top two logits are nearly tied (median gap 0.13 against q8_0's mean logit change of
0.02), which makes top-1 agreement a measure of the ties rather than of the file (q8_0 gave 93% there).
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.io import gguf as gguf_io
from adapterkit.io.ollama import CHATML, chatml_system

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("Ġt", "he"), ("r", "e"),
          ("Ġ", "a"), ("o", "u"), ("Ġ", "s"), ("a", "t"), ("e", "n"), ("Ġ", "w"), ("i", "s"), ("o", "r"),
          ("Ġ", "o"), ("e", "s"), ("a", "r"), ("Ġ", "c"), ("i", "t"), ("l", "l"), ("Ġ", "b"), ("Ġ", "f"),
          ("e", "d"), ("Ġ", "m"), ("in", "g")]
CHATML_JINJA = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                "{{ '<|im_start|>system\nYou are a tiny model.<|im_end|>\n' }}{% endif %}"
                "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["the cat sat on the mat and the dog sat on the log.", "once upon a time there was a tiny model in a box.",
          "seven eight nine ten, then we start again at one.", "is it raining at the station? it is raining in town.",
          "add twelve and thirty: the answer is forty two.", "what is in the box? a cat is in the box, not a hat.",
          "the moon is bright tonight and the stars are out.", "she sells sea shells by the sea shore.",
          "a bird in the hand is worth two in the bush.", "we went to the market to buy bread and milk.",
          "the train leaves at nine and arrives at noon.", "water boils at one hundred degrees."]
PROMPTS = ["the cat sat on the mat", "Add 12 and 30.", "What is in the box?\n", "once upon a time",
           "seven eight nine", "Is it raining at the station?"]


def tiny_bpe() -> PreTrainedTokenizerFast:
    spell = bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for byte in [10, *range(32, 127)]:
        vocab[spell[byte]] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    assert len(vocab) == 128
    core = Tokenizer(models.BPE(vocab, list(MERGES)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        additional_special_tokens=SPECIALS[3:])
    tokenizer.chat_template = CHATML_JINJA
    return tokenizer


def _corpus(tokenizer):
    """CORPUS as one right-padded batch: (input_ids, attention_mask)."""
    encoded = [tokenizer(t)["input_ids"] for t in CORPUS]
    width = max(map(len, encoded))
    ids = torch.tensor([e + [0] * (width - len(e)) for e in encoded])
    return ids, (torch.arange(width)[None] < torch.tensor([len(e) for e in encoded])[:, None]).long()


def _trained_base(tokenizer, steps=40):
    torch.manual_seed(0)
    model = tiny_model("llama")
    ids, mask = _corpus(tokenizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def _randomised(adapted, seed=0, scale=0.04):
    generator = torch.Generator().manual_seed(seed)
    adapted.load_adapter_state_dict({k: torch.randn(v.shape, generator=generator) * scale
                                     for k, v in adapted.adapter_state_dict().items()})
    adapted.eval()
    return adapted


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    base = root / "base"
    _trained_base(tiny_bpe()).save_pretrained(base)
    tiny_bpe().save_pretrained(base)
    model, tokenizer = ak.load_model(str(base))
    adapted = _randomised(ak.adapt(model, ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"), tokenizer=tokenizer))
    adapted.save(root / "lora")
    return {"root": root, "base": base, "lora": root / "lora"}


def _gguf_model(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _ours(world):
    model, tokenizer = ak.load_model(str(world["base"]))
    return ak.load(model, world["lora"]).merge_and_unload().eval(), tokenizer


def _greedy(model, tokenizer, prompt, n=12):
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def _top1(a, b, ids, mask) -> float:
    """The fraction of positions where both models predict the same next token."""
    with torch.no_grad():
        same = a(input_ids=ids, attention_mask=mask).logits.argmax(-1) == b(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    return same[mask.bool()].float().mean().item()


def _export(world, name, *flags):
    out = world["root"] / name
    assert main(["export", "--adapter", str(world["lora"]), "--output", str(out), *flags]) == 0
    return out


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_merged_gguf_reads_back_with_the_same_greedy_tokens(world, outtype):
    path = _export(world, f"merged-{outtype}.gguf", "--format", "gguf", "--merged", "--outtype", outtype)
    ours, tokenizer = _ours(world)
    theirs = _gguf_model(path)
    theirs_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for prompt in PROMPTS:
        assert theirs_tokenizer(prompt)["input_ids"] == tokenizer(prompt)["input_ids"], prompt
        assert _greedy(theirs, tokenizer, prompt) == _greedy(ours, tokenizer, prompt), prompt
    if outtype == "f32":
        ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert (theirs(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item() < 1e-5
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.chat_template"].contents() == CHATML_JINJA
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id


@pytest.mark.parametrize("outtype, types", [("f16", {"F16", "F32"}), ("q8_0", {"Q8_0", "F32"}),
                                            ("bf16", {"BF16", "F32"})])
def test_merged_gguf_top1_agreement(world, outtype, types):
    """Top-1 next token at the 376 positions of CORPUS: at least 99% for f16, q8_0 and bf16; on 48 x 40
    random tokens (near-tied logits) f16 still agrees at 99% and the others are only reported."""
    path = _export(world, f"agree-{outtype}.gguf", "--format", "gguf", "--merged", "--outtype", outtype)
    assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == types
    ours, tokenizer = _ours(world)
    theirs = _gguf_model(path)
    ids, mask = _corpus(tokenizer)
    base, _ = ak.load_model(str(world["base"]))
    with torch.no_grad():  # the file holds the adapter: far closer to the merged model than to the base
        logits = [m(input_ids=ids, attention_mask=mask).logits[mask.bool()] for m in (ours, theirs, base)]
    assert (logits[1] - logits[0]).abs().max() < 0.25 * (logits[2] - logits[0]).abs().max()
    on_text = _top1(ours, theirs, ids, mask)
    noise = torch.randint(5, 128, (48, 40), generator=torch.Generator().manual_seed(11))
    on_noise = _top1(ours, theirs, noise, torch.ones_like(noise))
    print(f"top-1 agreement {outtype}: {on_text:.4f} on {int(mask.sum())} text positions, {on_noise:.4f} on noise")
    assert on_text >= 0.99, on_text
    if outtype == "f16":
        assert on_noise >= 0.99, on_noise


def _apply_lora_gguf(base_path, lora_path, out_path):
    """llama.cpp's application of a LoRA GGUF, done on the tensors: W + alpha / r * B A, r from lora_b."""
    lora = gguf.GGUFReader(lora_path)
    alpha = float(lora.fields["adapter.lora.alpha"].contents())
    pairs = {t.name: np.array(t.data) for t in lora.tensors}
    base = gguf.GGUFReader(base_path)
    writer = gguf.GGUFWriter(out_path, "llama")
    for key, field in base.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field.contents()
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, kind, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, kind)
    for t in base.tensors:
        w = np.array(t.data, dtype=np.float32)
        if f"{t.name}.lora_a" in pairs:
            a, b = pairs[f"{t.name}.lora_a"], pairs[f"{t.name}.lora_b"]
            assert a.shape == (b.shape[1], w.shape[1]) and b.shape[0] == w.shape[0]  # ne: a [in, r], b [r, out]
            w = w + (alpha / b.shape[1]) * (b @ a)
        writer.add_tensor(t.name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


LORA_CASES = {
    "plain": ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"),
    "rslora-patterns": ak.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                     use_rslora=True, rank_pattern={"layers.1.self_attn.k_proj": 2},
                                     alpha_pattern={"layers.0.self_attn.q_proj": 3}),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_gguf_holds_a_and_b_and_applies_as_the_adapter(world, tmp_path, case):
    model, tokenizer = ak.load_model(str(world["base"]))
    adapted = _randomised(ak.adapt(model, LORA_CASES[case], tokenizer=tokenizer), seed=3, scale=0.3)
    adapted.save(tmp_path / "adapter")
    lora = tmp_path / "adapter.gguf"
    assert main(["export", "--adapter", str(tmp_path / "adapter"), "--format", "gguf", "--output", str(lora)]) == 0
    reader = gguf.GGUFReader(lora)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    parts = adapted.records["default"].parts
    assert len(tensors) == 2 * len(parts)
    shape = adapted.layout.shape
    for path, part in parts.items():
        layer, kind = path.split(".")[2], path.rsplit(".", 1)[1]
        name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        a, b = tensors[f"blk.{layer}.{name}.weight.lora_a"], tensors[f"blk.{layer}.{name}.weight.lora_b"]
        expected_b = part.lora_B.detach() * (part.scaling * part.lora_A.shape[0] / 8.0)  # 1 where alpha / r holds
        heads = {"q_proj": shape.heads, "k_proj": shape.kv_heads}.get(kind)
        if heads:  # llama.cpp's rotary row order: (heads, 2, d/2) -> (heads, d/2, 2)
            expected_b = expected_b.reshape(heads, 2, -1, expected_b.shape[1]).transpose(1, 2).reshape(b.shape)
        assert np.array_equal(a, part.lora_A.detach().numpy())
        np.testing.assert_allclose(b, expected_b.numpy(), rtol=1e-6, atol=1e-7)
        if case == "plain":
            assert heads or np.array_equal(b, part.lora_B.detach().numpy())
    base = tmp_path / "base.gguf"
    plain, _ = ak.load_model(str(world["base"]))
    gguf_io.write_model(plain, tokenizer, base, "f32")
    _apply_lora_gguf(base, lora, tmp_path / "applied.gguf")
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = adapted(input_ids=ids).logits, _gguf_model(tmp_path / "applied.gguf")(input_ids=ids).logits
        assert (expected - plain(input_ids=ids).logits).abs().max() > 1e-2
    assert (got - expected).abs().max().item() < 1e-4


def test_as_is_family_reads_back(tmp_path):
    """A family llama.cpp stores without reordering (Qwen2, with q/k/v biases) reads back exactly."""
    model = tiny_model("qwen2")
    adapted = _randomised(ak.adapt(model, ak.LoraConfig(r=4, alpha=8, target_modules="all-linear")), scale=0.3)
    plain = adapted.merge_and_unload()
    gguf_io.write_model(plain, tiny_bpe(), tmp_path / "q.gguf", "f32")
    ids = torch.randint(5, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (_gguf_model(tmp_path / "q.gguf")(input_ids=ids).logits - plain(input_ids=ids).logits).abs().max()
    assert diff.item() < 1e-5


def test_ollama_folders(world):
    lora = _export(world, "ollama", "--format", "ollama")
    assert sorted(p.name for p in lora.iterdir()) == [".adapterkit-outputs.json", "Modelfile", "adapter.gguf",
                                                      "base.gguf"]
    text = (lora / "Modelfile").read_text()
    assert text.startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\nTEMPLATE \"\"\"Below is an instruction")
    assert "### Instruction:\n                {{ .Prompt }}\n" in text and 'PARAMETER stop "</s>"' in text
    assert gguf.GGUFReader(lora / "base.gguf").fields["general.type"].contents() == "model"
    base, tokenizer = ak.load_model(str(world["base"]))  # FROM is the base without the adapter (f16)
    ids, mask = _corpus(tokenizer)
    assert _top1(base, _gguf_model(lora / "base.gguf"), ids, mask) >= 0.99
    merged = _export(world, "ollama-merged", "--format", "ollama", "--merged", "--outtype", "q8_0")
    assert (merged / "Modelfile").read_text().splitlines()[:2] == ["FROM ./model.gguf", 'TEMPLATE """Below is an '
                                                                   "instruction that describes a task. Write a "
                                                                   "response that appropriately completes the "
                                                                   "request.  # noqa: E501"]


def test_ollama_chatml_and_refused_templates(world, tmp_path, capsys):
    assert chatml_system(CHATML_JINJA) == "You are a tiny model."
    config = json.loads((world["lora"] / "adapter_config.json").read_text())
    chat = tmp_path / "chat"
    shutil.copytree(world["lora"], chat)
    config["generation"] = {"template": "chat", "eos_token_id": 2, "pad_token_id": 0, "chat_template": CHATML_JINJA}
    (chat / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", "--adapter", str(chat), "--format", "ollama", "--output", str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert f'TEMPLATE """{CHATML}"""' in text and 'SYSTEM """You are a tiny model."""' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text
    odd = tmp_path / "odd"
    shutil.copytree(world["lora"], odd)
    config["generation"]["chat_template"] = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
    (odd / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["export", "--adapter", str(odd), "--format", "ollama", "--output", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not ChatML" in err[0] and "alpaca, bare, chat (ChatML)" in err[0]
    assert not (tmp_path / "o2").exists()
    assert main(["check", str(odd), "--target", "ollama"]) == 1


def _one_line_error(capsys, argv, pattern, nothing_at):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adapterkit: error:") and pattern in err[0], err
    assert not nothing_at.exists() or nothing_at.read_bytes() == b"keep", nothing_at


def test_bad_input_exits_2_with_one_line_and_writes_nothing(world, tmp_path, capsys):
    lora, out = str(world["lora"]), tmp_path / "x.gguf"
    _one_line_error(capsys, ["export", "--adapter", lora, "--format", "onnx", "--output", str(out)],
                    "--format must be one of peft, gguf, ollama", out)
    _one_line_error(capsys, ["export", "--adapter", lora, "--format", "gguf", "--merged", "--outtype", "q4_k",
                             "--output", str(out)], "--outtype must be one of f32, f16, bf16, q8_0", out)
    _one_line_error(capsys, ["check", lora, "--target", "triton"], "--target must be one of", out)
    out.write_bytes(b"keep")
    _one_line_error(capsys, ["export", "--adapter", lora, "--format", "gguf", "--output", str(out)],
                    "exists; choose another --output or pass --overwrite", out)
    _one_line_error(capsys, ["export", "--adapter", lora, "--format", "gguf", "--output", str(out), "--overwrite"],
                    "replaces only a GGUF file", out)
    out.unlink()
    damaged = tmp_path / "damaged"  # fails verify: its logits drift from its fingerprint
    shutil.copytree(world["lora"], damaged)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(damaged / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_B"))
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(damaged / "adapter_model.safetensors"))
    _one_line_error(capsys, ["export", "--adapter", str(damaged), "--format", "gguf", "--output", str(out)],
                    "fingerprint", out)
    _one_line_error(capsys, ["export", "--adapter", str(damaged), "--format", "ollama", "--output",
                             str(tmp_path / "ol")], "fingerprint", tmp_path / "ol")
    _one_line_error(capsys, ["export", "--adapter", lora, "--format", "peft", "--merged", "--output",
                             str(tmp_path / "p")], "--merged and --outtype apply to", tmp_path / "p")


def test_tokenizers_gguf_cannot_hold_are_refused(tiny_llama_dir, tmp_path, capsys):
    """The tests' character tokenizer is word-level: one line, nothing written."""
    model, tokenizer = ak.load_model(str(tiny_llama_dir))
    adapted = _randomised(ak.adapt(model, ak.LoraConfig(r=2, alpha=4), tokenizer=tokenizer))
    adapted.save(tmp_path / "a")
    out = tmp_path / "m.gguf"
    _one_line_error(capsys, ["export", "--adapter", str(tmp_path / "a"), "--format", "gguf", "--merged", "--output",
                             str(out)], "not byte-level BPE", out)
    assert main(["export", "--adapter", str(tmp_path / "a"), "--format", "gguf", "--output", str(out)]) == 0
