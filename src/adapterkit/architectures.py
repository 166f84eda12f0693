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

    qkv_layout describes fused projections: "concat" (all q, then all k, then all v),
    "per_head" (q, k, v interleaved per head: GPT-NeoX, BLOOM) or "falcon" (q heads, then the
    k and v of each group). kv_heads: a config attribute name or a function of the config.
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
    qkv_layout: str = "separate"
    mlp: str | None = None
    heads: tuple[str, ...] = ("num_attention_heads",)
    kv_heads: str | Callable | None = None
    hidden: tuple[str, ...] = ("hidden_size",)
    positions: tuple[str, ...] = ()  # config attributes that bound the sequence length (learned positions)
    notes: str = ""

    def query_sites(self) -> list[str]:
        """The projections a default LoRA targets: query and value, or the fused projection."""
        return [self.qkv] if self.qkv else [self.q, self.v]


def _llama_like(**kw) -> Architecture:
    base = dict(
        layers="model.layers", embeddings="model.embed_tokens", attention="self_attn",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", attn_out="self_attn.o_proj",
        mlp="mlp", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
        kv_heads="num_key_value_heads",
    )
    base.update(kw)
    return Architecture(**base)


def _falcon_kv_heads(config) -> int:
    if config.new_decoder_architecture or not config.multi_query:
        return config.num_kv_heads
    return 1


ARCHITECTURES: dict[str, Architecture] = {
    "llama": _llama_like(),
    "mistral": _llama_like(),
    "qwen2": _llama_like(),
    "gemma": _llama_like(),
    "phi": _llama_like(attn_out="self_attn.dense", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2"),
    "gpt2": Architecture(
        layers="transformer.h", embeddings="transformer.wte", attention="attn",
        qkv="attn.c_attn", qkv_layout="concat", attn_out="attn.c_proj",
        mlp="mlp", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
        heads=("n_head",), hidden=("n_embd",), positions=("n_positions",),
        notes="Conv1D layers: weights stored transposed",
    ),
    "gptj": Architecture(
        layers="transformer.h", embeddings="transformer.wte", attention="attn",
        q="attn.q_proj", k="attn.k_proj", v="attn.v_proj", attn_out="attn.out_proj",
        mlp="mlp", mlp_in=("mlp.fc_in",), mlp_out="mlp.fc_out",
        heads=("n_head",), hidden=("n_embd",), notes="attention and MLP run in parallel from one norm",
    ),
    "gpt_neo": Architecture(
        layers="transformer.h", embeddings="transformer.wte", attention="attn.attention",
        q="attn.attention.q_proj", k="attn.attention.k_proj", v="attn.attention.v_proj",
        attn_out="attn.attention.out_proj", mlp="mlp", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj",
        heads=("num_heads",), positions=("max_position_embeddings",),
    ),
    "gpt_neox": Architecture(
        layers="gpt_neox.layers", embeddings="gpt_neox.embed_in", attention="attention",
        qkv="attention.query_key_value", qkv_layout="per_head", attn_out="attention.dense",
        mlp="mlp", mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
    ),
    "opt": Architecture(
        layers="model.decoder.layers", embeddings="model.decoder.embed_tokens", attention="self_attn",
        q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", attn_out="self_attn.out_proj",
        mlp=None, mlp_in=("fc1",), mlp_out="fc2", positions=("max_position_embeddings",),
        notes="no MLP module: fc1/fc2 sit directly in the layer",
    ),
    "bloom": Architecture(
        layers="transformer.h", embeddings="transformer.word_embeddings", attention="self_attention",
        qkv="self_attention.query_key_value", qkv_layout="per_head", attn_out="self_attention.dense",
        mlp="mlp", mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
        heads=("n_head",), notes="ALiBi positions",
    ),
    "falcon": Architecture(
        layers="transformer.h", embeddings="transformer.word_embeddings", attention="self_attention",
        qkv="self_attention.query_key_value", qkv_layout="falcon", attn_out="self_attention.dense",
        mlp="mlp", mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h",
        kv_heads=_falcon_kv_heads, notes="multi-query attention in the small models",
    ),
}


def register_architecture(model_type: str, architecture: Architecture, replace: bool = False) -> None:
    """Describe a new model family by module names (see `Architecture`)."""
    if model_type in ARCHITECTURES and not replace:
        raise AdapterkitError(f"architecture {model_type!r} is already registered; pass replace=True to change it")
    ARCHITECTURES[model_type] = architecture


def _first_attr(config, names: tuple[str, ...]) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise AdapterkitError(f"model config has none of {names}; describe the model with register_architecture()")


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
    """The architecture table applied to one model instance: module lookups by role."""

    def __init__(self, model: nn.Module, architecture: Architecture | None = None):
        self.model = model
        self.arch = architecture or architecture_of(model)
        self.layer_list = _get(model, self.arch.layers)
        config = model.config
        heads = _first_attr(config, self.arch.heads)
        hidden = _first_attr(config, self.arch.hidden)
        kv = self.arch.kv_heads
        kv_heads = kv(config) if callable(kv) else (getattr(config, kv, None) if kv else None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        max_pos = next((getattr(config, n) for n in self.arch.positions if getattr(config, n, None)), None)
        self.shape = ModelShape(len(self.layer_list), hidden, heads, kv_heads, head_dim, max_pos)

    def layer_path(self, index: int) -> str:
        return f"{self.arch.layers}.{index}"

    def site(self, index: int, role: str) -> str:
        """Full module path of a role ("attn_out", "mlp_out", "q", "qkv", ...) in layer `index`."""
        relative = getattr(self.arch, role)
        if relative is None:
            raise AdapterkitError(f"this model has no {role!r} module in its architecture entry")
        return f"{self.layer_path(index)}.{relative}"

    def input_site(self, index: int, sublayer: str) -> str:
        """The first module reading a sub-layer's normalised input: sublayer "attn_in" or "mlp_in"."""
        relative = self.arch.mlp_in[0] if sublayer == "mlp_in" else (self.arch.qkv or self.arch.q)
        return f"{self.layer_path(index)}.{relative}"

    def layer_indices(self, layers: list[int] | None) -> list[int]:
        count = self.shape.layers
        if layers is None:
            return list(range(count))
        bad = [i for i in layers if not -count <= i < count]
        if bad:
            raise AdapterkitError(f"layers {bad} out of range: the model has {count} layers (0..{count - 1})")
        return sorted({i % count for i in layers})


def _get(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise AdapterkitError(
            f"module {path!r} not found in {type(model).__name__}; the architecture entry does not fit this model"
        ) from exc


def architecture_of(model: nn.Module) -> Architecture:
    """The table row for a model, or a clear error listing the supported families."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise AdapterkitError(
        f"unsupported model family {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}. "
        "Describe a new family with adapterkit.register_architecture(model_type, Architecture(layers=..., "
        "embeddings=..., attention=..., attn_out=..., mlp_in=(...), mlp_out=..., q=/k=/v= or qkv=...))"
    )


def linear_module_names(model: nn.Module) -> list[str]:
    """Names of every linear layer (nn.Linear or GPT-2's Conv1D), for listings and error messages."""
    return [name for name, module in model.named_modules() if is_linear(module)]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"
