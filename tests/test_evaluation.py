"""Evaluation: answer extraction, scoring, contamination, task resolution, batched generation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

from adapterkit import AdapterkitError, adapt, get_method
from adapterkit.recipes.evaluate import EvalSettings, evaluate, format_table, training_file
from adapterkit.recipes.evaluate import run_eval as _run_eval
from adapterkit.tasks import (
    LETTERS,
    TASKS,
    contamination,
    extract_answer,
    infer_labels,
    is_correct,
    load_task_records,
    normalise_question,
    resolve_task,
)


def run_eval(model, adapter=None, **kw):
    if "dtype" in kw:
        kw["precision"] = kw.pop("dtype")
    return _run_eval(EvalSettings(model, adapter, **kw))


@pytest.mark.parametrize("text, expected", [
    ("The answer is 4.", "4"),
    ("He had 1,234 apples, so the answer is 1,234.", "1234"),
    ("It costs $5", "5"),
    ("The temperature fell to -3.5 degrees", "-3.5"),
    ("12 - 5 = 7", "7"),                                       # a minus between numbers is no sign
    ("The answer is 5 + 3 = 8. Q: Tom has 17 apples", "8"),    # the answer sentence, not the rambling after
    ("The answer is 18. Then 100 more were added", "18"),
    ("Answer: 42", "42"),
    ("3/4 of the cake", "0.75"),
    ("1, 2, 3", "3"),                                          # list commas are no thousands separators
    ("A: 576.0", "576"),
    ("no number here", None),
])
def test_math_extraction(text, expected):
    assert extract_answer(text, "math") == expected


def llm_adapters_letter(text):
    """LLM-Adapters' AQuA rule, for contrast: the first capital A-E anywhere."""
    found = re.findall(r"A|B|C|D|E", text)
    return found[0] if found else None


@pytest.mark.parametrize("text, expected", [
    ("As a result, the answer is (C).", "C"),
    ("Each person eats 0.09 grams of vitamin E and 0.08 grams of vitamin A.The answer is (D).", "D"),
    ("Costs rose by 3 dollars. Answer: B", "B"),
    ("By Euclid's algorithm the answer is (e)", "E"),
    ("Every value doubles to 20, so D) is right", "D"),
    ("A train travels 60 km in 1 hour, so B", "B"),           # a sentence-initial article is no option
])
def test_letter_extraction_fixes_llm_adapters(text, expected):
    assert extract_answer(text, "choice", TASKS["AQuA"].labels) == expected
    assert llm_adapters_letter(text) != expected  # each case is one LLM-Adapters gets wrong


@pytest.mark.parametrize("text, expected", [
    ("The answer is B", "B"),
    ("(A) 23 (B) 1000 ... I pick (C)", "C"),
    ("Answer choice D", "D"),
    ("I think option E is right.", "E"),
    ("The answer is a bit tricky", None),                     # lowercase "a" is a word, not an option
    ("All options are Equally wrong", None),                  # never a letter inside a word
    ("Because of the ratio, E", "E"),
])
def test_letter_extraction(text, expected):
    assert extract_answer(text, "choice", LETTERS) == expected


@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "It is untrue, so False", "false"),             # not "true" inside "untrue"
    ("boolq", "maybe", None),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("piqa", "solution3 or Solution1", "solution1"),
    ("social_i_qa", "Answer3 is best, not answer1", "answer3"),  # the first label, as LLM-Adapters
    ("social_i_qa", "answer10", None),
    ("ARC-Easy", "the correct answer is answer4", "answer4"),
    ("hellaswag", "ending2", "ending2"),
])
def test_label_extraction(task, text, expected):
    assert extract_answer(text, TASKS[task].type, TASKS[task].labels) == expected


def test_is_correct_tolerance_and_labels():
    assert is_correct("576", "576.0", "math")
    assert is_correct("1.8334", "1.8333333333333335", "math")        # within 0.001
    assert not is_correct("1.835", "1.8333333333333335", "math")
    assert not is_correct(None, "4", "math")
    assert is_correct("1234", "1,234", "math")
    assert is_correct("C", "c", "choice") and not is_correct("A", "C", "choice")
    assert is_correct("true", "True", "boolean") and not is_correct("false", "true", "boolean")
    with pytest.raises(AdapterkitError, match="unknown task type 'maths'"):
        is_correct("4", "4", "maths")


