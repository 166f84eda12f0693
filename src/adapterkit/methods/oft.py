"""OFT (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal Finetuning"; Liu et al. 2024,
BOFT's OFT v2 form): a linear layer reads its input rotated, y = W (R^T x) + b, by a block-diagonal R
whose blocks are Cayley transforms of trained skew-symmetric matrices Q; mergeable as W R^T.

Each block of size b has b (b - 1) / 2 trained numbers (Q's upper triangle). Defaults are PEFT 0.21's:
block size 32, Q zero (so R = I and training starts at the base model), R by the Cayley-Neumann series
I + 2Q + 2Q^2 + ... + Q^(n-1) with n = 5 terms; use_cayley_neumann false uses the exact transform, as PEFT
(I - Q)(I + Q)^-1. The block size must divide every targeted layer's input size (PEFT silently picks
another one; here that is an error naming a size that fits). PEFT 0.21's module_dropout builds a
dropout it never applies, so there is none here and a PEFT folder's value is read as the no-op it is.
PEFT's OFT takes nn.Linear layers only, so Conv1D is refused.
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
from ..sites import Effect, cast_for_adapter
from .linear_update import (
    check_targets,
    refuse_quantized,
    target_bases,
    write_checked,
)
from .registry import Method, register_method


@dataclass
class OftConfig(AdapterConfig):
    """Options of OFT."""

    method: ClassVar[str] = "oft"
    block_size: int = option(32, "size of each orthogonal block; it must divide every targeted layer's input size",
                             flag="--oft-block-size", minimum=2)
    target_modules: list[str] | str | None = option(
        None, "module names (suffix match), a regex, 'all-linear', or the groups attn / mlp; default: query and "
        "value projections")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")
    use_cayley_neumann: bool = option(True, "R from the Neumann series of the Cayley transform (PEFT's default); "
                                      "false: the exact transform (a linear solve per block)")
    num_cayley_neumann_terms: int = option(5, "terms of that series", minimum=1)

    def validate(self) -> None:
        check_targets(self.method, self.target_modules)


class OftEffect(Effect):
    """x -> x R block by block (R^T x for column vectors), before the base layer; R [in / b blocks, b, b]."""

    acts_on_input = True
    mergeable = True

    def __init__(self, base: nn.Module, config: OftConfig):
        super().__init__()
        in_features, _, _ = linear_shape(base)
        b = config.block_size
        self.block_size, self.blocks = b, in_features // b
        self.oft_R = nn.Parameter(torch.zeros(self.blocks, b * (b - 1) // 2))
        rows, cols = torch.triu_indices(b, b, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.neumann = config.num_cayley_neumann_terms if config.use_cayley_neumann else None
        self._merged_rotation: torch.Tensor | None = None

    def rotation(self) -> torch.Tensor:
        """R's blocks [blocks, b, b] from Q's upper triangles, as PEFT's OFTRotationModule builds them."""
        vec, b = self.oft_R, self.block_size
        q = torch.zeros(self.blocks, b, b, device=vec.device, dtype=vec.dtype)
        q[:, self.rows, self.cols] = vec
        q = q - q.transpose(-2, -1)
        eye = torch.eye(b, device=vec.device, dtype=vec.dtype).expand(self.blocks, b, b)
        if self.neumann is None:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        r = eye.clone()
        if self.neumann > 1:
            r = r + 2 * q
        if self.neumann > 2:
            power = q @ q
            r = r + 2 * power
            for _ in range(3, self.neumann - 1):
                power = power @ q
                r = r + 2 * power
            r = r + power @ q  # the last term once, as PEFT's series ends
        return r

    def on_input(self, x: torch.Tensor) -> torch.Tensor:
        h = cast_for_adapter(x, self.oft_R)
        rotated = torch.einsum("...rk,rkc->...rc", h.reshape(*h.shape[:-1], self.blocks, self.block_size),
                               self.rotation())
        return rotated.reshape(x.shape).to(x.dtype)

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        """W' = W R^T, each block of input columns by its R block (fp64); unmerge undoes it with the R it
        merged (R^-1, not R^T: the series makes R only nearly orthogonal)."""
        refuse_quantized(base_layer)
        weight = base_layer.weight
        w = weight.detach().double()
        w = w.T if linear_shape(base_layer)[2] else w  # [out, in]
        if sign > 0:
            r = self._merged_rotation = self.rotation().double()
        else:
            r = torch.linalg.inv(self._merged_rotation)
            self._merged_rotation = None
        blocks = w.reshape(w.shape[0], self.blocks, self.block_size)
        merged = torch.einsum("orc,rkc->ork", blocks, r.to(w.device)).reshape(w.shape)  # W_j R_j^T per block
        write_checked(weight, merged.T if linear_shape(base_layer)[2] else merged)


def attach_oft(adapted, config: OftConfig) -> dict[str, nn.Module]:
    bases = target_bases(adapted, config, "OFT")
    sizes = {path: linear_shape(base)[0] for path, base in bases.items()}
    unfit = [path for path, n in sizes.items() if n % config.block_size]
    if unfit:
        common = math.gcd(*sizes.values())
        fits = max(d for d in range(1, min(common, config.block_size) + 1) if common % d == 0)
        hint = f"e.g. --oft-block-size {fits}" if fits > 1 else "or target other layers"
        raise AdapterkitError(f"oft block_size {config.block_size} does not divide the {sizes[unfit[0]]} input "
                              f"features of {unfit[0]}; pick a size that divides every targeted layer's input ({hint})")
    return {path: OftEffect(base, config) for path, base in bases.items()}


class Oft(Method):
    name = "oft"
    config_class = OftConfig
    family = "orthogonal"
    summary = "OFT: block-diagonal orthogonal rotation of a linear layer's input (Cayley parametrisation)"
    mergeable = True

    def attach(self, adapted, config: OftConfig) -> dict[str, nn.Module]:
        return attach_oft(adapted, config)


register_method(Oft())
