"""Prompt templates and label masks: the labels are exactly the response and the end token."""

import pytest
from tiny_models import tiny_tokenizer

from adapterkit.data import IGNORE, Template, alpaca_prompt, collate, encode

RECORD = {"instruction": "Add 2 and 3.", "input": "", "output": "\nA: 2 + 3 = 5. The answer is 5."}


def test_alpaca_template_is_llm_adapters_byte_for_byte():
    expected = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                "the request.  # noqa: E501\n\n                ### Instruction:\n                Add 2 and 3.\n"
                "                \n                ### Response:\n                ")
    assert alpaca_prompt("Add 2 and 3.") == expected
    assert "paired with an input" in alpaca_prompt("Q", "context") and "### Input:\n                context" in \
        alpaca_prompt("Q", "context")


@pytest.mark.parametrize("template", ["alpaca", "bare", "chat"])
def test_labels_are_response_then_end_token_when_pad_is_eos(template):
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # the default model's situation: pad id == end id
    tokenizer.chat_template = "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}>"
    example = encode(RECORD, tokenizer, Template(template), cutoff=1024)
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    kept = [t for t in example["labels"] if t != IGNORE]
    assert tokenizer.decode(kept) == RECORD["output"] + "</s>"
    short_example = encode({**RECORD, "output": "5"}, tokenizer, Template(template), cutoff=1024)
    batch = collate([example, short_example], tokenizer.pad_token_id)
    short = batch["labels"][1]
    assert (short == tokenizer.eos_token_id).sum() == 1  # padding (same id) is masked, the real end is kept
    # The short row is its example, then padding on the right: attention 0 and label IGNORE there.
    n, width = len(short_example["input_ids"]), len(example["input_ids"])
    assert n < width and batch["input_ids"].shape == (2, width)
    pad = width - n
    assert batch["input_ids"][1].tolist() == short_example["input_ids"] + [tokenizer.pad_token_id] * pad
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * pad
    assert short.tolist() == short_example["labels"] + [IGNORE] * pad
    assert batch["attention_mask"][0].tolist() == [1] * width and batch["labels"][0].tolist() == example["labels"]


def test_train_on_inputs_keeps_prompt_labels():
    tokenizer = tiny_tokenizer()
    example = encode(RECORD, tokenizer, Template("bare"), train_on_inputs=True)
    assert example["labels"] == example["input_ids"]


def test_cutoff_keeps_the_end_token():
    tokenizer = tiny_tokenizer()
    example = encode(RECORD, tokenizer, Template("bare"), cutoff=20)
    assert len(example["input_ids"]) == 20 and example["labels"][-1] == tokenizer.eos_token_id


def test_jsonl_parquet_and_saved_hf_datasets_read_alike(tmp_path):
    import datasets

    from adapterkit.data import read_records

    rows = [RECORD, {**RECORD, "instruction": "Add 1 and 1.", "output": "2"}]
    (tmp_path / "d.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    for source in ("d.jsonl", "d.parquet", "saved"):
        assert read_records(tmp_path / source) == rows, source
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n{oops\n')
    with pytest.raises(Exception, match="line 2 is not valid JSON"):
        read_records(tmp_path / "bad.jsonl")
