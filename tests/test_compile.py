"""torch.compile: a compiled adapted model gives the eager logits; hot-swapping saved weights of the
same settings runs them without a recompilation (a counting backend sees every graph compiled); a
hot-swap of other settings is one clear error and changes nothing."""

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.io import hotswap


class CountingBackend:
    """A torch.compile backend that runs the captured graph as it is and counts the compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return graph.forward


def _saved(tmp_path, name, seed, **settings):
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(**settings), name=name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in adapted._parameters_of(adapted.records[name]).values():
            p.add_(torch.randn_like(p) * 0.3)
    ids = tiny_batch(batch=2, length=8)["input_ids"]
    logits = adapted.eval()(input_ids=ids).logits
    return adapted.save(tmp_path / name), logits, ids


@torch.no_grad()
def test_hotswap_into_a_compiled_model_needs_no_recompilation(tmp_path):
    folder_a, logits_a, ids = _saved(tmp_path, "a", 1, r=4, alpha=8)
    folder_b, logits_b, _ = _saved(tmp_path, "b", 2, r=4, alpha=8)
    adapted = ak.load(tiny_model("llama"), folder_a, name="served").eval()
    backend = CountingBackend()
    adapted.compile(backend=backend)
    torch.testing.assert_close(adapted(input_ids=ids).logits, logits_a, atol=1e-5, rtol=0)
    compiled = backend.graphs
    assert compiled >= 1  # the compiled path did run
    hotswap(adapted, folder_b, "served")
    torch.testing.assert_close(adapted(input_ids=ids).logits, logits_b, atol=1e-5, rtol=0)
    assert backend.graphs == compiled, "hot-swapping weights of the same shapes recompiled the model"
    assert adapted.active == ["served"] and list(adapted.records) == ["served"]


def test_hotswap_of_other_settings_is_refused(tmp_path):
    folder_a, logits_a, ids = _saved(tmp_path, "a", 1, r=4, alpha=8)
    folder_c, _, _ = _saved(tmp_path, "c", 3, r=4, alpha=16)
    adapted = ak.load(tiny_model("llama"), folder_a, name="served").eval()
    with pytest.raises(ak.AdapterkitError, match=r"cannot hot-swap .* alpha 16.* \(not 8"):
        hotswap(adapted, folder_c, "served")
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=ids).logits, logits_a, atol=1e-6, rtol=0)
    assert list(adapted.records) == ["served"] and adapted.active == ["served"]


def test_compiled_training_steps_equal_eager_ones():
    losses = {}
    for compiled in (False, True):
        adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4))
        if compiled:
            adapted.compile(backend=CountingBackend())
        optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
        batch = tiny_batch(batch=2, length=8)
        losses[compiled] = []
        for _ in range(3):
            loss = adapted(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[compiled].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    assert losses[False][-1] < losses[False][0]


def test_generate_flag_compiles_the_adapted_model(tmp_path, monkeypatch, capsys):
    from tiny_models import save_tiny

    from adapterkit.cli import main

    model_dir = save_tiny("llama", tmp_path / "model")
    folder, _, _ = _saved(tmp_path, "a", 1, r=4, alpha=8)
    args = ["generate", "--model", str(model_dir), "--adapter", str(folder), "--prompt", "Add 1 and 2.",
            "--max-new-tokens", "5"]
    assert main(args) == 0
    eager = capsys.readouterr().out
    called = []  # the flag reaches AdaptedModel.compile (whose compiled runs the tests above check)
    monkeypatch.setattr(ak.AdaptedModel, "compile", lambda self, **kw: called.append(self))
    assert main([*args, "--compile"]) == 0
    assert len(called) == 1 and capsys.readouterr().out == eager


def test_train_flag_compiles_and_trains_the_same_adapter(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import json

    from safetensors.torch import load_file

    from adapterkit.cli import main

    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"}
                                for a in range(4) for b in range(4)]))
    args = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--batch-size", "4", "--micro-batch-size",
            "4", "--max-steps", "2", "--learning-rate", "1e-2", "--val-set-size", "0", "--lora-dropout", "0",
            "--precision", "fp32", "--template", "bare"]
    assert main([*args, "--output", str(tmp_path / "eager")]) == 0
    backend = CountingBackend()
    original = ak.AdaptedModel.compile
    monkeypatch.setattr(ak.AdaptedModel, "compile", lambda self, **kw: original(self, backend=backend))
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path / "compiled"), "--compile"]) == 0
    printed = capsys.readouterr()
    assert backend.graphs >= 1 and "torch.compile: the first step took" in printed.out + printed.err
    eager, compiled = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], atol=1e-5, rtol=0)
