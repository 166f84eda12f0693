"""Prompt methods: virtual tokens before the input, or prefixes before every layer's keys and values.

- prompt-tuning (Lester et al. 2021): k trainable embeddings prepended to the input embeddings;
- p-tuning (Liu et al. 2021): the k embeddings come from a prompt encoder (MLP, or LSTM + MLP);
- prefix-tuning (Li & Liang 2021): k trainable key/value vectors in every layer, produced by a
  reparameterisation MLP while training (prefix_projection);
- p-tuning-v2 (Liu et al. 2022): the same deep prefixes trained directly, optionally in some layers.

They act on the model's inputs only (inputs_embeds, attention_mask, labels, position_ids, and a
pre-filled transformers Cache), so no family needs code of its own: the table gives the layer count,
key/value heads and head size. Logits and hidden states come back with exactly the input's length.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..settings import option
from ..sites import EXPORTED, INPUTS, InputHook
from .registry import Method, register_method


@dataclass
class PromptConfig(AdapterConfig):
    method: ClassVar[str] = ""
    num_virtual_tokens: int = option(20, "number k of virtual tokens (or prefix positions)")

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise AdapterkitError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        hidden = getattr(self, "encoder_hidden_size", 1)
        if hidden is not None and (not isinstance(hidden, int) or hidden <= 0):
            raise AdapterkitError(f"encoder_hidden_size must be a positive integer, got {hidden!r}")


@dataclass
class PromptTuningConfig(PromptConfig):
    """Prompt Tuning: trainable virtual-token embeddings."""

    method: ClassVar[str] = "prompt-tuning"
    prompt_init: str = option("random", "random, vocab (embeddings of random vocabulary tokens) or text",
                              flag="--prompt-init")
    init_text: str | None = option(None, "with prompt_init/prefix_init=text: this text, tokenised, repeated or "
                                   "cut to k")

    def validate(self) -> None:
        super().validate()
        if self.prompt_init not in ("random", "vocab", "text"):
            raise AdapterkitError(f"prompt_init must be random, vocab or text, got {self.prompt_init!r}")
        if (self.prompt_init == "text") != bool(self.init_text):
            raise AdapterkitError("prompt_init=text needs init_text, and init_text needs prompt_init=text")

    def for_loaded_weights(self) -> PromptTuningConfig:
        return dataclasses.replace(self, prompt_init="random", init_text=None)


@dataclass
class PTuningConfig(PromptConfig):
    """P-Tuning: virtual tokens produced by a prompt encoder."""

    method: ClassVar[str] = "p-tuning"
    encoder_type: str = option("mlp", "mlp (two hidden layers) or lstm (bidirectional, with an MLP head)")
    encoder_hidden_size: int | None = option(None, "hidden size of the encoder (default: the model's)")
    encoder_dropout: float = option(0.0, "dropout inside the LSTM encoder")

    def validate(self) -> None:
        super().validate()
        if self.encoder_type not in ("mlp", "lstm"):
            raise AdapterkitError(f"encoder_type must be mlp or lstm, got {self.encoder_type!r}")


@dataclass
class PrefixTuningConfig(PromptConfig):
    """Prefix Tuning: per-layer key/value prefixes through a reparameterisation MLP."""

    method: ClassVar[str] = "prefix-tuning"
    prefix_projection: bool = option(True, "produce the prefixes with an MLP (reparameterisation)")
    encoder_hidden_size: int | None = option(512, "hidden size of the projection MLP")
    layers: list[int] | None = option(None, "prefixes in these layers only (the others get a fixed zero "
                                      "prefix: k null keys/values that take a little attention)")
    # N(0, 1) prefixes (PEFT's start) took the default model's loss from 1.3 to 5.4 before any training:
    # prefixes trained directly start from keys/values the model itself makes (Li & Liang 2021 found
    # real-word activations a better start than random ones).
    prefix_init: str | None = option(None, "prefixes trained directly start as: vocab (the default: the "
                                     "model's own keys/values of k random vocabulary tokens), text, or random "
                                     "(PEFT's N(0, 1))", flag="--prefix-init")
    init_text: str | None = option(None, "with prompt_init/prefix_init=text: this text, tokenised, repeated or "
                                   "cut to k")

    def validate(self) -> None:
        super().validate()
        if self.prefix_init not in (None, "random", "vocab", "text"):
            raise AdapterkitError(f"prefix_init must be vocab, text or random, got {self.prefix_init!r}")
        if self.prefix_projection and self.prefix_init not in (None, "random"):
            raise AdapterkitError("prefix_init applies to prefixes trained directly; with prefix_projection "
                                  "the MLP makes the prefixes: drop prefix_init or the projection")
        if (self.prefix_init == "text") != bool(self.init_text):
            raise AdapterkitError("prefix_init=text needs init_text, and init_text needs prefix_init=text")

    def for_loaded_weights(self) -> PrefixTuningConfig:
        return dataclasses.replace(self, prefix_init="random" if not self.prefix_projection else None, init_text=None)

    def initial_prefixes(self) -> str:
        """How the prefixes start: the projection MLP's own init, or prefix_init (default vocab)."""
        return "random" if self.prefix_projection else (self.prefix_init or "vocab")


