"""Where each model family keeps its parts: the one table methods ask.

A method never names a family. It asks for "the attention output projection of layer i"
or "the MLP input of layer i", and this table answers with a module path. Adding a family
is one row here (or one call to `register_architecture`), not an edit in every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .errors import AdapterkitError


@dataclass(frozen=True)
class Architecture:
    """Module names of one decoder family. Paths inside a layer are relative to that layer.

    layers: the list of decoder layers; embeddings: the input embeddings; attention: the attention
    module of a layer; q/k/v separate projections, or qkv one fused projection; attn_out and
    mlp_out: the sub-layers' output projections; mlp_in: the projections reading the MLP's input.
    heads/hidden: config attribute names (the first one present counts); kv_heads: a config
    attribute name or a function of the config; positions: attributes that bound the length.
    Mixture-of-experts rows: mlp_out is the MoE block itself (its output is the MLP sub-layer's
    output), mlp_in is empty, experts the module holding the fused 3-D expert weights, router the
    gate, experts_layout how those weights are stored: "out_in" [experts, out, in] or "in_out".
    gguf: llama.cpp's name of the architecture (gguf.MODEL_ARCH_NAMES), None where it has none.
    gguf_tensors: how llama.cpp's converter (convert_hf_to_gguf.py) stores the family's weights, where
    adapterkit's GGUF writer follows it: "as-is" (each tensor unchanged under the gguf package's
    TensorNameMap name, LLaMA-shaped hyperparameters), "reordered-qk" (the same, with the rows of the
    query and key projections permuted to llama.cpp's rotary layout, its LlamaModel.permute), None
    (the converter reshapes, transposes or offsets tensors: adapterkit writes no GGUF for it).
    logit_transforms: config attributes of what the causal LM does to its head's output (soft-capping,
    scaling); where none is set (None, or a scale of 1) the logits are the head applied to the decoder's
    last hidden state, and training may fuse the head with the loss (`ModelLayout.plain_head`).
    """

    layers: str
    embeddings: str
    attention: str
    attn_out: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    heads: tuple[str, ...] = ("num_attention_heads",)
    kv_heads: str | Callable | None = None
    hidden: tuple[str, ...] = ("hidden_size",)
    positions: tuple[str, ...] = ()  # config attributes that bound the sequence length (learned positions)
    experts: str | None = None
    router: str | None = None
    experts_layout: str = "out_in"
    gguf: str | None = None
    gguf_tensors: str | None = None
    logit_transforms: tuple[str, ...] = ()

    def query_roles(self) -> tuple[str, ...]:
        """The projections a default LoRA targets: query and value, or the fused projection."""
        return ("qkv",) if self.qkv else ("q", "v")

    def layer_roles(self) -> tuple[str, ...]:
        """Every role that names a module inside a layer (for validation)."""
        return ("attention", "attn_out", "mlp_out") + (("qkv",) if self.qkv else ("q", "k", "v")) + tuple(
            role for role in ("experts", "router") if getattr(self, role))


def _llama_like(**kw) -> Architecture:
    base = dict(
        layers="model.layers", embeddings="model.embed_tokens", attention="self_attn",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", attn_out="self_attn.o_proj",
        mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
        kv_heads="num_key_value_heads",
    )
    base.update(kw)
    return Architecture(**base)


def _falcon_kv_heads(config) -> int:
    if config.new_decoder_architecture or not config.multi_query:
        return config.num_kv_heads
    return 1


def _moe(**kw) -> Architecture:
    """A LLaMA-shaped attention with a mixture-of-experts block as its MLP."""
    return _llama_like(**{"mlp_in": (), "mlp_out": "mlp", "experts": "mlp.experts", "router": "mlp.gate", **kw})


ARCHITECTURES: dict[str, Architecture] = {
    "llama": _llama_like(gguf="llama", gguf_tensors="reordered-qk"),
    "mistral": _llama_like(gguf="llama", gguf_tensors="reordered-qk"),
    "qwen2": _llama_like(gguf="qwen2", gguf_tensors="as-is"),
    "gemma": _llama_like(gguf="gemma"),
    "phi": _llama_like(attn_out="self_attn.dense", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", gguf="phi2"),
    "gpt2": Architecture(
        layers="transformer.h", embeddings="transformer.wte", attention="attn",
        qkv="attn.c_attn", attn_out="attn.c_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
        heads=("n_head",), hidden=("n_embd",), positions=("n_positions",), gguf="gpt2",
    ),
    "gptj": Architecture(
        layers="transformer.h", embeddings="transformer.wte", attention="attn",
        q="attn.q_proj", k="attn.k_proj", v="attn.v_proj", attn_out="attn.out_proj",
        mlp_in=("mlp.fc_in",), mlp_out="mlp.fc_out", heads=("n_head",), hidden=("n_embd",), gguf="gptj",
    ),
    "gpt_neo": Architecture(
        layers="transformer.h", embeddings="transformer.wte", attention="attn.attention",
        q="attn.attention.q_proj", k="attn.attention.k_proj", v="attn.attention.v_proj",
        attn_out="attn.attention.out_proj", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
        heads=("num_heads",), positions=("max_position_embeddings",),
    ),
    "gpt_neox": Architecture(
        layers="gpt_neox.layers", embeddings="gpt_neox.embed_in", attention="attention",
        qkv="attention.query_key_value", attn_out="attention.dense", mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h", gguf="gptneox",
    ),
    "opt": Architecture(
        layers="model.decoder.layers", embeddings="model.decoder.embed_tokens", attention="self_attn",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", attn_out="self_attn.out_proj",
        mlp_in=("fc1",), mlp_out="fc2", positions=("max_position_embeddings",),
    ),
    "bloom": Architecture(
        layers="transformer.h", embeddings="transformer.word_embeddings", attention="self_attention",
        qkv="self_attention.query_key_value", attn_out="self_attention.dense", mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h", heads=("n_head",), gguf="bloom",
    ),
    "falcon": Architecture(
        layers="transformer.h", embeddings="transformer.word_embeddings", attention="self_attention",
        qkv="self_attention.query_key_value", attn_out="self_attention.dense", mlp_in=("mlp.dense_h_to_4h",),
        mlp_out="mlp.dense_4h_to_h", kv_heads=_falcon_kv_heads, gguf="falcon",
    ),
    # Today's dense families. Qwen3, OLMo 2 and Gemma 3 add q/k norms inside attention; Gemma 2/3 add
    # post-sub-layer norms (the attn_out/mlp_out outputs are taken before them); OLMo 2 has only
    # post-norms, so its MLP input is the raw residual stream.
    "qwen3": _llama_like(gguf="qwen3"),
    "gemma2": _llama_like(gguf="gemma2", logit_transforms=("final_logit_softcapping",)),
    "gemma3_text": _llama_like(gguf="gemma3", logit_transforms=("final_logit_softcapping",)),
    "phi3": _llama_like(q=None, k=None, v=None, qkv="self_attn.qkv_proj", mlp_in=("mlp.gate_up_proj",), gguf="phi3"),
    "olmo2": _llama_like(gguf="olmo2"),
    "smollm3": _llama_like(gguf="smollm3"),
    "stablelm": _llama_like(gguf="stablelm"),
    "granite": _llama_like(gguf="granite", logit_transforms=("logits_scaling",)),
    "starcoder2": _llama_like(mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", gguf="starcoder2"),
    "cohere": _llama_like(gguf="command-r", logit_transforms=("logit_scale",)),
    # Mixture of experts: fused expert weights in transformers 5.
    "mixtral": _moe(gguf="llama"),
    "qwen2_moe": _moe(gguf="qwen2moe"),
    "qwen3_moe": _moe(gguf="qwen3moe"),
    "olmoe": _moe(gguf="olmoe"),
    "gpt_oss": _moe(router="mlp.router", experts_layout="in_out", gguf="gpt-oss"),
}


# GGUF's names for a byte-level BPE vocabulary (tokenizer.ggml.model) and for GPT-2's pre-tokenizer split
# (tokenizer.ggml.pre, llama.cpp's LLAMA_VOCAB_PRE_TYPE_GPT2): format values that spell a family's name, so
# they live here with the other family names (io/gguf_vocab.py writes them).
GGUF_BPE_VOCAB = ("gpt2", "gpt-2")


def register_architecture(model_type: str, architecture: Architecture, replace: bool = False) -> None:
    """Describe a new model family by module names (see `Architecture`)."""
    if model_type in ARCHITECTURES and not replace:
        raise AdapterkitError(f"architecture {model_type!r} is already registered; pass replace=True to change it")
    if not isinstance(architecture, Architecture):
        raise AdapterkitError(f"register_architecture takes an Architecture, got {type(architecture).__name__}")
    if not isinstance(architecture.mlp_in, tuple):
        raise AdapterkitError("architecture field 'mlp_in' must be a tuple of module paths (empty for a MoE block)")
    if architecture.experts_layout not in ("out_in", "in_out"):
        raise AdapterkitError("architecture field 'experts_layout' must be out_in or in_out")
    ARCHITECTURES[model_type] = architecture


# and "all-linear" (targets.py), "experts" (LoRA's target_parameters). "llm-adapters": the layers of
# LLM-Adapters' published LoRA runs (q, k, v or the fused qkv, the MLP's last input projection and its output).
TARGET_GROUPS = ("attn", "mlp", "llm-adapters")


def _first_attr(config, names: tuple[str, ...], field: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise AdapterkitError(f"architecture field {field!r}: the model config has none of {names}; fix the entry "
                          "with register_architecture(..., replace=True)")


@dataclass(frozen=True)
class ModelShape:
    """Sizes a method needs, read through the table."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    max_positions: int | None


