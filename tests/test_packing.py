"""--packing: several records per row, kept apart by their own positions and a block-diagonal mask."""

import json

import torch
from tiny_models import save_tiny, tiny_model

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.data import IGNORE, collate
from adapterkit.packing import collate_packed, pack


def _examples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 128, (n,), generator=generator).tolist()
        prompt = n // 3
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def _token_losses(logits, labels):
    """Loss of every position that predicts a label (shifted), IGNORE elsewhere -> 0."""
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets.clamp(min=0), reduction="none")
    return loss * (targets != IGNORE)


def _lora_model():
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in adapted.adapter_state_dict().values():
            p.normal_(0, 0.2)
    return adapted.eval()


def test_packed_losses_per_record_equal_the_unpacked_ones():
    model, examples = _lora_model(), _examples([9, 5, 12, 7, 6])
    rows = pack(examples, width=24)
    assert [r["lengths"] for r in rows] == [[12, 9], [7, 6, 5]]  # best fit, longest first
    assert [r["records"] for r in rows] == [[2, 0], [3, 4, 1]]
    batch = collate_packed(rows, pad_id=0)
    with torch.no_grad():
        packed = _token_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"]).logits, batch["labels"])
    for r, row in enumerate(rows):
        start = 0
        for n, index in zip(row["lengths"], row["records"], strict=True):
            alone = collate([examples[index]], pad_id=0)
            with torch.no_grad():
                expected = _token_losses(model(**{k: alone[k] for k in ("input_ids", "attention_mask")}).logits,
                                         alone["labels"]).sum()
            got = packed[r, start:start + n - 1].sum()  # positions inside the record predict its own tokens
            assert abs(got.item() - expected.item()) <= 1e-4
            start += n
    assert batch["tokens"].item() == sum(len(e["input_ids"]) for e in examples)


def test_no_attention_across_records():
    model, examples = _lora_model(), _examples([8, 8])
    rows = pack(examples, width=16)
    changed = [dict(e) for e in examples]
    changed[0] = {**changed[0], "input_ids": [3 + (t + 5) % 120 for t in changed[0]["input_ids"]]}
    with torch.no_grad():
        a, b = (model(**{k: v for k, v in collate_packed(pack(x, 16), 0).items() if k != "labels" and k != "tokens"})
                .logits for x in (examples, changed))
    assert len(rows) == 1
    assert (a[0, :8] - b[0, :8]).abs().max() > 1e-3  # the perturbed record changes ...
    assert torch.equal(a[0, 8:], b[0, 8:])            # ... and the other record does not see it


def _data(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": f"Add {a} and {b}.", "output": f"It is {a + b}."}
                                for a in range(5) for b in range(5)]))
    return path


def _train(model_dir, data, out, *extra):
    return main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(out), "--batch-size", "4",
                 "--micro-batch-size", "2", "--max-steps", "3", "--learning-rate", "1e-2", "--warmup-steps", "0",
                 "--val-set-size", "0", "--template", "bare", "--cutoff-len", "64", "--precision", "fp32", *extra])


def test_train_with_packing_and_its_refusals(tiny_llama_dir, tmp_path, capsys):
    data = _data(tmp_path)
    assert _train(tiny_llama_dir, data, tmp_path / "packed", "--packing") == 0
    assert "packed rows" in capsys.readouterr().out
    assert _train(tiny_llama_dir, data, tmp_path / "prompt", "--packing", "--method", "prompt-tuning") == 2
    assert "--packing keeps records apart" in capsys.readouterr().err
    sliding = save_tiny("gemma2", tmp_path / "gemma2")  # sliding-window layers: the mask would be wrong
    assert _train(sliding, data, tmp_path / "g", "--packing") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not keep packed records apart" in err
    assert not (tmp_path / "g").exists() or not any((tmp_path / "g").iterdir())
