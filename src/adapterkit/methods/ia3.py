"""(IA)3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning"): learned vectors that rescale the keys, the values and the MLP's inner activations.

On an attention projection the vector scales the layer's output, y * l (l over output features); on
a feed-forward projection it scales the layer's input, W (x * l), which is the MLP's inner activation
(l over input features). Vectors start at 1, so training starts at the base model; merging multiplies
W's rows (or columns) by l exactly. Defaults follow PEFT's: the key and value projections and the MLP's
output projection, the latter as a feed-forward module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..architectures import is_linear, linear_shape
from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..quantization import is_quantized
from ..settings import option
from ..sites import Effect, base_module
from ..targets import match_modules
from .registry import Method, register_method


@dataclass
class IA3Config(AdapterConfig):
    """Options of (IA)3."""

    method: ClassVar[str] = "ia3"
    target_modules: list[str] | None = option(
        None, "linear layers to rescale (suffix match); default: key, value and the MLP's output projection")
    feedforward_modules: list[str] | None = option(
        None, "of those, the ones whose input is scaled (default: the MLP's output projection)")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")

    def validate(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, list) and not value:
                raise AdapterkitError(f"ia3 {name} is an empty list; name modules or leave it unset")


class IA3Effect(Effect):
    """y * l (attention) or W (x * l) (feed-forward): one learned vector per layer."""

    mergeable = True

    def __init__(self, base: nn.Module, on_input: bool):
        super().__init__()
        in_features, out_features, self.transposed = linear_shape(base)
        self.on_input_side = on_input
        self.acts_on_input, self.acts_on_output = on_input, not on_input
        self.ia3_l = nn.Parameter(torch.ones(in_features if on_input else out_features))

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.to(x.dtype)

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * self.ia3_l.to(y.dtype)  # the whole output, bias included, as PEFT scales it

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        weight = base_layer.weight
        if is_quantized(weight):
            raise AdapterkitError("the base layer is stored quantized; merge into the full-precision base "
                                  "(`adapterkit merge` loads it unquantized)")
        scale = self.ia3_l.float() if sign > 0 else 1.0 / self.ia3_l.float()
        if not torch.isfinite(scale).all():
            raise AdapterkitError("merge would produce non-finite weights: an (IA)3 vector holds 0, inf or NaN")
        # weight is (out, in), or (in, out) for Conv1D: scale the input or the output features
        along_rows = self.on_input_side == self.transposed
        factor = scale.unsqueeze(1) if along_rows else scale.unsqueeze(0)
        weight.data.copy_((weight.float() * factor).to(weight.dtype))
        if not self.on_input_side and base_layer.bias is not None:
            base_layer.bias.data.copy_((base_layer.bias.float() * scale).to(base_layer.bias.dtype))


def attach_ia3(adapted, config: IA3Config) -> dict[str, nn.Module]:
    layout, model = adapted.layout, adapted.causal_lm
    layers = layout.layer_indices(config.layers)
    if config.target_modules is None:
        kv = ("qkv",) if layout.arch.qkv else ("k", "v")
        paths = [layout.site(i, role) for i in layers for role in (*kv, "mlp_out")]
        feedforward = {layout.site(i, "mlp_out") for i in layers}
        paths = [p for p in paths if is_linear(base_module(model, p))]  # a MoE block's output is no linear layer
    else:
        layer_paths = tuple(layout.layer_path(i) + "." for i in layers)
        paths = [p for p in match_modules(model, config.target_modules, is_linear, "linear") if p.startswith(layer_paths)]
        feedforward = set(match_modules(model, config.feedforward_modules, is_linear, "linear")) \
            if config.feedforward_modules else set()
        stray = sorted(feedforward - set(paths))
        if stray:
            raise AdapterkitError(f"ia3 feedforward_modules must be among target_modules; {stray[0]} is not")
    return {p: IA3Effect(base_module(model, p), p in feedforward) for p in paths}


class IA3(Method):
    name = "ia3"
    config_class = IA3Config
    family = "scaling"
    study_lrs = (3e-3, 1e-2, 3e-2)  # scaling vectors start at 1: small rates leave them there
    summary = "(IA)3: learned vectors rescaling keys, values and the MLP's inner activations (fewest parameters)"
    mergeable = True

    def attach(self, adapted, config: IA3Config) -> dict[str, nn.Module]:
        return attach_ia3(adapted, config)


register_method(IA3())