@dataclass
class PTuningV2Config(PrefixTuningConfig):
    """P-Tuning v2: deep prompts, per-layer prefixes trained directly."""

    method: ClassVar[str] = "p-tuning-v2"
    prefix_projection: bool = option(False, "produce the prefixes with an MLP (reparameterisation)")


class PromptPart(InputHook):
    """Base of the prompt modules; `kind` says whether they add embeddings or cache prefixes."""

    kind = "embeddings"

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def final(self) -> torch.Tensor:
        """The virtual embeddings [k, d] or prefixes [layers, 2, kv_heads, k, head_dim] in use now."""
        raise NotImplementedError

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """Saved beside the trainable weights, so inference needs no encoder (and load can check it)."""
        return {EXPORTED: self.final().detach()}

    def prepare(self, adapted, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int]:
        return prompt_inputs(adapted, self, kwargs)

    def generate(self, adapted, kwargs: dict[str, Any]):
        return prompt_generate(adapted, self, kwargs)


class VirtualTokens(PromptPart):
    def __init__(self, k: int, init: torch.Tensor):
        super().__init__(k)
        self.embedding = nn.Embedding(k, init.shape[1])
        with torch.no_grad():
            self.embedding.weight.copy_(init)

    def final(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(PromptPart):
    """P-Tuning's encoder: trainable inputs through an MLP, or a bidirectional LSTM and an MLP head."""

    def __init__(self, k: int, dim: int, config: PTuningConfig):
        super().__init__(k)
        hidden = config.encoder_hidden_size or dim
        self.embedding = nn.Embedding(k, dim)
        self.lstm = None
        if config.encoder_type == "lstm":
            self.lstm = nn.LSTM(dim, hidden, num_layers=2, dropout=config.encoder_dropout, bidirectional=True,
                                batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dim))

    def final(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.lstm is not None:
            x = self.lstm(x.unsqueeze(0))[0].squeeze(0)
        return self.mlp(x)


class Prefix(PromptPart):
    """Per-layer key/value prefixes, directly or through a projection MLP."""

    kind = "prefix"

    def __init__(self, k: int, shape, config: PrefixTuningConfig, layers: list[int]):
        super().__init__(k)
        self.layers, self.num_layers = layers, shape.layers
        self.kv_heads, self.head_dim = shape.kv_heads, shape.head_dim
        token_dim = shape.kv_heads * shape.head_dim  # one layer's keys (PEFT's width, so its files load)
        width = len(layers) * 2 * token_dim
        if config.prefix_projection:
            self.embedding = nn.Embedding(k, token_dim)
            hidden = config.encoder_hidden_size or token_dim
            self.projection = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(k, width)
            self.projection = None

    def final(self) -> torch.Tensor:
        flat = self.embedding.weight if self.projection is None else self.projection(self.embedding.weight)
        # PEFT's flattening order: [k, layers, (key, value), heads, head_dim]
        per_layer = flat.view(self.k, len(self.layers), 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)
        if len(self.layers) == self.num_layers:
            return per_layer
        full = per_layer.new_zeros(self.num_layers, *per_layer.shape[1:])
        return full.index_copy(0, torch.tensor(self.layers, device=flat.device), per_layer)


# ----- attaching -------------------------------------------------------------------------------
def _init_token_ids(adapted, init: str, text: str | None, k: int) -> torch.Tensor:
    """k token ids for a vocab or text init: random vocabulary tokens, or the text repeated or cut."""
    if init == "vocab":
        return torch.randint(0, adapted.causal_lm.get_input_embeddings().num_embeddings, (k,))
    if adapted.tokenizer is None:
        raise AdapterkitError("a text init needs the tokenizer: adapt(model, config, tokenizer=...)")
    tokens = adapted.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not tokens:
        raise AdapterkitError("init_text tokenises to nothing; give a non-empty text")
    return torch.tensor((tokens * (k // len(tokens) + 1))[:k])


def _init_embeddings(adapted, config: PromptTuningConfig, dim: int) -> torch.Tensor:
    if config.prompt_init == "random":
        return torch.randn(config.num_virtual_tokens, dim) * 0.02
    ids = _init_token_ids(adapted, config.prompt_init, config.init_text, config.num_virtual_tokens)
    embeddings = adapted.causal_lm.get_input_embeddings()
    with torch.no_grad():  # through the module, so scaled embeddings (Gemma) come out as the model sees them
        return embeddings(ids.to(embeddings.weight.device)).float().cpu()


def _init_prefixes(adapted, config: PrefixTuningConfig, part: Prefix) -> None:
    """Set the prefixes to the keys/values the base model itself caches for k tokens: the adapted
    model then starts as the base model reading those tokens first."""
    ids = _init_token_ids(adapted, config.initial_prefixes(), config.init_text, part.k)
    base = adapted.causal_lm
    training = base.training
    base.eval()
    with torch.no_grad(), adapted.disabled():
        # A plain cache keeps all k positions in every layer (a sliding-window layer's own would drop some).
        cache = base(input_ids=ids[None].to(base.device), use_cache=True, cache=DynamicCache()).cache
    base.train(training)
    per_layer = torch.stack([torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]])
                             for i in part.layers])  # [layers, 2, kv_heads, k, head_dim]
    with torch.no_grad():
        part.embedding.weight.copy_(per_layer.permute(3, 0, 1, 2, 4).reshape(part.k, -1).float())


def attach_prompt(adapted, config: PromptConfig) -> dict[str, nn.Module]:
    dim = adapted.causal_lm.get_input_embeddings().embedding_dim
    k = config.num_virtual_tokens
    if isinstance(config, PromptTuningConfig):
        part: PromptPart = VirtualTokens(k, _init_embeddings(adapted, config, dim))
    elif isinstance(config, PTuningConfig):
        part = PromptEncoder(k, dim, config)
    else:
        layout = adapted.layout
        part = Prefix(k, layout.shape, config, layout.layer_indices(config.layers))
        if config.initial_prefixes() != "random":
            _init_prefixes(adapted, config, part)
    return {INPUTS: part}


# ----- running ---------------------------------------------------------------------------------
def _extend_mask(mask: torch.Tensor | None, batch: int, length: int, k: int, device) -> torch.Tensor:
    ones = torch.ones(batch, k, dtype=torch.long if mask is None else mask.dtype, device=device)
    mask = torch.ones(batch, length, dtype=ones.dtype, device=device) if mask is None else mask
    return torch.cat([ones, mask], dim=1)


def _check_positions(adapted, length: int, k: int) -> None:
    limit = adapted.layout.shape.max_positions
    if limit is not None and k + length > limit:
        raise AdapterkitError(f"{k} virtual tokens + {length} input tokens run past the model's {limit} "
                              "positions; shorten the input or use fewer virtual tokens")


class PrefixLayer(DynamicLayer):
    """Holds a fixed prefix and answers prefix + new keys without storing them, so a layer that
    gradient checkpointing runs twice gets the same keys twice."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(DynamicCache):
    """A training-time cache of PrefixLayers (nothing to continue from, nothing stored)."""

    def __init__(self, layers: list[DynamicLayer]):
        Cache.__init__(self, layers=layers)


def prefix_cache(part: Prefix, batch: int, dtype: torch.dtype, training: bool) -> DynamicCache:
    """The prefixes as a transformers cache: growing (generation) or fixed (training)."""
    prefixes = part.final().to(dtype)
    per_layer = [(keys.unsqueeze(0).expand(batch, -1, -1, -1), values.unsqueeze(0).expand(batch, -1, -1, -1))
                 for keys, values in prefixes]
    if not training:
        return DynamicCache(ddp_cache_data=per_layer)
    layers = []
    for keys, values in per_layer:
        layer = PrefixLayer()
        DynamicLayer.update(layer, keys, values)
        layers.append(layer)
    return PrefixCache(layers)


def prompt_inputs(adapted, part: PromptPart, kwargs: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """The base model's inputs with the virtual tokens or prefixes added; returns (kwargs, tokens to strip)."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
        return kwargs, 0  # a continuing cache holds the prompt already
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    batch, length = (ids if ids is not None else embeds).shape[:2]
    device = (ids if ids is not None else embeds).device
    k = part.k
    _check_positions(adapted, length, k)
    kwargs = dict(kwargs)
    kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), batch, length, k, device)
    if part.kind == "prefix":
        dtype = next(adapted.causal_lm.parameters()).dtype
        kwargs["cache"] = prefix_cache(part, batch, dtype, adapted.training)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + k
        return kwargs, 0
    if embeds is None:
        embeds = adapted.causal_lm.get_input_embeddings()(kwargs.pop("input_ids"))
    virtual = part.final().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    if kwargs.get("labels") is not None:
        # The virtual tokens predict nothing, not even the first real token: the loss stays the one a
        # loss function computes from the returned (input-length) logits and the given labels.
        labels = kwargs["labels"]
        kwargs["labels"] = torch.cat([labels.new_full((batch, k + 1), -100), labels[:, 1:]], dim=1)
    if kwargs.get("position_ids") is not None:
        positions = kwargs["position_ids"]
        kwargs["position_ids"] = torch.cat([torch.arange(k, device=device).expand(batch, k), positions + k], dim=1)
    keep = kwargs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.dim() == 2:
        kwargs["logits_to_keep"] = torch.cat([keep.new_zeros(batch, k), keep], dim=1)  # no virtual logits
        return kwargs, 0
    return kwargs, k


