"""LoHa (Hyeon-Woo et al. 2022, FedPara; LyCORIS): the update of a linear layer is the Hadamard product
of two low-rank matrices, dW = (alpha / r) (W1a W1b) * (W2a W2b), whose rank reaches r^2 for 4 r (in + out)
parameters; mergeable into W.

Starting values are PEFT's (LoHaConfig(init_weights=True)): W1a, W1b and W2a Kaiming-uniform, W2b zero,
so the update starts at 0. rank_dropout drops rows of dW while training and rescales the kept ones by the
kept fraction (PEFT's LoHa); module_dropout skips the whole update for a step with that probability.
PEFT's LoHa takes nn.Linear layers only, so a Conv1D layer (weight stored in x out) is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..architectures import linear_shape
from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..settings import option
from .linear_update import (
    WeightUpdateEffect,
    check_patterns,
    check_targets,
    drop_rows,
    pattern_value,
    target_bases,
)
from .registry import Method, register_method


@dataclass
class LohaConfig(AdapterConfig):
    """Options of LoHa."""

    method: ClassVar[str] = "loha"
    r: int = option(8, "rank of each of the two low-rank factors", flag="--loha-r", minimum=1)
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha / r", flag="--loha-alpha",
                          above=0)
    rank_dropout: float = option(0.0, "while training, drop each output row of the update with this probability",
                                 flag="--loha-rank-dropout", minimum=0.0)
    module_dropout: float = option(0.0, "while training, skip the whole update for a step with this probability",
                                   flag="--loha-module-dropout", minimum=0.0)
    target_modules: list[str] | str | None = option(
        None, "module names (suffix match), a regex, 'all-linear', or the groups attn / mlp; default: query and "
        "value projections")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")
    rank_pattern: dict = option({}, "per-module rank: {module name or regex suffix: r}")
    alpha_pattern: dict = option({}, "per-module alpha: {module name or regex suffix: alpha}")

    def validate(self) -> None:
        for name in ("rank_dropout", "module_dropout"):
            if not getattr(self, name) < 1.0:
                raise AdapterkitError(f"loha {name} must be in [0, 1), got {getattr(self, name)!r}")
        check_targets(self.method, self.target_modules)
        check_patterns(self.method, self.rank_pattern, self.alpha_pattern)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        return pattern_value(self.rank_pattern, path, self.r), pattern_value(self.alpha_pattern, path, self.alpha)


class LohaEffect(WeightUpdateEffect):
    """dW = s (W1a W1b) * (W2a W2b), W1a/W2a [out, r], W1b/W2b [r, in]."""

    def __init__(self, base: nn.Module, r: int, alpha: float, config: LohaConfig):
        super().__init__()
        in_features, out_features, self.transposed = linear_shape(base)
        self.hada_w1_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w1_b = nn.Parameter(torch.empty(r, in_features))
        self.hada_w2_a = nn.Parameter(torch.empty(out_features, r))
        self.hada_w2_b = nn.Parameter(torch.zeros(r, in_features))
        for weight in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.scaling = alpha / r
        self.rank_dropout, self.module_dropout = config.rank_dropout, config.module_dropout

    def delta_weight(self) -> torch.Tensor:
        weight = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b) * self.scaling
        if self.training and self.rank_dropout > 0:
            weight = drop_rows(weight, self.rank_dropout, rescale=True)
        return weight


def attach_loha(adapted, config: LohaConfig) -> dict[str, nn.Module]:
    return {path: LohaEffect(base, *config.rank_and_alpha(path), config)
            for path, base in target_bases(adapted, config, "LoHa").items()}


class Loha(Method):
    name = "loha"
    config_class = LohaConfig
    family = "low-rank"
    summary = "LoHa: Hadamard product of two low-rank updates (rank up to r^2 for LoRA's parameter count x2)"
    mergeable = True

    def attach(self, adapted, config: LohaConfig) -> dict[str, nn.Module]:
        return attach_loha(adapted, config)


register_method(Loha())
