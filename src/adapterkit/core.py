"""AdaptedModel: named adapters attached to a plain transformers model.

The base model stays a transformers model inside (`adapted.causal_lm`); adapters sit in
`AdapterSite` wrappers at the modules they change. One notion of "adapter parameters"
(`adapter_state_dict`) serves freezing, saving, loading and the trainable report.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .architectures import Architecture, ModelLayout
from .config import AdapterConfig
from .errors import AdapterkitError
from .merging import Merging
from .method_hooks import MethodHooks
from .methods import get_method
from .methods.combining import Combination
from .sites import (
    AdapterSite,
    AdapterState,
    Effect,
    InputHook,
    logical_modules,
    refuse_shared_base_change,
    replace_module,
    site_at,
    strip_positions,
)
from .token_rows import extend_vocabulary, token_row_parts


@dataclass
class AdapterRecord:
    """One named adapter: its config and the parts it owns, keyed by module path."""

    name: str
    config: AdapterConfig
    parts: dict[str, nn.Module]
    merged: bool = False
    trained_steps: int = 0  # set by the training recipe; a trained adapter must change the logits


class AdaptedModel(Merging, MethodHooks, nn.Module):
    """A causal LM with parameter-efficient adapters. Build it with `adapterkit.adapt`.

    `state_dict()` and `load_state_dict()` hold the adapter parameters only, so tools that
    checkpoint a module (HF Trainer, accelerate) save a few MB, not the frozen base.
    """

    def __init__(self, model: nn.Module, architecture: Architecture | None = None):
        super().__init__()
        self.causal_lm = model
        self.layout = ModelLayout(model, architecture)
        self.state = AdapterState()
        self.records: dict[str, AdapterRecord] = {}
        self.tokenizer = None  # optional, set by adapt(); records its vocabulary with saved adapters
        self.input_hooks = nn.ModuleDict()  # parts acting on the inputs (InputHook), by adapter name
        self.generation_info: dict = {}  # template and end tokens, saved with adapters for eval/generate
        model.requires_grad_(False)
        self.train(model.training)  # a model loaded for inference stays in eval mode

    # ----- building -------------------------------------------------------------------------
    def add_adapter(self, config: AdapterConfig, name: str = "default", trainable: bool = True,
                    activate: bool | None = None, weights_follow: bool = False) -> AdapterRecord:
        """Attach a new named adapter. The first one added becomes active. `weights_follow`: saved
        weights are loaded next, so skip starting values that need a tokenizer or a forward pass."""
        if not name or not isinstance(name, str) or "." in name:
            raise AdapterkitError(f"adapter name {name!r} is invalid: use a non-empty name without dots")
        if name in self.records:
            raise AdapterkitError(f"an adapter named {name!r} exists already; delete() it or pick another name")
        method = get_method(config.method)
        config = extend_vocabulary(self.causal_lm, self.tokenizer, config)  # before attaching: tables resized
        parts = method.attach(self, config.for_loaded_weights() if weights_follow else config)
        if not parts:
            raise AdapterkitError(f"{config.method}: the config selects no module of this model")
        rows = token_row_parts(self, config)
        if set(rows) & set(parts):
            raise AdapterkitError(f"{config.method} already acts on {sorted(set(rows) & set(parts))[0]}, where the new "
                                  "tokens' rows are kept; leave that module out of the method's targets")
        parts.update(rows)
        refuse_shared_base_change(self.causal_lm, name, parts)
        device = next(self.causal_lm.parameters()).device
        for path, part in parts.items():
            part.to(device).train(self.causal_lm.training)  # new modules start in training mode; follow the model
            if isinstance(part, InputHook):
                self.input_hooks[name] = part
            elif isinstance(part, Effect):
                site_at(self.causal_lm, path, self.state).effects[name] = part
        record = AdapterRecord(name, config, parts)
        self.records[name] = record
        for p in self._parameters_of(record).values():
            p.requires_grad_(trainable)
        if activate or (activate is None and not self.state.active):
            self.set_active(name)
        return record

    def delete(self, name: str) -> None:
        """Remove an adapter and its parts; sites left empty are unwrapped."""
        record = self._record(name)
        if record.merged:
            raise AdapterkitError(f"adapter {name!r} is merged: unmerge() it before deleting")
        for path, part in record.parts.items():
            if isinstance(part, InputHook):
                del self.input_hooks[name]
                continue
            site = self.causal_lm.get_submodule(path)
            if part.changes_base:
                part.restore_base()
            del site.effects[name]
            if not site.effects and not site.checkpointed:
                replace_module(self.causal_lm, path, site.base_layer)
        del self.records[name]
        self.state.active = [n for n in self.state.active if n != name]

    # ----- which adapters run ------------------------------------------------------------------
    def set_active(self, *names: str) -> None:
        """Run these adapters (several stack in the given order); the others are off."""
        for name in names:
            self._record(name)
        self.state.active = list(names)

    @property
    def active(self) -> list[str]:
        return list(self.state.active)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside this block the model computes the base model's output."""
        previous = self.state.disabled
        self.state.disabled = True
        try:
            yield
        finally:
            self.state.disabled = previous

    @contextmanager
    def _rows(self, adapter_names: list[str | None] | None, batch: int | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if batch is not None and len(adapter_names) != batch:
            raise AdapterkitError(f"adapter_names has {len(adapter_names)} entries for a batch of {batch} rows")
        for name in set(adapter_names) - {None}:
            self._record(name)
        self.state.row_adapters, self.state._rows = list(adapter_names), {}
        try:
            yield
        finally:
            self.state.row_adapters, self.state._rows = None, {}

    # ----- running --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, adapter_names: list[str | None] | None = None,
                **kwargs):
        """The base model's forward; `adapter_names` gives one adapter (or None) per row.

        The named arguments are spelled out so HF Trainer keeps those dataset columns.
        """
        kwargs.update(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                      position_ids=position_ids, inputs_embeds=inputs_embeds)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if self.training and self.is_gradient_checkpointing:
            kwargs.setdefault("use_cache", False)  # a growing cache would be appended to twice by recomputation
        return self.run_with_adapters(self.causal_lm, kwargs, adapter_names)

    def run_with_adapters(self, module: nn.Module, kwargs: dict, adapter_names: list[str | None] | None = None):
        """Call the causal LM (or its decoder) with the running adapters, input hooks included."""
        with self._rows(adapter_names, _batch_size((), kwargs)):
            hook = self._running_input_hook()
            if hook is None:
                return module(**kwargs)
            kwargs, added = hook.prepare(self, kwargs)
            return strip_positions(module(**kwargs), added)

    def generate(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        """`transformers` generate with the KV cache; `adapter_names` as in forward."""
        if args:
            kwargs["input_ids"] = args[0]
        with self._rows(adapter_names, _batch_size((), kwargs)):
            hook = self._running_input_hook()
            if hook is None:
                return self.causal_lm.generate(**kwargs)
            return hook.generate(self, kwargs)

    def _running_input_hook(self) -> InputHook | None:
        """The part acting on the inputs that runs now, if any (at most one)."""
        names = self.state.names_running(self.input_hooks.keys())
        if not names:
            return None
        if self.state.row_adapters is not None:
            raise AdapterkitError(f"mixed batches cannot include adapter {names[0]!r}: it changes the inputs "
                                  "(their lengths differ); run its rows as their own batch")
        if len(names) > 1:
            raise AdapterkitError(f"adapters {names} both change the inputs and are active together; "
                                  "activate one of them")
        return self.input_hooks[names[0]]

    def compile(self, **kwargs) -> None:
        """torch.compile the wrapped causal LM in place (what forward and generate call); `kwargs` go to
        torch.compile. New weights of the same shapes (`adapterkit.io.hotswap`, an optimizer step) run
        without recompiling; switching the active adapter, or a mixed batch's rows, compiles anew."""
        self.causal_lm.compile(**kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each decoder layer in backward. adapterkit's own (non-reentrant) checkpointing
        instead of transformers': that one drops the cache, and with it the prefixes of prefix methods."""
        for i in range(self.layout.shape.layers):
            site_at(self.causal_lm, self.layout.layer_path(i), self.state).checkpointed = True

    def gradient_checkpointing_disable(self) -> None:
        for i in range(self.layout.shape.layers):
            module = self.causal_lm.get_submodule(self.layout.layer_path(i))
            if isinstance(module, AdapterSite):
                module.checkpointed = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        first = self.causal_lm.get_submodule(self.layout.layer_path(0))
        return isinstance(first, AdapterSite) and first.checkpointed

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def base_model(self) -> Decoder:
        """The decoder without its head, as transformers' models expose it: TRL's fused losses call
        `model.base_model(...)` for `last_hidden_state`, then `get_output_embeddings()`. The wrapped
        causal LM itself is `causal_lm` (or `get_base_model()`, PEFT's name)."""
        return Decoder(self)

    def get_decoder(self) -> Decoder:
        return Decoder(self)

    def get_base_model(self) -> nn.Module:
        return self.causal_lm

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "causal_lm":
                raise
            return getattr(self.causal_lm, name)

    # ----- parameters -----------------------------------------------------------------------
    def _record(self, name: str) -> AdapterRecord:
        if name not in self.records:
            known = ", ".join(self.records) or "none"
            raise AdapterkitError(f"no adapter named {name!r} (adapters: {known})")
        return self.records[name]

    def _parameters_of(self, record: AdapterRecord) -> dict[str, nn.Parameter]:
        return {f"{path}.{key}": p for path, part in record.parts.items() for key, p in part.named_parameters()}

    def adapter_state_dict(self, name: str | None = None) -> dict[str, torch.Tensor]:
        """The adapter's weights keyed by module path (independent of the adapter's name)."""
        record = self._record(name or self._single_name())
        return {key: p.detach() for key, p in self._parameters_of(record).items()}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], name: str | None = None) -> None:
        """Copy saved weights in; any missing, unexpected or misshapen key is an error."""
        own = self._parameters_of(self._record(name or self._single_name()))
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise AdapterkitError(
                "adapter weights do not fit this model: "
                + (f"missing {_few(missing)}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected {_few(unexpected)}" if unexpected else ""))
        with torch.no_grad():
            for key, p in own.items():
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise AdapterkitError(f"adapter weight {key} has shape {tuple(tensors[key].shape)}, "
                                          f"this model needs {tuple(p.shape)}")
                p.copy_(tensors[key])

    def state_dict(self, *args, **kwargs):  # noqa: D102  (adapter weights only, see class doc)
        return {f"{name}.{key}": t for name in self.records for key, t in self.adapter_state_dict(name).items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D102
        for name in self.records:
            prefix = f"{name}."
            self.load_adapter_state_dict(
                {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, name)
        return nn.modules.module._IncompatibleKeys([], [])

    def add_weighted_adapter(self, names: list[str], weights: list[float], new_name: str, combination: str = "cat",
                             density: float | None = None, majority_sign_method: str = "total",
                             svd_rank: int | None = None, seed: int = 0) -> None:
        """A new adapter combining adapters of one method, as PEFT's add_weighted_adapter (LoRA: cat, the
        exact weighted sum of the updates; linear; svd; ties, dare_linear, dare_ties with `density`; their
        *_svd forms). See methods/combining.py and the method's combine for the algebra."""
        if not names:
            raise AdapterkitError("add_weighted_adapter needs at least one adapter name")
        how = Combination(combination, density, majority_sign_method, svd_rank, seed)
        how.validate()
        methods = {self._record(n).config.method for n in names}
        if len(methods) > 1:
            raise AdapterkitError(f"adapters of different methods ({', '.join(sorted(methods))}) cannot be combined")
        get_method(methods.pop()).combine(self, names, weights, new_name, how)
        # a combination of trained adapters must change the logits too (save and load check it)
        self.records[new_name].trained_steps = max(self.records[n].trained_steps for n in names)

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Trainable parameters grouped by learning rate (a method may scale some, as LoRA+ does B)."""
        groups: dict[float, list] = {}
        for record in self.records.values():
            method = get_method(record.config.method)
            for key, p in self._parameters_of(record).items():
                if p.requires_grad:
                    groups.setdefault(lr * method.lr_ratio(record.config, key), []).append(p)
        return [{"params": params, "lr": group_lr} for group_lr, params in groups.items()]

    def trainable_parameters(self) -> tuple[int, int, float]:
        """(trainable, total, percent) over the whole adapted model."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total, 100.0 * trainable / max(total, 1)

    def report(self) -> str:
        trainable, total, percent = self.trainable_parameters()
        return f"trainable parameters: {trainable:,} of {total:,} ({percent:.4f}%)"

    def _single_name(self) -> str:
        if len(self.state.active) == 1:
            return self.state.active[0]
        if len(self.records) == 1:
            return next(iter(self.records))
        raise AdapterkitError(f"several adapters ({', '.join(self.records)}): name the one you mean")

    def sites(self) -> Iterator[tuple[str, AdapterSite]]:
        for path, module in logical_modules(self.causal_lm):
            wrapper = self.causal_lm.get_submodule(path)
            if isinstance(wrapper, AdapterSite) and wrapper.base_layer is module:
                yield path, wrapper

    # ----- files ----------------------------------------------------------------------------
    def save(self, directory: str | Path, name: str | None = None) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (adapter weights only), atomically.
        A thin call into adapterkit.io, which core never imports at load time."""
        from .io import save

        return save(self, directory, name or self._single_name())


class Decoder:
    """The causal LM's decoder (transformers' `base_model`) called with the adapted model's running
    adapters, input hooks included, so callers that take hidden states and apply the head themselves
    (TRL's chunked and fused losses) get what the adapted model computes. Other attributes are the
    decoder's own."""

    def __init__(self, adapted: AdaptedModel):
        self._adapted = adapted

    def __call__(self, *args, adapter_names: list[str | None] | None = None, **kwargs):
        if args:
            kwargs["input_ids"] = args[0]
        return self._adapted.run_with_adapters(self._adapted.causal_lm.base_model, kwargs, adapter_names)

    def __getattr__(self, name: str):
        return getattr(self._adapted.causal_lm.base_model, name)


def _batch_size(args, kwargs) -> int | None:
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), args[0] if args else None):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    return None


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def adapt(model: nn.Module, config: AdapterConfig, name: str = "default", tokenizer=None,
          architecture: Architecture | None = None) -> AdaptedModel:
    """Freeze `model` and attach one adapter described by `config`; returns the AdaptedModel.

    An AdaptedModel passed in gets the adapter added under `name`.
    """
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model, architecture)
    if tokenizer is not None:
        adapted.tokenizer = tokenizer
    adapted.add_adapter(config, name)
    return adapted
