"""`adapterkit plan`: the peak memory of a training run, predicted without running the model.

The model is built on the meta device from its config (no weights are read, nothing is computed), the
method attaches to it as it would to the real model, and the prediction adds up:

- weights: each parameter by the dtype it is stored in; with --quantize the linear layers bitsandbytes
  converts (transformers' rule: not the output head, not tied weights) at 1 byte (int8, plus an fp32 scale a
  row) or 0.5 byte (nf4, plus its absmax: one byte a block of 64 and an fp32 value a block of 256 of those);
- the adapter: fp32 weights, their gradients and AdamW's two moments (16 bytes a parameter);
- activations per layer and token, in the compute dtype: the two normalisations' fp32 inputs, queries,
  keys, values and the attention output, the MLP's inner tensors, the inputs of the adapter's own matrices
  (what autograd keeps to compute their gradients), and the attention's per-head statistics (in bf16 on a
  CPU, for short rows, the attention probabilities: see attention.py); with
  gradient checkpointing only each layer's input, plus one layer recomputed in the backward pass with
  its backward;
- logits and loss: where the loss takes over the output head (training/loss.py's `fused_head`), one block
  of rows' logits and log-softmax and the rows' gradient; elsewhere the logits of one micro-batch with
  their gradient (fp32: also the log-softmax);
- a fixed baseline for Python, torch, transformers and the tokenizer (bitsandbytes adds a little);
- the peak is the larger of that sum and the load's own peak, which is higher where loading casts the
  stored weights (the default model's fp32 cache loaded in bf16: its file and the bf16 copy at once).

The constants were measured on the default model with the benchmark (python -m adapterkit.bench.memory),
whose tables in BENCHMARKS.md put each prediction next to a measured peak on three model sizes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..architectures import ModelLayout, architecture_of, is_linear, linear_shape
from ..attention import applies_to, saved_bytes
from ..core import AdaptedModel
from ..errors import AdapterkitError
from ..hardware import resolve_precision
from ..methods import get_method
from ..models import DEFAULT_MODEL, default_model_folder
from ..quantization import QUANTIZE
from ..settings import check_fields, option
from ..sites import INPUTS
from ..training.loss import LOSS_BLOCK_ROWS, fused_head
from .train import method_config

GIB = 1024 ** 3
BASELINE = int(0.36 * GIB)        # python + torch + transformers + tokenizer, resident after loading a model
BASELINE_QUANTIZED = int(0.08 * GIB)  # bitsandbytes and its CPU backend on top
NF4_BLOCK, NF4_BLOCK2 = 64, 256   # bitsandbytes' NF4 block sizes (absmax, and absmax of absmax)
ACTIVATION_FACTOR = 1.58          # measured peak over counted activations and logits (backward temporaries, allocator)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
          "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}


@dataclass
class PlanSettings:
    model: str = option(DEFAULT_MODEL, "base model: the default, a local Hugging Face folder or a hub id")
    method: str = option("lora", "the method (see `adapterkit methods`)")
    options: dict = option({}, "the method's options, e.g. r=16,alpha=32 or JSON")
    quantize: str = option("none", "the frozen base's linear layers stored as int8 or nf4", choices=QUANTIZE)
    gradient_checkpointing: bool = option(False, "recompute each layer in backward")
    seq: int = option(256, "tokens a row (train's --cutoff-len)", minimum=1)
    batch: int = option(8, "rows a step (train's --batch-size)", minimum=1)
    micro_batch_size: int | None = option(None, "rows a forward pass (default: train's 4, at most the batch)",
                                          minimum=1)
    precision: str = option("auto", "as train's --precision: auto, fp32 or bf16", choices=("auto", "fp32", "bf16"))
    memory_limit: str | None = option(None, "memory to fit in, e.g. 4GB, 3.5GiB, 800MB: also print the largest "
                                      "micro-batch that fits")
    json: bool = option(False, "print JSON instead of a table")

    def __post_init__(self) -> None:
        check_fields(self)
        get_method(self.method)  # an unknown method is one line before any work
        if self.memory_limit is not None:
            parse_size(self.memory_limit)
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch:
            raise AdapterkitError(f"--micro-batch-size {self.micro_batch_size} exceeds --batch {self.batch}")


def parse_size(text: str) -> int:
    """Bytes of '4GB' (10^9), '4GiB' (2^30), '800 MB', '1.5g', '123456'."""
    match = _SIZE.match(str(text))
    if not match:
        raise AdapterkitError(f"--memory-limit {text!r} is not a size; write it like 4GB, 3.5GiB or 800MB")
    unit = (match.group(2) or "").lower().removesuffix("b")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise AdapterkitError(f"--memory-limit {text!r} must be more than 0 bytes")
    return value


def _folder(name: str) -> Path:
    """Where a model named on the command line lives: the default model's cache, else the name itself."""
    return default_model_folder() if name == DEFAULT_MODEL else Path(name)


