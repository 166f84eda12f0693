"""GGUF files as llama.cpp reads them, written with the gguf package: a LoRA adapter (`--lora`) and
a whole merged model with its tokenizer and chat template.

The layout follows llama.cpp's own converters (convert_lora_to_gguf.py, convert_hf_to_gguf.py):
- an adapter file has general.type "adapter", adapter.type "lora", adapter.lora.alpha and
  general.architecture the base's llama.cpp name; each adapted weight W (GGUF name `blk.N.attn_q.weight`)
  gets `W.lora_a`, A as [r, in], and `W.lora_b`, B as [out, r] (PEFT's matrices; GGUF lists the
  dimensions reversed, so llama.cpp sees a: ne [in, r], b: ne [r, out]). llama.cpp scales the update
  by alpha / r with r read from each lora_b, so an adapter whose modules have other ranks, alphas or
  rsLoRA scaling gets each module's true scale folded into its B and one alpha for the file.
- names come from the gguf package's TensorNameMap; families whose converter reorders the rows of the
  query and key projections (Architecture.gguf_tensors "reordered-qk", llama.cpp's LlamaModel.permute)
  get that reordering on the base weights, their biases and LoRA B alike.
- tensor types as llama.cpp's converter picks them: 1-D tensors and norms stay f32; q8_0 falls back to
  f16 for rows that are not a whole number of 32-value blocks.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from ..architectures import Architecture, ModelLayout
from ..errors import AdapterkitError
from .files import usual_mode, writing
from .gguf_vocab import add_tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_REORDERED = "reordered-qk"
_TENSOR_LAYOUTS = ("as-is", _REORDERED)
_MAGIC = b"GGUF"


def _gguf():
    import gguf

    return gguf


def llama_arch(arch: Architecture, model_type: str | None) -> str:
    """The llama.cpp architecture name adapterkit writes for a family, or one clear error."""
    if arch.gguf is None:
        raise AdapterkitError(f"GGUF (gguf.MODEL_ARCH_NAMES) has no architecture for {model_type}; no GGUF can be "
                              "written for it")
    if arch.gguf_tensors not in _TENSOR_LAYOUTS:
        raise AdapterkitError(f"the GGUF conversion of {model_type} reshapes, transposes or splits tensors, which "
                              "adapterkit's GGUF writer does not do; export --format peft and convert that folder with "
                              "convert_lora_to_gguf.py (ggml-org's converter)")
    return arch.gguf


def name_map(arch: Architecture, model_type: str | None, layers: int):
    """The gguf package's HF -> GGUF tensor-name table for this family."""
    gguf = _gguf()
    name = llama_arch(arch, model_type)
    enum = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == name), None)
    if enum is None:
        raise AdapterkitError(f"the installed gguf package does not know the architecture {name!r}; upgrade gguf")
    return gguf.get_tensor_name_map(enum, layers)


def gguf_name(names, key: str) -> str | None:
    """GGUF name of an HF parameter (`....weight` / `....bias`), None where the table has none."""
    return names.get_name(key, try_suffixes=(".weight", ".bias"))


def reorder_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute: rows of each head from HF's rotary halves to interleaved pairs."""
    return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def row_heads(layout: ModelLayout, path: str) -> int | None:
    """Heads whose rows a family's converter reorders at module `path` (query: heads, key: kv heads)."""
    arch = layout.arch
    if arch.gguf_tensors != _REORDERED:
        return None
    for role, heads in (("q", layout.shape.heads), ("k", layout.shape.kv_heads)):
        relative = getattr(arch, role)
        if relative and path.startswith(arch.layers + ".") and path.endswith("." + relative):
            return heads
    return None


