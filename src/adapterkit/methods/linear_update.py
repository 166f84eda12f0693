"""What the methods that change a linear layer's weight share (LoRA, LoHa, LoKr, VeRA, OFT): choosing the
linear layers (LoRA's rules), per-module rank and alpha patterns, refusing a layer kind PEFT's method
does not take, and an effect that adds a weight update W + dW computed from the adapter's tensors,
merged into W exactly (fp32, finite, the quantized base refused).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import TARGET_GROUPS, is_linear, linear_shape
from ..errors import AdapterkitError
from ..quantization import is_quantized
from ..sites import Effect, base_module, cast_for_adapter, logical_modules
from ..targets import match_modules


def linear_targets(adapted, target_modules, layers: list[int] | None) -> list[str]:
    """Paths of the linear layers chosen as LoRA chooses them: None, the query and value projections (or
    the fused one); the groups attn / mlp from the table; names, a regex or 'all-linear' (never the head)."""
    layout, model = adapted.layout, adapted.causal_lm
    indices = layout.layer_indices(layers)
    groups = [target_modules] if isinstance(target_modules, str) else target_modules or []
    if target_modules is None:
        return [path for i in indices for path in layout.query_sites(i)]
    if groups and all(g in TARGET_GROUPS for g in groups):
        return [path for i in indices for g in groups for path in layout.group_sites(i, g)]
    head = getattr(model, "get_output_embeddings", lambda: None)()
    head_paths = tuple(p for p, m in logical_modules(model) if m is head)
    paths = match_modules(model, target_modules, is_linear, "linear", exclude=head_paths)
    if layers is not None:
        layer_paths = tuple(layout.layer_path(i) + "." for i in indices)
        paths = [p for p in paths if p.startswith(layer_paths)]
    return paths


def target_bases(adapted, config, what: str | None = None) -> dict[str, nn.Module]:
    """{path: base module} of the linear layers `config` targets; with `what` (PEFT's name of the method),
    a Conv1D layer is refused as that method of PEFT's refuses it."""
    bases = {path: base_module(adapted.causal_lm, path)
             for path in linear_targets(adapted, config.target_modules, config.layers)}
    if what is not None:
        for path, base in bases.items():
            refuse_transposed(config.method, path, base, what)
    return bases


def check_targets(method: str, target_modules) -> None:
    if isinstance(target_modules, list) and not target_modules:
        raise AdapterkitError(f"{method} target_modules is an empty list; name modules or leave it unset")


def check_patterns(method: str, rank_pattern: dict, alpha_pattern: dict) -> None:
    for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict) or any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0
                                                for v in pattern.values()):
            raise AdapterkitError(f"{method} {name} must map module names to positive numbers, got {pattern!r}")
    if any(not isinstance(v, int) for v in rank_pattern.values()):
        raise AdapterkitError(f"{method} rank_pattern values must be integers, got {rank_pattern!r}")


def pattern_value(pattern: dict, path: str, default):
    """The value of the first key that matches the end of the module path (LoRA's and PEFT's rule)."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return value
    return default


def drop_rows(weight: torch.Tensor, p: float, rescale: bool) -> torch.Tensor:
    """Rows of an update kept with probability 1 - p (PEFT's rank dropout: the mask drawn on the CPU),
    the kept ones divided by the kept fraction when `rescale` (an all-dropped mask gives zeros)."""
    keep = (torch.rand(weight.shape[0]) > p).to(weight.dtype)
    if rescale:
        keep = keep / keep.mean().clamp(min=1.0 / weight.shape[0])
    return weight * keep.to(weight.device).unsqueeze(1)


def refuse_transposed(method: str, path: str, base: nn.Module, what: str) -> None:
    """One error for a Conv1D layer (weight stored in x out) where PEFT's method takes nn.Linear only."""
    if is_linear(base) and linear_shape(base)[2]:
        raise AdapterkitError(f"{method} cannot adapt {path}: it is a Conv1D layer (weight stored as in x out), "
                              f"which PEFT's {what} does not take either; use lora, ia3 or vera on this model, "
                              "or target nn.Linear layers only")


def refuse_quantized(base_layer: nn.Module) -> None:
    if is_quantized(base_layer.weight):
        raise AdapterkitError("the base layer is stored quantized, so the update cannot be merged into it exactly; "
                              "merge into the full-precision base (`adapterkit merge` loads it unquantized)")


def write_checked(target: torch.Tensor, value: torch.Tensor) -> None:
    """target = value (computed in fp32); refuses a non-finite result and leaves target untouched."""
    if not torch.isfinite(value).all():
        raise AdapterkitError("merge would produce non-finite weights; the adapter holds inf/NaN values")
    target.data.copy_(value.to(target.device, target.dtype))


def add_checked(target: torch.Tensor, delta: torch.Tensor) -> None:
    """target += delta computed in fp32, checked as write_checked."""
    write_checked(target, target.detach().float() + delta.to(target.device))


class WeightUpdateEffect(Effect):
    """y + x dW^T for an update dW [out, in] that `delta_weight` builds from the adapter's tensors; merged
    as W + dW (W^T + dW^T for a Conv1D weight). Subclasses set `transposed` and implement delta_weight;
    `module_dropout` skips the whole update for a training step with that probability (LyCORIS's)."""

    acts_on_output = True
    mergeable = True
    transposed = False
    module_dropout = 0.0

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.module_dropout > 0 and not torch.rand(1).item() > self.module_dropout:
            return y
        delta = self.delta_weight()
        return y + F.linear(cast_for_adapter(x, delta), delta).to(y.dtype)

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        refuse_quantized(base_layer)
        was_training = self.training
        self.eval()  # no dropout in the merged update
        try:
            delta = self.delta_weight().float() * sign
        finally:
            self.train(was_training)
        weight = base_layer.weight
        add_checked(weight, delta.T if self.transposed else delta)
