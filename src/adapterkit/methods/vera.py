"""VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation"): one pair of frozen random matrices
A [r, in] and B [out, r] shared by every adapted layer, and per layer two trained vectors that scale them,
dW = diag(lambda_b) B diag(lambda_d) A (each layer uses the leading in x out corner of A and B).
Mergeable into W; a few hundred trained numbers per layer.

Starting values are PEFT's (VeraConfig defaults): A and B Kaiming-uniform (gain sqrt 2) drawn from a CPU
generator seeded with projection_prng_key, A first, sized by the largest input and output among the
targets; lambda_b zero (the update starts at 0) and lambda_d = d_initial. The projections are not
trained and not saved by adapterkit: the seed and the targets give them back exactly. Conv1D layers
(weight stored in x out) are taken, as PEFT's VeRA takes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import linear_shape
from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..settings import option
from ..sites import Dropout, cast_for_adapter
from .linear_update import WeightUpdateEffect, check_targets, target_bases
from .registry import Method, register_method


@dataclass
class VeraConfig(AdapterConfig):
    """Options of VeRA."""

    method: ClassVar[str] = "vera"
    r: int = option(256, "width of the shared random projections", flag="--vera-r", minimum=1)
    target_modules: list[str] | str | None = option(
        None, "module names (suffix match), a regex, 'all-linear', or the groups attn / mlp; default: query and "
        "value projections")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")
    projection_prng_key: int = option(0, "seed of the shared frozen random projections (PEFT's projection_prng_key)",
                                      minimum=0)
    d_initial: float = option(0.1, "starting value of the vector lambda_d")
    dropout: float = option(0.0, "dropout on the VeRA input path", flag="--vera-dropout", minimum=0.0)

    def validate(self) -> None:
        if not self.dropout < 1.0:
            raise AdapterkitError(f"vera dropout must be in [0, 1), got {self.dropout!r}")
        check_targets(self.method, self.target_modules)


def projections(seed: int, r: int, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, n_in] then B [n_out, r] from one CPU generator: uniform within sqrt(3) sqrt(2) / sqrt(fan_in),
    fan_in the number of columns, the bound computed in PEFT's order so the values are bit-equal to its."""
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def draw(rows: int, cols: int) -> torch.Tensor:
        bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(cols))
        return torch.empty(rows, cols).uniform_(-bound, bound, generator=generator)

    return draw(r, n_in), draw(n_out, r)


class SharedProjection:
    """The frozen A and B of one VeRA adapter, held once (not a module, so not a weight of any layer) and
    copied to each device once."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        self.a, self.b = a, b
        self._copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._copies:
            self._copies[device] = (self.a.to(device), self.b.to(device))
        return self._copies[device]


class VeraEffect(WeightUpdateEffect):
    """dW = diag(lambda_b) B[:out] diag(lambda_d) A[:, :in]."""

    def __init__(self, base: nn.Module, projection: SharedProjection, config: VeraConfig):
        super().__init__()
        self.in_features, self.out_features, self.transposed = linear_shape(base)
        self.projection = projection
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features))
        self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial)))
        self.dropout = Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    def _corners(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.projection.on(device)
        return a[:, :self.in_features], b[:self.out_features]

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a, b = self._corners(x.device)
        h = cast_for_adapter(self.dropout(x), self.vera_lambda_d)
        delta = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(h, a), b)  # PEFT's order
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._corners(self.vera_lambda_d.device)
        return (self.vera_lambda_b.unsqueeze(1) * b) @ (self.vera_lambda_d.unsqueeze(1) * a)


def attach_vera(adapted, config: VeraConfig) -> dict[str, nn.Module]:
    bases = target_bases(adapted, config)
    shapes = [linear_shape(base) for base in bases.values()]
    if not shapes:
        return {}
    projection = SharedProjection(*projections(config.projection_prng_key, config.r,
                                               max(s[0] for s in shapes), max(s[1] for s in shapes)))
    return {path: VeraEffect(base, projection, config) for path, base in bases.items()}


class Vera(Method):
    name = "vera"
    config_class = VeraConfig
    family = "low-rank"
    study_lrs = (1e-3, 3e-3, 1e-2)  # only the scaling vectors train; VeRA's paper uses rates ~10x LoRA's
    summary = "VeRA: shared frozen random projections scaled by two trained vectors per layer (fewest low-rank weights)"
    mergeable = True

    def attach(self, adapted, config: VeraConfig) -> dict[str, nn.Module]:
        return attach_vera(adapted, config)


register_method(Vera())