def meta_model(name: str, dtype: torch.dtype) -> nn.Module:
    """The model built from its config on the meta device: shapes and dtypes, no storage."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(_folder(name)))
    except (OSError, ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AdapterkitError(f"{name}: no model config to read ({first}); pass a model folder with config.json, a "
                              f"reachable hub id or '{DEFAULT_MODEL}'") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def cast_on_load_bytes(name: str, dtype: torch.dtype, quantize: str) -> int:
    """The stored weights' bytes where loading casts them (files in another dtype than the one loaded, no
    quantization): transformers reads every stored byte, and the file's pages count in the process's
    memory, while the cast copies are made. 0 where nothing is cast or the files are not local."""
    folder = _folder(name)
    if quantize != "none" or not (folder / "config.json").is_file():
        return 0
    config = json.loads((folder / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype")
    if not isinstance(stored, str) or getattr(torch, stored, None) in (None, dtype):
        return 0
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _quantized_linears(model: nn.Module) -> list[nn.Module]:
    """The linear layers transformers' bitsandbytes integration converts (its own exclusion rule)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = get_keys_to_not_convert(model)
        return [m for path, m in model.named_modules() if is_linear(m) and should_convert_module(path, skip)]
    except ImportError:  # another transformers: the output head is the one left out
        head = model.get_output_embeddings()
        return [m for m in model.modules() if is_linear(m) and m is not head]


