"""LoRA (Hu et al. 2021): y = W x + (alpha / r) B A x on chosen linear layers; mergeable into W.

rsLoRA (Kalajdzievski 2023) is a scaling switch: alpha / sqrt(r).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import is_linear
from ..config import AdapterConfig, Method, option, register_method
from ..errors import AdapterkitError
from ..sites import Effect, base_module, cast_for_adapter, logical_modules
from ..targets import match_modules

BIAS_MODES = ("none", "lora_only", "all")
INITS = ("default", "gaussian")


@dataclass
class LoraConfig(AdapterConfig):
    """Options of LoRA."""

    method: ClassVar[str] = "lora"
    r: int = option(8, "rank of the update", flag="--lora-r")
    alpha: float = option(16.0, "scale numerator: the update is multiplied by alpha / r", flag="--lora-alpha")
    dropout: float = option(0.0, "dropout on the LoRA input path", flag="--lora-dropout")
    target_modules: list[str] | str | None = option(
        None, "module names (suffix match), a regex, or 'all-linear'; default: query and value projections")
    bias: str = option("none", "train biases too: none, lora_only (of the targeted layers), all",
                      flag="--lora-bias")
    init: str = option("default", "default: A Kaiming-uniform, B zero (the update starts at 0); "
                       "gaussian: A ~ N(0, 1/r), B zero", flag="--lora-init")
    use_rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)")
    modules_to_save: list[str] = option([], "modules trained in full (a trained copy), e.g. lm_head")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterkitError(f"lora r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise AdapterkitError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterkitError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise AdapterkitError(f"lora bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.init not in INITS:
            raise AdapterkitError(f"lora init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise AdapterkitError("lora target_modules is an empty list; name modules or leave it unset")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def linear_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, weight_is_transposed) of nn.Linear or GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    rows, cols = module.weight.shape  # Conv1D keeps weight as (in, out)
    return rows, cols, True


class LoraEffect(Effect):
    """The low-rank update of one linear layer (plus an optional bias delta)."""

    acts_on_output = True
    mergeable = True

    def __init__(self, base: nn.Module, config: LoraConfig, train_bias: bool):
        super().__init__()
        in_features, out_features, self.transposed = linear_shape(base)
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.lora_bias = nn.Parameter(torch.zeros(out_features)) if train_bias and base.bias is not None else None
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()  # Identity: no copy
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / config.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = cast_for_adapter(self.dropout(x), self.lora_A)
        delta = F.linear(F.linear(h, self.lora_A) * self.scaling, self.lora_B, self.lora_bias)
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped like the base weight."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.T if self.transposed else delta

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        _add_checked(base_layer.weight, sign * self.delta_weight())
        if self.lora_bias is not None:
            _add_checked(base_layer.bias, sign * self.lora_bias.float())


class BiasDelta(Effect):
    """A trained delta on a module's bias (LoRA with bias='all'); the base bias stays intact."""

    acts_on_output = True
    mergeable = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros_like(base.bias, dtype=torch.float32))

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.bias.to(y.dtype)

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        _add_checked(base_layer.bias, sign * self.bias.float())


class TrainedCopy(Effect):
    """A module trained in full (modules_to_save): a float32 copy runs instead of the base."""

    replaces_base = True
    mergeable = True

    def __init__(self, base: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(base).float()
        self.module.requires_grad_(True)
        self._stash: list[torch.Tensor] = []

    def replacement(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else None
        if dtype is not None and dtype != torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return self.module(x.float(), *args, **kwargs).to(dtype)
        return self.module(x, *args, **kwargs)

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        base_params = dict(base_layer.named_parameters())
        if sign > 0:
            self._stash = [p.detach().clone() for p in base_params.values()]
            for key, p in self.module.named_parameters():
                base_params[key].copy_(p)
        else:
            for p, saved in zip(base_params.values(), self._stash, strict=True):
                p.copy_(saved)
            self._stash = []


def _add_checked(target: torch.Tensor, delta: torch.Tensor) -> None:
    """target += delta computed in fp32; refuses a non-finite result and leaves target untouched."""
    result = target.detach().float() + delta.to(target.device)
    if not torch.isfinite(result).all():
        raise AdapterkitError("merge would produce non-finite weights; the adapter holds inf/NaN values")
    target.data.copy_(result.to(target.dtype))


def attach_lora(adapted, config: LoraConfig) -> dict[str, nn.Module]:
    layout = adapted.layout
    layer_paths = [layout.layer_path(i) for i in layout.layer_indices(config.layers)]
    model = adapted.base_model
    if config.target_modules is None:
        paths = [layout.site(i, role) for i in layout.layer_indices(config.layers)
                 for role in ("qkv", "q", "v") if getattr(layout.arch, role)]
    else:
        head = getattr(model, "get_output_embeddings", lambda: None)()
        head_paths = tuple(p for p, m in logical_modules(model) if m is head)
        paths = match_modules(model, config.target_modules, is_linear, "linear", exclude=head_paths)
        if config.layers is not None:
            paths = [p for p in paths if any(p.startswith(lp + ".") for lp in layer_paths)]
    parts: dict[str, nn.Module] = {}
    for path in paths:
        parts[path] = LoraEffect(base_module(model, path), config, train_bias=config.bias != "none")
    if config.bias == "all":
        for path, module in logical_modules(model):
            if path not in parts and isinstance(getattr(module, "bias", None), nn.Parameter):
                parts[path] = BiasDelta(module)
    if config.modules_to_save:
        for path in match_modules(model, config.modules_to_save, lambda m: True, "any"):
            if path in parts:
                raise AdapterkitError(f"{path} is both a LoRA target and in modules_to_save; pick one")
            parts[path] = TrainedCopy(base_module(model, path))
    return parts


register_method(Method("lora", LoraConfig, attach_lora, family="low-rank",
                       summary="low-rank update B A on linear layers (rsLoRA via use_rslora)", mergeable=True))