class ModelLayout:
    """The architecture table applied to one model instance: module lookups by role, checked once."""

    def __init__(self, model: nn.Module, architecture: Architecture | None = None):
        self.model = model
        self.arch = architecture or architecture_of(model)
        self.layer_list = _get(model, self.arch.layers, "layers")
        config = model.config
        heads = _first_attr(config, self.arch.heads, "heads")
        hidden = _first_attr(config, self.arch.hidden, "hidden")
        kv = self.arch.kv_heads
        kv_heads = kv(config) if callable(kv) else (getattr(config, kv, None) if kv else None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        max_pos = next((getattr(config, n) for n in self.arch.positions if getattr(config, n, None)), None)
        self.shape = ModelShape(len(self.layer_list), hidden, heads, kv_heads, head_dim, max_pos)
        self._validate()

    def _validate(self) -> None:
        """Every path of the entry exists in every layer and the head counts fit: one error naming the field."""
        arch, shape = self.arch, self.shape
        _get(self.model, arch.embeddings, "embeddings")
        if shape.layers == 0:
            raise AdapterkitError(f"architecture field 'layers' ({arch.layers}) is an empty list of layers")
        if not (arch.qkv or (arch.q and arch.k and arch.v)):
            raise AdapterkitError("architecture entry needs q, k and v, or one fused qkv projection")
        for i in range(shape.layers):
            for role in arch.layer_roles():
                _get(self.model, self.site(i, role), role)
            for path in arch.mlp_in:
                _get(self.model, f"{self.layer_path(i)}.{path}", "mlp_in")
        if shape.heads <= 0 or shape.kv_heads <= 0 or shape.heads % shape.kv_heads:
            raise AdapterkitError(f"architecture field 'kv_heads': {shape.kv_heads} key/value heads do not divide "
                                  f"{shape.heads} attention heads")
        if not getattr(self.model.config, "head_dim", None) and shape.hidden % shape.heads:
            raise AdapterkitError(f"architecture field 'heads': {shape.heads} heads do not divide the hidden size "
                                  f"{shape.hidden} (and the config gives no head_dim)")

    @property
    def plain_head(self) -> bool:
        config = self.model.config
        return all(getattr(config, name, None) in (None, 1, 1.0) for name in self.arch.logit_transforms)

    def layer_path(self, index: int) -> str:
        return f"{self.arch.layers}.{index}"

    def site(self, index: int, role: str) -> str:
        """Full module path of a role ("attn_out", "mlp_out", "q", "qkv", ...) in layer `index`."""
        relative = getattr(self.arch, role)
        if relative is None:
            raise AdapterkitError(f"this model has no {role!r} module in its architecture entry")
        return f"{self.layer_path(index)}.{relative}"

    def group_sites(self, index: int, group: str) -> list[str]:
        """The linear layers of a target group in layer `index`: "attn" (q, k, v or qkv, and the output
        projection) or "mlp" (its input and output projections; a MoE block has none)."""
        if group == "attn":
            roles = (("qkv",) if self.arch.qkv else ("q", "k", "v")) + ("attn_out",)
            paths = [self.site(index, role) for role in roles]
        elif group == "mlp":
            paths = [f"{self.layer_path(index)}.{p}" for p in self.arch.mlp_in] + [self.site(index, "mlp_out")]
        elif group == "llm-adapters":
            roles = ("qkv",) if self.arch.qkv else ("q", "k", "v")
            paths = [self.site(index, role) for role in roles] + [
                f"{self.layer_path(index)}.{p}" for p in self.arch.mlp_in[-1:]] + [self.site(index, "mlp_out")]
        else:
            raise AdapterkitError(f"unknown target group {group!r}; groups: {', '.join(TARGET_GROUPS)}")
        return [p for p in paths if is_linear(self.model.get_submodule(p))]

    def query_sites(self, index: int) -> list[str]:
        return [self.site(index, role) for role in self.arch.query_roles()]

    def input_site(self, index: int, sublayer: str) -> str:
        """The first module reading a sub-layer's normalised input: sublayer "attn_in" or "mlp_in". A MoE
        block has no input projection of its own: the block itself (its input is the sub-layer's)."""
        if sublayer == "mlp_in":
            relative = self.arch.mlp_in[0] if self.arch.mlp_in else self.arch.mlp_out
        else:
            relative = self.arch.qkv or self.arch.q
        return f"{self.layer_path(index)}.{relative}"

    def layer_indices(self, layers: list[int] | None) -> list[int]:
        count = self.shape.layers
        if layers is None:
            return list(range(count))
        bad = [i for i in layers if not -count <= i < count]
        if bad:
            raise AdapterkitError(f"layers {bad} out of range: the model has {count} layers (0..{count - 1})")
        return sorted({i % count for i in layers})

    def identity(self) -> dict:
        """Family and sizes, as saved adapters record their base model."""
        return {"model_type": getattr(self.model.config, "model_type", None), "hidden_size": self.shape.hidden,
                "num_layers": self.shape.layers}


def _get(model: nn.Module, path: str, field: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise AdapterkitError(
            f"architecture field {field!r}: module {path!r} not found in {type(model).__name__}; the architecture "
            "entry does not fit this model (fix it with register_architecture(..., replace=True))"
        ) from exc


def architecture_of(model: nn.Module) -> Architecture:
    """The table row for a model, or a clear error listing the supported families and what a row
    for this model would have to name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise AdapterkitError(
        f"unsupported model family {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}. "
        f"{_row_hint(model)}Describe it with adapterkit.register_architecture({model_type!r}, Architecture("
        "layers=..., embeddings=..., attention=..., attn_out=..., mlp_in=(...), mlp_out=..., q=/k=/v= or qkv=...)), "
        "then check it with `adapterkit inspect MODEL`"
    )


def _row_hint(model: nn.Module) -> str:
    """Where this model keeps its layers and the linear layers of one, for the row it needs."""
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    if not lists:
        return ""
    path, layers = max(lists, key=lambda item: len(item[1]))
    linears = [n for n, m in layers[0].named_modules() if is_linear(m)]
    return f"Its layers look like {path} ({len(layers)}), each with linear layers {', '.join(linears[:12])}. "


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear layer (nn.Linear or GPT-2's Conv1D), for listings and error messages."""
    return [name for name, module in model.named_modules() if is_linear(module)]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_transposed) of nn.Linear or GPT-2's Conv1D, whose
    weight is stored as (in, out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    rows, cols = module.weight.shape
    return rows, cols, True
