"""LoKr (Edalati et al. 2022, KronA; LyCORIS): the update of a linear layer is a Kronecker product,
dW = (alpha / r) W1 (x) W2, with out = a c and in = b d split into factors near their square roots, W1 [a, b]
and W2 [c, d]; a factor is kept whole or, where r is small against it, as a rank-r product. Mergeable into W.

Factors and starting values are PEFT's (LoKrConfig(init_weights=True)): W2 (or W2a, W2b) Kaiming-uniform
and W1 zero (or W1a zero, W1b Kaiming-uniform), so the update starts at 0; W1 is split only with
decompose_both, W2 where r < max(c, d) / 2; decompose_factor picks the first factor of each size. As in
PEFT the scale is alpha / r also for whole factors. rank_dropout drops rows of dW while training (rescaled
by the kept fraction with rank_dropout_scale), module_dropout skips the whole update for a step.
PEFT's LoKr takes nn.Linear layers only, so a Conv1D layer (weight stored in x out) is refused.
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
class LokrConfig(AdapterConfig):
    """Options of LoKr."""

    method: ClassVar[str] = "lokr"
    r: int = option(8, "rank of a factor that is split into a low-rank product", flag="--lokr-r", minimum=1)
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha / r", flag="--lokr-alpha",
                          above=0)
    decompose_both: bool = option(False, "split the first Kronecker factor into a rank-r product too")
    decompose_factor: int = option(-1, "first factor of each size (when it divides it); -1: near the square root")
    rank_dropout: float = option(0.0, "while training, drop each output row of the update with this probability",
                                 flag="--lokr-rank-dropout", minimum=0.0)
    rank_dropout_scale: bool = option(False, "rescale the rows kept by rank_dropout by the kept fraction")
    module_dropout: float = option(0.0, "while training, skip the whole update for a step with this probability",
                                   flag="--lokr-module-dropout", minimum=0.0)
    target_modules: list[str] | str | None = option(
        None, "module names (suffix match), a regex, 'all-linear', or the groups attn / mlp; default: query and "
        "value projections")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")
    rank_pattern: dict = option({}, "per-module rank: {module name or regex suffix: r}")
    alpha_pattern: dict = option({}, "per-module alpha: {module name or regex suffix: alpha}")

    def validate(self) -> None:
        for name in ("rank_dropout", "module_dropout"):
            if not getattr(self, name) < 1.0:
                raise AdapterkitError(f"lokr {name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise AdapterkitError(f"lokr decompose_factor must be -1 or a positive integer, got {self.decompose_factor}")
        check_targets(self.method, self.target_modules)
        check_patterns(self.method, self.rank_pattern, self.alpha_pattern)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        return pattern_value(self.rank_pattern, path, self.r), pattern_value(self.alpha_pattern, path, self.alpha)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m n = dimension: (factor, dimension / factor) when factor divides it, else the pair of
    divisors with the smallest sum m + n whose smaller one is at most `factor` (-1: no bound), smaller first
    (the rule of PEFT's and LyCORIS' LoKr)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    bound = dimension if factor == -1 else factor
    m, n = 1, dimension
    for candidate in range(2, math.isqrt(dimension) + 1):
        if dimension % candidate == 0 and candidate <= bound:
            m, n = candidate, dimension // candidate  # the sum falls as the divisor nears the square root
    return m, n


def _kaiming(*shape: int) -> nn.Parameter:
    weight = nn.Parameter(torch.empty(*shape))
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


class LokrEffect(WeightUpdateEffect):
    """dW = s W1 (x) W2, W1 [a, b] (or W1a W1b), W2 [c, d] (or W2a W2b); out = a c, in = b d."""

    def __init__(self, base: nn.Module, r: int, alpha: float, config: LokrConfig):
        super().__init__()
        in_features, out_features, self.transposed = linear_shape(base)
        (a, c), (b, d) = (factorization(n, config.decompose_factor) for n in (out_features, in_features))
        self.lokr_w1 = self.lokr_w1_a = self.lokr_w1_b = self.lokr_w2 = self.lokr_w2_a = self.lokr_w2_b = None
        if config.decompose_both and r < max(a, b) / 2:
            self.lokr_w1_a, self.lokr_w1_b = nn.Parameter(torch.zeros(a, r)), _kaiming(r, b)
        else:
            self.lokr_w1 = nn.Parameter(torch.zeros(a, b))
        if r < max(c, d) / 2:
            self.lokr_w2_a, self.lokr_w2_b = _kaiming(c, r), _kaiming(r, d)
        else:
            self.lokr_w2 = _kaiming(c, d)
        self.scaling = alpha / r
        self.rank_dropout, self.rescale = config.rank_dropout, config.rank_dropout_scale
        self.module_dropout = config.module_dropout

    def delta_weight(self) -> torch.Tensor:
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        w2 = self.lokr_w2 if self.lokr_w2 is not None else self.lokr_w2_a @ self.lokr_w2_b
        weight = torch.kron(w1, w2) * self.scaling
        if self.training and self.rank_dropout > 0:
            weight = drop_rows(weight, self.rank_dropout, rescale=self.rescale)
        return weight


def attach_lokr(adapted, config: LokrConfig) -> dict[str, nn.Module]:
    return {path: LokrEffect(base, *config.rank_and_alpha(path), config)
            for path, base in target_bases(adapted, config, "LoKr").items()}


class Lokr(Method):
    name = "lokr"
    config_class = LokrConfig
    family = "low-rank"
    summary = "LoKr: Kronecker product of two small factors (full rank from few parameters)"
    mergeable = True

    def attach(self, adapted, config: LokrConfig) -> dict[str, nn.Module]:
        return attach_lokr(adapted, config)


register_method(Lokr())