def _encode(name: str, data: np.ndarray, outtype: str):
    """(array, raw type or None) of one tensor in the file's type, as llama.cpp's converter chooses."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim <= 1 or name.endswith("_norm.weight") or outtype == "f32":
        return data, None
    if outtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(data, Q.Q8_0), Q.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(data, Q.BF16), Q.BF16
    return data.astype(np.float16), None


def _file_type(outtype: str):
    F = _gguf().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype]


def check_output_file(path: Path, overwrite: bool) -> None:
    """A .gguf file may be written at `path`: a new file, or with `overwrite` an existing GGUF file."""
    path = Path(path)
    if path.suffix != ".gguf":
        raise AdapterkitError(f"--output {path}: name a file ending in .gguf")
    if path.is_dir():
        raise AdapterkitError(f"--output {path} is a folder; name a .gguf file")
    if not path.parent.is_dir():
        raise AdapterkitError(f"--output {path}: the folder {path.parent} does not exist")
    if path.exists():
        if not overwrite:
            raise AdapterkitError(f"output file {path} exists; choose another --output or pass --overwrite")
        with open(path, "rb") as handle:
            if handle.read(4) != _MAGIC:
                raise AdapterkitError(f"--overwrite replaces only a GGUF file, and {path} is not one; move it or "
                                      "choose another --output")


def write_gguf(path: Path, arch_name: str, metadata, tensors: list[tuple[str, np.ndarray]], outtype: str) -> Path:
    """One GGUF file, written beside its place and renamed into it: metadata(writer) adds the keys."""
    gguf = _gguf()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path):
            writer = gguf.GGUFWriter(tmp, arch_name)
            metadata(writer)
            writer.add_file_type(_file_type(outtype))
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for name, data in tensors:
                array, raw = _encode(name, data, outtype)
                writer.add_tensor(name, array, raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            os.replace(tmp, path)
            usual_mode(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ----- the LoRA adapter ---------------------------------------------------------------------------
def lora_tensors(adapted, name: str) -> tuple[float, list[tuple[str, np.ndarray]]]:
    """(alpha, [(GGUF name, array)]) of LoRA adapter `name`: `W.lora_a` [r, in] and `W.lora_b` [out, r]."""
    from ..methods.lora import DoraEffect, LoraConfig, LoraEffect

    record = adapted._record(name)
    config = record.config
    if not isinstance(config, LoraConfig):
        raise AdapterkitError(f"a GGUF adapter holds LoRA only; {config.method} has no GGUF form")
    odd = [p for p, part in record.parts.items() if not isinstance(part, LoraEffect) or isinstance(part, DoraEffect)
           or part.lora_bias is not None or part.transposed or part.changes_base]
    if odd or config.target_parameters:
        raise AdapterkitError(f"the GGUF LoRA layout holds plain low-rank updates only (A and B); {odd[0] if odd else 'the experts'} "
                              "is not one (DoRA, a trained bias or copy, expert weights, a Conv1D layer, a start that "
                              "rewrote the base: pissa/olora/loftq): "
                              "export --format gguf --merged")
    layout = adapted.layout
    names = name_map(layout.arch, getattr(adapted.causal_lm.config, "model_type", None), layout.shape.layers)
    scales = {path: part.scaling for path, part in record.parts.items()}
    ranks = {path: part.lora_A.shape[0] for path, part in record.parts.items()}
    alpha = float(config.alpha)
    exact = all(math.isclose(scales[p], alpha / ranks[p], rel_tol=1e-7) for p in scales)
    out: list[tuple[str, np.ndarray]] = []
    unmapped = []
    for path, part in sorted(record.parts.items()):
        target = gguf_name(names, f"{path}.weight")
        if target is None:
            unmapped.append(path)
            continue
        a, b = part.lora_A.detach().float().cpu(), part.lora_B.detach().float().cpu()
        if not exact:  # llama.cpp applies alpha / r: fold this module's own scale into B
            b = b * (scales[path] * ranks[path] / alpha)
        heads = row_heads(layout, path)
        if heads is not None:
            b = reorder_rows(b, heads)
        out += [(f"{target}.lora_a", a.numpy()), (f"{target}.lora_b", b.numpy())]
    if unmapped:
        raise AdapterkitError(f"GGUF has no tensor for {unmapped[0]} ({len(unmapped)} module(s) the GGUF layout cannot "
                              "carry); retrain without them, or export --format gguf --merged")
    tied = _tied_head(adapted.causal_lm)
    if tied and any(n.startswith("output.weight") for n, _ in out):
        raise AdapterkitError("the adapter updates lm_head, which this model ties to its embeddings: a GGUF base has "
                              "no output tensor for it; export --format gguf --merged")
    return alpha, out


def write_lora(adapted, name: str, path: Path, outtype: str = "f32") -> Path:
    """The adapter as a llama.cpp LoRA GGUF file."""
    gguf = _gguf()
    alpha, tensors = lora_tensors(adapted, name)
    arch_name = llama_arch(adapted.layout.arch, adapted.causal_lm.config.model_type)
    model_name = _model_name(adapted.causal_lm)

    def metadata(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(f"{model_name} LoRA")

    return write_gguf(path, arch_name, metadata, tensors, outtype)


# ----- a whole model ------------------------------------------------------------------------------
def _tied_head(model) -> bool:
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def _model_name(model) -> str:
    return str(getattr(model, "adapterkit_source", None) or getattr(model.config, "_name_or_path", "") or "model")


def model_tensors(model, layout: ModelLayout) -> list[tuple[str, np.ndarray]]:
    """Every weight of a plain transformers model under its GGUF name (tied head left out, as llama.cpp)."""
    config = model.config
    names = name_map(layout.arch, config.model_type, layout.shape.layers)
    tied = _tied_head(model)
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    out, unmapped = [], []
    for key, tensor in model.state_dict().items():
        if tied and head is not None and key.startswith(head + "."):
            continue
        target = gguf_name(names, key)
        if target is None:
            unmapped.append(key)
            continue
        data = tensor.detach().float().cpu()
        heads = row_heads(layout, key.rpartition(".")[0])
        if heads is not None:
            data = reorder_rows(data, heads)
        out.append((target, data.numpy()))
    if unmapped:
        raise AdapterkitError(f"GGUF has no tensor for {unmapped[0]} ({len(unmapped)} weight(s) unmapped); this "
                              "model's layout differs from the one GGUF expects for its family")
    return out


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if kind != "default":
        raise AdapterkitError(f"the model uses {kind} rotary scaling, which adapterkit's GGUF writer does not write; "
                              "convert the merged checkpoint (adapterkit merge) with convert_hf_to_gguf.py")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def add_hyperparameters(writer, model, layout: ModelLayout) -> None:
    """The LLaMA-shaped hyperparameters llama.cpp reads (TextModel/LlamaModel.set_gguf_parameters)."""
    config, shape = model.config, layout.shape
    if getattr(config, "hidden_act", "silu") != "silu":
        raise AdapterkitError(f"the model's activation is {config.hidden_act}; the GGUF writer handles SiLU-gated MLPs")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise AdapterkitError("the model uses sliding-window attention, which adapterkit's GGUF writer does not write")
    needed = {k: getattr(config, k, None) for k in ("intermediate_size", "rms_norm_eps", "max_position_embeddings")}
    lacking = [k for k, v in needed.items() if v is None]
    if lacking:
        raise AdapterkitError(f"the model config has no {lacking[0]}; the GGUF writer needs it (a decoder with the usual rotary, RMS-norm, gated-MLP hyperparameters)")
    writer.add_name(_model_name(model))
    writer.add_context_length(int(needed["max_position_embeddings"]))
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(int(needed["intermediate_size"]))
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(needed["rms_norm_eps"]))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim * shape.heads != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)


def write_model(model, tokenizer, path: Path, outtype: str = "f16", chat_template: str | None = None) -> Path:
    """A plain (merged) transformers model with its tokenizer and chat template as one GGUF file."""
    layout = ModelLayout(model)
    arch_name = llama_arch(layout.arch, model.config.model_type)
    tensors = model_tensors(model, layout)

    def metadata(writer):
        writer.add_type(_gguf().GGUFType.MODEL)
        add_hyperparameters(writer, model, layout)
        add_tokenizer(writer, tokenizer, int(model.config.vocab_size), chat_template)

    return write_gguf(path, arch_name, metadata, tensors, outtype)
