"""Trained token rows (--new-tokens, PEFT's trainable_token_indices) on a tiny LLaMA, tied and untied head.

The base's vocabulary is exactly the tokenizer's (100 rows), so new tokens resize it. Oracles: the base
tables before training (bit-equal rows), safetensors' own reader, a fresh base loading the saved folder,
and PEFT 0.21 loading the export (and writing its own folder) on a base resized by transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from safetensors import safe_open
from safetensors.torch import load_file
from tiny_models import tiny_config, tiny_tokenizer

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.methods.lora import LoraConfig

NEW = ["<tool>", "<eot>"]
TEXT = "a<tool>b c<eot>d<tool>"
RECORDS = [{"instruction": f"Call {a}.", "input": "", "output": f"<tool>{a}<eot>"} for a in range(12)]


def fresh_base(tied: bool) -> T.PreTrainedModel:
    """The unchanged base: its table has exactly the tokenizer's 100 rows."""
    config = tiny_config("llama")
    config.vocab_size, config.tie_word_embeddings = len(tiny_tokenizer()), tied
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tables(model) -> list[torch.Tensor]:
    """What the model looks up and projects with: every id's embedding row, and the head as [vocab, hidden]."""
    rows = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        embedded = model.get_input_embeddings()(torch.arange(rows)).clone()
        head = model.get_output_embeddings()(torch.eye(model.config.hidden_size)).t().clone()
    return [embedded, head]