def prompt_generate(adapted, part: PromptPart, kwargs: dict[str, Any]):
    """generate() with the prompt injected once: embeddings at prefill, or a pre-filled cache."""
    ids = kwargs.pop("input_ids", None)
    if ids is None:
        raise AdapterkitError("generate with a prompt method needs input_ids")
    kwargs["input_ids"] = ids
    inputs, _ = prompt_inputs(adapted, part, kwargs)
    if part.kind == "prefix":
        # The prefixes live in the cache: without it (use_cache=False, or a model whose generation
        # config turns it off) generate would recompute without them. Generation always keeps it.
        inputs["use_cache"] = True
        return adapted.causal_lm.generate(**inputs)
    out = adapted.causal_lm.generate(**inputs)  # given inputs_embeds only, generate returns the new tokens
    return torch.cat([ids, out], dim=1)


class PromptMethod(Method):
    family = "prompt"
    study_lrs = (1e-2, 3e-2, 1e-1)  # soft prompts want rates 100x LoRA's (LLM-Adapters used 3e-2 for prefix)

    def attach(self, adapted, config: PromptConfig) -> dict[str, nn.Module]:
        return attach_prompt(adapted, config)


for _config, _summary in (
        (PromptTuningConfig, "trainable virtual-token embeddings before the input"),
        (PTuningConfig, "virtual tokens from a prompt encoder (MLP or LSTM)"),
        (PrefixTuningConfig, "per-layer key/value prefixes through a reparameterisation MLP"),
        (PTuningV2Config, "deep prompts: per-layer prefixes trained directly")):
    register_method(PromptMethod(_config, _summary))
