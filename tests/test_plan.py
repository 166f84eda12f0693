"""`adapterkit plan`: its accounting against exact counts from the real model (the sum of numel x element
size of what a loaded model holds, the trainable parameters of the real adapted model), its table and
its micro-batch suggestion. Its prediction of a measured peak is checked by the benchmark
(python -m adapterkit.bench.memory, BENCHMARKS.md), not here: a tiny model's peak is the runtime's."""

from __future__ import annotations

import pytest
import torch

import adapterkit as ak
from adapterkit.cli import main
from adapterkit.errors import AdapterkitError
from adapterkit.recipes.plan import PlanSettings, meta_model, parse_size, plan, weight_bytes

METHODS = {"lora": {}, "adapter-h": {}, "parallel": {}, "prompt-tuning": {}, "p-tuning-v2": {}, "ia3": {},
           "prefix-tuning": {"encoder_hidden_size": 16}}


def _exact_bytes(model: torch.nn.Module) -> int:
    """What the loaded model's tensors occupy: parameters and buffers, and a 4-bit layer's absmax (with
    the absmax of those under double quantization)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
            state = getattr(t, "quant_state", None)
            if state is not None:
                total += state.absmax.numel() * state.absmax.element_size()
                if state.state2 is not None:
                    total += state.state2.absmax.numel() * state.state2.absmax.element_size()
            scales = getattr(t, "SCB", None)
            if scales is not None:
                total += scales.numel() * scales.element_size()
    return total


@pytest.fixture(scope="module")
def wide_llama_dir(tmp_path_factory):
    """A tiny LLaMA 64 wide (bitsandbytes' 4-bit blocks are 64 inputs), 4 layers deep (checkpointing saves
    memory from about 3 layers on)."""
    import transformers as T
    from tiny_models import tiny_config, tiny_tokenizer

    config = T.LlamaConfig(**{**tiny_config("llama").to_dict(), "hidden_size": 64, "intermediate_size": 128,
                              "head_dim": 16, "num_hidden_layers": 4})
    folder = tmp_path_factory.mktemp("tiny-llama-64-plan")
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_weight_bytes_equal_the_loaded_models(wide_llama_dir, dtype):
    model, _ = ak.load_model(str(wide_llama_dir), dtype)
    predicted = weight_bytes(meta_model(str(wide_llama_dir), model.dtype), "none")
    assert predicted["quantized"] == 0
    assert predicted["other"] == _exact_bytes(model)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantized_weight_bytes_equal_the_loaded_models(wide_llama_dir, quantize):
    model, _ = ak.load_model(str(wide_llama_dir), "fp32", quantize)
    predicted = weight_bytes(meta_model(str(wide_llama_dir), torch.float32), quantize)
    assert predicted["quantized"] > 0
    exact = _exact_bytes(model)
    assert abs(sum(predicted.values()) - exact) <= 0.01 * exact, (predicted, exact)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trainable_count_equals_the_real_adapted_models(tiny_llama_dir, method):
    model, tokenizer = ak.load_model(str(tiny_llama_dir))
    base = sum(p.numel() for p in model.parameters())
    config = ak.get_method(method).config_class(**METHODS[method])
    adapted = ak.adapt(model, config, tokenizer=tokenizer)
    real = adapted.trainable_parameters()[0]
    result = plan(PlanSettings(model=str(tiny_llama_dir), method=method, options=METHODS[method], precision="fp32"))
    assert result["trainable"] == real
    assert result["base_parameters"] == base


def test_checkpointing_and_nf4_shrink_the_prediction_and_micro_batches_grow_it(wide_llama_dir):
    def parts(**kw):
        return plan(PlanSettings(model=str(wide_llama_dir), precision="fp32", seq=512, batch=8, **kw))["parts"]

    def total(**kw):
        return sum(parts(**kw).values())

    def weights(**kw):
        return sum(v for k, v in parts(**kw).items() if k.startswith("weights"))

    assert parts(gradient_checkpointing=True)["activations"] < parts()["activations"]
    assert weights(quantize="nf4") < weights(quantize="int8") < weights()  # the runtime grows: bitsandbytes
    assert total(micro_batch_size=1) < total(micro_batch_size=2) < total(micro_batch_size=8)


def test_memory_limit_gives_the_largest_micro_batch_that_fits(wide_llama_dir):
    base = dict(model=str(wide_llama_dir), precision="fp32", seq=256, batch=16)
    sizes = {m: plan(PlanSettings(**base, micro_batch_size=m))["total"] for m in (3, 4)}
    limit = (sizes[3] + sizes[4]) // 2
    assert plan(PlanSettings(**base, memory_limit=str(limit)))["largest_micro_batch"] == 3
    assert plan(PlanSettings(**base, memory_limit="1KB"))["largest_micro_batch"] is None


def test_cli_prints_the_table(wide_llama_dir, capsys):
    assert main(["plan", "--model", str(wide_llama_dir), "--method", "lora", "--quantize", "nf4", "--seq", "128",
                 "--batch", "8", "--gradient-checkpointing", "--memory-limit", "4GB", "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    for part in ("runtime", "weights (quantized linears)", "adapter + grads + AdamW", "activations",
                 "logits and loss", "predicted peak", "largest micro-batch within 3.73 GiB: 8"):
        assert part in out, out


def test_sizes():
    assert parse_size("4GB") == 4 * 10 ** 9
    assert parse_size("3.5GiB") == int(3.5 * 2 ** 30)
    assert parse_size("800 mb") == 800 * 10 ** 6
    assert parse_size("123") == 123
    for bad in ("lots", "-1GB", "0", "4 GBB", ""):
        with pytest.raises(AdapterkitError, match="--memory-limit"):
            parse_size(bad)


def test_loading_that_casts_the_weights_is_its_own_peak(wide_llama_dir):
    """An fp32 folder loaded in bf16: the load holds the file's pages and the bf16 copy at once, so the
    load's prediction is the runtime, the weights and the whole file; loaded in fp32 nothing is cast."""
    file_bytes = sum(f.stat().st_size for f in wide_llama_dir.glob("*.safetensors"))
    assert file_bytes > 4 * sum(p.numel() for p in meta_model(str(wide_llama_dir), torch.float32).parameters()) * 0.99

    def loading(precision: str) -> int:
        result = plan(PlanSettings(model=str(wide_llama_dir), precision=precision, seq=8, batch=1))
        assert result["total"] == max(result["load_peak"], sum(result["parts"].values()))
        parts = result["parts"]
        return result["load_peak"] - parts["runtime"] - parts["weights (other)"] - parts["weights (quantized linears)"]

    assert loading("bf16") == file_bytes
    assert loading("fp32") == 0