def test_contamination_counts_on_crafted_example():
    train = [{"instruction": "Tom has 3 apples.  How many apples does he have?", "input": "", "output": "3"},
             {"instruction": "Sum the numbers.", "input": "2 and 5", "output": "7"},
             {"instruction": "What is 6 times 7 ?", "input": "", "output": "42"}]
    test = [{"instruction": "tom has 3 apples. how many apples\ndoes he have", "answer": "3"},  # case, space, end ?
            {"instruction": "Tom has 4 apples. How many apples does he have?", "answer": "4"},  # another number
            {"instruction": "Sum the numbers.", "input": "2 and 5", "answer": "7"},            # with its input
            {"instruction": "Sum the numbers.", "input": "2 and 6", "answer": "8"},            # another input
            {"instruction": " What is 6 times 7? ", "answer": "42"}]
    assert normalise_question("  What is 6 times 7 ?\n") == "what is 6 times 7"
    assert contamination(test, train) == {0, 2, 4}
    assert contamination(test, []) == set()


def _one_line_error(call, *fragments):
    with pytest.raises(AdapterkitError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_bad_input_one_clear_line_each(tmp_path):
    _one_line_error(lambda: resolve_task("gsm9k"), "unknown task 'gsm9k'", "gsm8k", "AQuA",
                    "--data FILE --task-type math|choice|boolean")
    _one_line_error(lambda: resolve_task(None), "no task", "--task NAME")
    _one_line_error(lambda: resolve_task(data="x.json"), "--data FILE needs --task-type")
    _one_line_error(lambda: resolve_task("gsm8k", task_type="choice"), "gsm8k is of type math")
    _one_line_error(lambda: resolve_task("gsm8k", data_dir=tmp_path), "no test file for task gsm8k", "--data-dir")
    _one_line_error(lambda: resolve_task(data="x.json", task_type="numbers"), "unknown task type 'numbers'")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q1", "answer": "3"}, {"instruction": "q2"}]))
    _one_line_error(lambda: load_task_records(bad, "math"), "record 2 has no 'answer'")
    bad.write_text(json.dumps([{"instruction": "q1", "answer": "B"}]))
    _one_line_error(lambda: load_task_records(bad, "math"), "record 1 has answer 'B', not a number")
    missing_model = str(tmp_path / "no-model")  # each check below must fire before the model loads
    _one_line_error(lambda: run_eval(missing_model, task="gsm9k"), "unknown task 'gsm9k'")
    _one_line_error(lambda: run_eval(missing_model, task="gsm8k", batch_size=0), "--batch-size must be at least 1, got 0")
    _one_line_error(lambda: run_eval(missing_model, task="gsm8k", limit=0), "--limit must be at least 1, got 0")
    _one_line_error(lambda: run_eval(missing_model, task="gsm8k", template="vicuna"), "--template must be one of alpaca, bare, chat, got 'vicuna'")
    _one_line_error(lambda: run_eval(missing_model, task="boolq"), "no-model: no such model folder")


def test_resolve_bundled_tasks_and_labels():
    name, path, spec, kind = resolve_task("aqua")
    assert (name, kind, spec.labels, path.parts[-2:]) == ("AQuA", "choice", LETTERS, ("AQuA", "test.json"))
    assert path.is_file()
    assert resolve_task("mytask", data="f.json", task_type="math")[::3] == ("mytask", "math")
    assert resolve_task("piqa", data="f.json")[2] == TASKS["piqa"]
    assert infer_labels(["answer2", "answer3"], "choice") == ("answer1", "answer2", "answer3", "answer4", "answer5")
    assert infer_labels(["B", "E"], "choice") == LETTERS
    assert infer_labels(["solution2"], "choice") == ("solution1", "solution2")


class ScriptedModel(torch.nn.Module):
    """Answers each question with a scripted text; checks the left padding it receives."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies, self.batches = tokenizer, replies, []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        self.batches.append(input_ids.shape[0])
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            start = mask.index(1)
            assert all(mask[start:]) and all(i == pad_token_id for i in ids[:start])  # left padding only
            prompt = self.tokenizer.decode(ids[start:])
            reply = next(r for q, r in self.replies.items() if q in prompt)
            new = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
            new = new[:max_new_tokens] if len(new) >= max_new_tokens else new + [eos_token_id]
            rows.append(ids + new)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])


def test_evaluate_scores_in_original_order_and_counts_ended():
    tokenizer = tiny_tokenizer()
    records = [{"instruction": "Q one?", "answer": "4"}, {"instruction": "Q two, a longer one?", "answer": "7.0"},
               {"instruction": "Q three", "input": "with input", "answer": "10"}]
    replies = {"Q one?": "The answer is 4.", "Q two": "so 8", "Q three": "It is 10 and then it goes on and on"}
    model = ScriptedModel(tokenizer, replies)
    predictions, summary = evaluate(model, tokenizer, records, "math", batch_size=2, max_new_tokens=20,
                                    progress=False)
    assert model.batches == [2, 1]
    assert [p["index"] for p in predictions] == [0, 1, 2]
    assert [p["output"] for p in predictions] == ["The answer is 4.", "so 8", "It is 10 and then it"]
    assert [p["prediction"] for p in predictions] == ["4", "8", "10"]
    assert [p["correct"] for p in predictions] == [True, False, True]
    assert [p["ended"] for p in predictions] == [True, True, False]  # the third ran into max_new_tokens
    assert predictions[2]["input"] == "Q three\nwith input" and predictions[1]["gold"] == "7.0"
    assert summary == {"n": 3, "correct": 2, "accuracy": 2 / 3, "ended_fraction": 2 / 3, "unparsed": 0}


QUESTIONS = ["Add 1 and 2.", "What is 12 times 4? Show the steps, please.", "Hi",
             "Tom has 3 apples and buys 5 more. How many apples does Tom have now?",
             "Sum:", "Twice 21 is how much?"]


def _records():
    return [{"instruction": q, "input": "x" * (i % 3), "answer": str(i)} for i, q in enumerate(QUESTIONS)]


@pytest.mark.parametrize("method", [None, "lora", "parallel", "prefix-tuning", "prompt-tuning"])
def test_batch_size_invariance(method):
    """Left padding with the right attention mask and position ids: batch size changes nothing."""
    tokenizer, model = tiny_tokenizer(), tiny_model("llama")
    if method:
        torch.manual_seed(0)
        model = adapt(model, get_method(method).config_class(), tokenizer=tokenizer)
        for name, param in model.named_parameters():
            if "lora_B" in name or "adapter_up" in name:  # zero-initialised: make the adapter visible
                torch.nn.init.normal_(param, std=0.2)
    runs = {b: evaluate(model, tokenizer, _records(), "math", template="bare", batch_size=b, max_new_tokens=12,
                        progress=False)[0] for b in (1, 4, 16)}
    outputs = [p["output"] for p in runs[1]]
    assert len(set(outputs)) > 1  # outputs depend on the input, so equal runs say something
    assert outputs == [p["output"] for p in runs[4]] == [p["output"] for p in runs[16]]
    assert runs[1] == runs[4] == runs[16]


def test_run_eval_writes_results_and_predictions(tiny_llama_dir, tmp_path):
    data, train = tmp_path / "test.json", tmp_path / "train.json"
    data.write_text(json.dumps(_records()[:4]))
    train.write_text(json.dumps([{"instruction": "what is 12 times 4?  show the steps, PLEASE.", "input": "x",
                                  "output": "48"}]))
    out = tmp_path / "eval"
    results = run_eval(str(tiny_llama_dir), data=str(data), task_type="math", train_data=str(train),
                       output=str(out), batch_size=3, max_new_tokens=5, progress=False)
    written = json.loads((out / "results.json").read_text())
    assert written == {k: v for k, v in results.items() if k != "output"}
    for key in ("accuracy", "n", "correct", "ended_fraction", "unparsed", "contaminated", "clean_n",
                "clean_accuracy", "settings"):
        assert key in written
    assert (written["task"], written["task_type"], written["n"], written["contaminated"], written["clean_n"]) == \
           ("test", "math", 4, 1, 3)
    assert written["settings"]["batch_size"] == 3 and written["settings"]["train_data"] == str(train)
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["contaminated"] for p in lines] == [False, True, False, False]
    for p in lines:
        assert {"input", "output", "prediction", "gold", "correct", "ended"} <= set(p)
    table = format_table(results)
    assert table.splitlines()[0].split()[:4] == ["task", "type", "n", "accuracy"]
    assert table.splitlines()[1].split()[:3] == ["test", "math", "4"]


def test_training_file_from_run_json(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    assert training_file(adapter, None) == (None, None)
    train = tmp_path / "train.json"
    train.write_text("[]")
    (adapter / "run.json").write_text(json.dumps({"settings": {"data": str(train)}}))
    assert training_file(adapter, None) == (train, None)
    assert training_file(adapter, "other.json")[0].name == "other.json"  # --train-data wins
    (adapter / "run.json").write_text(json.dumps({"settings": {"data": str(tmp_path / "gone.json")}}))
    path, warning = training_file(adapter, None)
    assert path is None and "not found; contamination not checked (pass --train-data FILE)" in warning