def weight_bytes(model: nn.Module, quantize: str) -> dict[str, int]:
    """Bytes of the base's parameters and buffers by how they are stored."""
    quantized = {id(m.weight): m for m in _quantized_linears(model)} if quantize != "none" else {}
    out = {"quantized": 0, "other": 0}
    seen: set[int] = set()
    for p in [*model.parameters(), *model.buffers()]:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) not in quantized:
            out["other"] += p.numel() * p.element_size()
            continue
        n = p.numel()
        if quantize == "int8":
            out["quantized"] += n + 4 * linear_shape(quantized[id(p)])[1]  # int8 weights + an fp32 scale a row
        else:
            blocks = -(-n // NF4_BLOCK)
            out["quantized"] += -(-n // 2) + blocks + 4 * -(-blocks // NF4_BLOCK2)  # 4-bit, uint8 absmax, fp32 of those
    return out


def adapter_inputs(adapted: AdaptedModel, name: str = "default") -> int:
    """Elements a token, over all layers, that the adapter's own matrices keep for their gradients: the
    input width of each matrix (and vector) at a module site, once per input that several of them read
    (same parent module, same width)."""
    seen, total = set(), 0
    for path, part in adapted.records[name].parts.items():
        if path == INPUTS:
            continue
        parent = path.rpartition(".")[0]
        for pname, p in part.named_parameters():
            if p.dim() > 2:
                continue
            width = p.shape[-1] if p.dim() == 2 else p.shape[0]
            key = (parent, width, pname.rpartition(".")[2])
            if key not in seen and (parent, width) not in seen:
                seen.update({key, (parent, width)})
                total += width
    return total


def activation_elements(layout: ModelLayout) -> dict[str, int]:
    """Per layer and token: elements the base's layer keeps for backward (fp32 ones counted apart)."""
    model, s = layout.model, layout.shape
    layer = model.get_submodule(layout.layer_path(0))
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    inner = [linear_shape(model.get_submodule(f"{layout.layer_path(0)}.{p}"))[1] for p in layout.arch.mlp_in
             if is_linear(model.get_submodule(f"{layout.layer_path(0)}.{p}"))]
    if len(inner) >= 2:   # gated MLP: gate, up and act(gate)
        mlp = 3 * inner[0]
    elif inner:           # one input projection: its output, act's input (a fused gate+up: both halves and act)
        fused = "gate" in layout.arch.mlp_in[0]
        mlp = 3 * inner[0] // 2 if fused else inner[0]
    else:                 # a mixture-of-experts block: count its MLP weights' widths per token, roughly
        mlp = 3 * s.hidden
    norms = sum(1 for m in layer.modules() if "norm" in type(m).__name__.lower())
    return {"compute": 2 * q + 2 * kv + mlp, "fp32": norms * s.hidden + s.heads}


def plan(settings: PlanSettings) -> dict:
    """The predicted peak and its parts, in bytes."""
    precision = resolve_precision(settings.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    element = 2 if precision == "bf16" else 4
    config = method_config(settings.method, settings.options)
    model = meta_model(settings.model, dtype)
    attention_applies = applies_to(model)  # load_model installs the CPU training attention on such a model
    architecture_of(model)  # an unsupported family is the table's own one-line error
    weights = weight_bytes(model, settings.quantize)
    base_parameters = sum(p.numel() for p in model.parameters())
    adapted = AdaptedModel(model)
    adapted.add_adapter(config, weights_follow=True)  # starting values that need no forward pass
    trainable = adapted.trainable_parameters()[0]
    layout, vocab = adapted.layout, model.get_output_embeddings().weight.shape[0]
    per_token = activation_elements(layout)
    adapter_per_token = adapter_inputs(adapted)
    virtual = getattr(config, "num_virtual_tokens", 0) or 0
    fused = fused_head(adapted) is not None  # training fuses the head with the loss

    def activations(micro: int) -> dict[str, int]:
        tokens, layers = micro * (settings.seq + virtual), layout.shape.layers
        layer = tokens * (element * (per_token["compute"] + adapter_per_token / layers) + 4 * per_token["fp32"])
        if precision == "bf16" and attention_applies:  # the CPU training attention's
            layer += saved_bytes(micro, layout.shape.heads, settings.seq + virtual, settings.seq + virtual)
        kept, inputs = (layers + 1) * layer, 0
        if settings.gradient_checkpointing:  # each layer's input, and one layer recomputed with its backward
            # (measured on the 1.1B shape up to 4,096 tokens with the training loop's allocator setting for
            # checkpointing, which keeps the heap from growing past what is live: BENCHMARKS.md, long context)
            inputs = layers * tokens * element * layout.shape.hidden
            if inputs + ACTIVATION_FACTOR * layer < ACTIVATION_FACTOR * kept:
                kept = layer
            else:
                inputs = 0
        if fused:  # one block's logits and fp32 log-softmax at a time, and the rows' gradient
            logits = LOSS_BLOCK_ROWS * vocab * (element + 4) + 2 * tokens * layout.shape.hidden * element
        else:
            logits = tokens * vocab * (3 * 4 if precision == "fp32" else 2 * 2) + (
                0 if precision == "fp32" else 2 * LOSS_BLOCK_ROWS * vocab * 4)
        return {"activations": int(inputs + ACTIVATION_FACTOR * kept), "logits and loss": int(ACTIVATION_FACTOR * logits)}

    fixed = {"runtime": BASELINE + (BASELINE_QUANTIZED if settings.quantize != "none" else 0),
             "weights (quantized linears)": weights["quantized"], "weights (other)": weights["other"],
             "adapter + grads + AdamW": 16 * trainable + (2 * trainable if precision == "bf16" else 0)}
    micro = settings.micro_batch_size or min(4, settings.batch)
    parts = {**fixed, **activations(micro)}
    # loading may peak above training: an fp32 folder loaded in bf16 holds the files' pages and the copies
    load = fixed["runtime"] + weights["quantized"] + weights["other"] + cast_on_load_bytes(
        settings.model, dtype, settings.quantize)
    result = {"model": settings.model, "method": settings.method, "quantize": settings.quantize,
              "precision": precision, "gradient_checkpointing": settings.gradient_checkpointing, "seq": settings.seq,
              "batch": settings.batch, "micro_batch_size": micro, "trainable": trainable,
              "base_parameters": base_parameters,
              "parts": parts, "load_peak": load, "total": max(sum(parts.values()), load)}
    if settings.memory_limit is not None:
        limit = parse_size(settings.memory_limit)
        fits = [m for m in range(1, settings.batch + 1)
                if max(load, sum(fixed.values()) + sum(activations(m).values())) <= limit]
        result["memory_limit"] = limit
        result["largest_micro_batch"] = max(fits) if fits else None
    return result


def render(result: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(result, indent=2)
    lines = [f"{result['model']}: {result['method']} ({result['trainable']:,} trainable), base {result['precision']}"
             + (f" + {result['quantize']}" if result["quantize"] != "none" else "")
             + (", gradient checkpointing" if result["gradient_checkpointing"] else "")
             + f", {result['batch']} x {result['seq']} tokens in micro-batches of {result['micro_batch_size']}",
             f"{'part':<30} {'GiB':>8}"]
    lines += [f"{name:<30} {value / GIB:>8.3f}" for name, value in result["parts"].items()]
    if result["load_peak"] >= sum(result["parts"].values()):
        lines.append(f"{'loading (casts the weights)':<30} {result['load_peak'] / GIB:>8.3f}")
    lines.append(f"{'predicted peak':<30} {result['total'] / GIB:>8.3f}")
    if "memory_limit" in result:
        best, limit = result["largest_micro_batch"], result["memory_limit"] / GIB
        lines.append(f"largest micro-batch within {limit:.2f} GiB: {best}" if best else
                     f"nothing fits within {limit:.2f} GiB, not even micro-batch 1"
                     + ("" if result["gradient_checkpointing"] else "; try --gradient-checkpointing")
                     + ("" if result["quantize"] == "nf4" else " or --quantize nf4"))
    return "\n".join(lines)