def trained(tied: bool, steps: int = 4):
    """LoRA plus the new tokens' rows, trained a few Adam steps on text using them."""
    tokenizer = tiny_tokenizer()
    adapted = ak.adapt(fresh_base(tied), LoraConfig(r=2, init="gaussian", new_tokens=NEW), tokenizer=tokenizer)
    batch = tokenizer([TEXT, "<eot>xy<tool>z d<tool>"], return_tensors="pt")  # 8 tokens each
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=5e-2)
    adapted.train()
    for _ in range(steps):
        adapted(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()
    adapted.records["default"].trained_steps = steps
    return adapted, tokenizer, batch["input_ids"]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_only_the_new_rows_train(tied):
    tokenizer = tiny_tokenizer()
    base = fresh_base(tied)
    before = tables(base)  # the 100 rows of the unchanged base
    adapted = ak.adapt(base, LoraConfig(r=2, new_tokens=NEW), tokenizer=tokenizer)
    ids = adapted.records["default"].config.token_ids
    assert ids == [100, 101] and tokenizer.convert_tokens_to_ids(NEW) == ids
    assert tokenizer(TEXT)["input_ids"].count(100) == 2  # the tokenizer now keeps "<tool>" whole
    assert base.get_input_embeddings().weight.shape[0] == 102 and base.config.vocab_size == 102
    assert (base.get_output_embeddings().weight is base.get_input_embeddings().weight) == tied
    trainable = sorted(k for k, p in adapted.named_parameters() if p.requires_grad and "lora_" not in k)
    # one row table per untied table: the tied head reads the embedding part's rows
    assert len(trainable) == (1 if tied else 2) and all(k.endswith(".rows") for k in trainable)
    start = tables(adapted.causal_lm)
    batch = tokenizer([TEXT], return_tensors="pt")["input_ids"]
    optimizer = torch.optim.Adam([p for p in adapted.parameters() if p.requires_grad], lr=5e-2)
    adapted.train()
    for _ in range(3):
        adapted(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapted.eval()
    after = tables(adapted.causal_lm)
    for old, first, now in zip(before, start, after, strict=True):
        assert torch.equal(now[:100], old)          # every row of the base: bit-equal
        assert torch.equal(first[:100], old)
        assert not torch.allclose(now[100:], first[100:])  # the new rows trained
    assert torch.equal(base.get_input_embeddings().base_layer.weight[:100], before[0])  # the frozen table itself


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_saved_rows_reload_on_a_fresh_base_and_merge(tied, tmp_path):
    adapted, tokenizer, ids = trained(tied)
    want = logits(adapted, ids)
    adapted.save(tmp_path / "adapter")
    with safe_open(str(tmp_path / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    rows = {k: s for k, s in shapes.items() if k.endswith(".rows")}
    assert rows == ({"model.embed_tokens.rows": (2, 32)} if tied else
                    {"model.embed_tokens.rows": (2, 32), "lm_head.rows": (2, 32)})
    assert all(s[0] < 100 for s in shapes.values())  # no table of the vocabulary's size
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["config"]
    assert saved["new_tokens"] == NEW and saved["token_ids"] == [100, 101]

    base, fresh_tokenizer = fresh_base(tied), tiny_tokenizer()
    reloaded = ak.AdaptedModel(base)
    reloaded.tokenizer = fresh_tokenizer
    reloaded = ak.load(reloaded, tmp_path / "adapter")
    assert base.get_input_embeddings().weight.shape[0] == 102
    assert fresh_tokenizer(TEXT, return_tensors="pt")["input_ids"].tolist() == tokenizer(TEXT, return_tensors="pt")[
        "input_ids"].tolist()
    torch.testing.assert_close(logits(reloaded, ids), want, rtol=0, atol=1e-5)

    rows_trained = reloaded.adapter_state_dict()["model.embed_tokens.rows"].clone()
    plain = reloaded.merge_and_unload()
    assert isinstance(plain.get_input_embeddings(), torch.nn.Embedding)
    torch.testing.assert_close(plain.get_input_embeddings().weight[100:], rows_trained, rtol=0, atol=0)
    torch.testing.assert_close(logits(plain, ids), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_export_loads_in_peft(tied, tmp_path):
    from peft import PeftModel

    adapted, _, ids = trained(tied)
    want = logits(adapted, ids)
    ak.save(adapted, tmp_path / "peft", format="peft")
    meta = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert meta["trainable_token_indices"] == ([100, 101] if tied else
                                               {"lm_head": [100, 101], "model.embed_tokens": [100, 101]})
    resized = fresh_base(tied)
    resized.resize_token_embeddings(102)  # PEFT's users resize the base themselves; its new rows are random
    model = PeftModel.from_pretrained(resized, tmp_path / "peft").eval()
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_folder_with_trainable_tokens_loads_in_adapterkit(tied, tmp_path):
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(NEW)
    resized = fresh_base(tied)
    resized.resize_token_embeddings(len(tokenizer))
    indices = [100, 101] if tied else {"embed_tokens": [100, 101], "lm_head": [100, 101]}
    torch.manual_seed(5)
    model = get_peft_model(resized, PeftLora(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                             trainable_token_indices=indices))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # rows unlike the base's
    model.save_pretrained(tmp_path / "peft")
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"]
    want = logits(model.eval(), ids)

    base = fresh_base(tied)
    adapted = ak.load(base, tmp_path / "peft")
    assert base.get_input_embeddings().weight.shape[0] == 102
    torch.testing.assert_close(logits(adapted, ids), want, rtol=0, atol=1e-5)


def _args(model_dir, data, output, tokens):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output", str(output), "--batch-size", "4",
            "--micro-batch-size", "2", "--max-steps", "3", "--learning-rate", "5e-2", "--cutoff-len", "32",
            "--val-set-size", "0", "--warmup-steps", "0", "--template", "bare", "--precision", "fp32",
            "--new-tokens", tokens]


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    fresh_base(False).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS))
    return folder, data


def test_cli_trains_and_generate_reads_the_tokens(model_dir, tmp_path):
    folder, data = model_dir
    assert main(_args(folder, data, tmp_path / "run", "<tool>,<eot>")) == 0
    adapter = tmp_path / "run" / "last"
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert tuple(f.get_slice("model.embed_tokens.rows").get_shape()) == (2, 32)
    model, tokenizer = ak.load_model(str(folder))  # unchanged: 100 rows, no "<tool>"
    assert "<tool>" not in tokenizer.get_vocab()
    adapted = ak.AdaptedModel(model)
    adapted.tokenizer = tokenizer
    ak.load(adapted, adapter)
    assert tokenizer.convert_tokens_to_ids(NEW) == [100, 101] and model.config.vocab_size == 102
    ids = tokenizer([TEXT], return_tensors="pt")["input_ids"]
    want = logits(adapted, ids)
    assert main(["merge", "--adapter", str(adapter), "--model", str(folder), "--output", str(tmp_path / "merged")]) == 0
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # plain transformers
    merged_tokenizer = T.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == 102
    assert merged_tokenizer(TEXT, return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    torch.testing.assert_close(logits(merged, ids), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tokens, says", [("a", "'a' is already in the vocabulary"),
                                          ("<tool>,</s>", "'</s>' is already in the vocabulary"),
                                          ("", "empty token"), ("<x>,<x>", "twice")])
def test_bad_new_tokens_exit_2_writing_nothing(model_dir, tmp_path, capsys, tokens, says):
    folder, data = model_dir
    out = tmp_path / "run"
    assert main(_args(folder, data, out, tokens)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], lines
    assert not out.exists()


def test_bad_tokens_in_the_api():
    with pytest.raises(AdapterkitError, match="empty token"):
        LoraConfig(new_tokens=["<a>", " "])
    with pytest.raises(AdapterkitError, match="tokenizer"):
        ak.adapt(fresh_base(False), LoraConfig(new_tokens=["<a>"]))  # no tokenizer to add them to


def test_resume_continues_the_rows_bit_identically(model_dir, tmp_path):
    import shutil

    folder, data = model_dir
    for run in ("whole", "resumed"):
        assert main([*_args(folder, data, tmp_path / run, "<tool>,<eot>"), "--save-steps", "2", "--max-steps",
                     "4"]) == 0
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000004")
    shutil.rmtree(tmp_path / "resumed" / "last")
    assert main([*_args(folder, data, tmp_path / "resumed", "<tool>,<eot>"), "--save-steps", "2", "--max-steps", "4",
                 "--resume", "auto"]) == 0  # a fresh base and tokenizer: the tokens get the same ids again
    whole, resumed = (load_file(tmp_path / run / "last" / "adapter_model.safetensors") for run in ("whole", "resumed"))
    assert sorted(k for k in whole if k.endswith(".rows")) == ["lm_head.rows", "model.embed_tokens.rows"]
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_mixed_batch_rows_equal_their_own_runs(tied):
    adapted, tokenizer, ids = trained(tied)
    ak.adapt(adapted, LoraConfig(r=2, init="gaussian"), name="plain")
    names = ["default", "plain"]
    mixed = adapted(input_ids=ids, adapter_names=names).logits.detach()
    for row, name in enumerate(names):
        adapted.set_active(name)
        torch.testing.assert_close(mixed[row], logits(adapted, ids[row:row + 1])[0], rtol=0, atol=1e-5)
