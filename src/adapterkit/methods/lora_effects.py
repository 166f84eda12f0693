"""LoRA's effects at a site: the low-rank update, DoRA's normalised one, a bias delta, a trained copy.

A mixed batch (one adapter per row) runs all LoRA, DoRA and AdaLoRA adapters at one site, whatever
their ranks, as one gathered product (methods/gathered.py): each row multiplied by its own adapter's
pair (as Punica's and S-LoRA's kernels do), instead of a loop over adapters; DoRA's rows then rescaled.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..architectures import linear_shape
from ..config import AdapterConfig
from ..errors import AdapterkitError
from ..quantization import is_quantized
from ..sites import Dropout, Effect, cast_for_adapter
from .gathered import Composition
from .linear_update import add_checked, refuse_quantized, write_checked


class LoraEffect(Effect):
    """The low-rank update of one linear layer (plus an optional bias delta)."""

    acts_on_output = True
    mergeable = True

    def __init__(self, base: nn.Module, config: AdapterConfig, train_bias: bool, r: int, alpha: float):
        super().__init__()
        in_features, out_features, self.transposed = linear_shape(base)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))
        self.lora_bias = nn.Parameter(torch.zeros(out_features)) if train_bias and base.bias is not None else None
        self.scaling = config.scaling_for(r, alpha)
        self.dropout = Dropout(config.dropout) if config.dropout > 0 else nn.Identity()  # Identity: no copy
        if config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = cast_for_adapter(self.dropout(x), self.lora_A)
        delta = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling  # PEFT's order: its logits to 1e-6
        if self.lora_bias is not None:
            delta = delta + self.lora_bias
        return y + delta.to(y.dtype)

    # A mixed batch: every LoRA-family adapter (LoRA, DoRA, AdaLoRA; any rank) at a site is one group.
    def gather_key(self) -> tuple | None:
        return ("low-rank", self.lora_A.shape[1], self.lora_B.shape[0], self.lora_A.dtype,
                getattr(self.dropout, "p", 0.0) if self.training else 0.0)

    def gather_tensors(self) -> tuple:
        """(A, None, s B, None, bias delta or None, DoRA's (scale, base bias) or None): gathered.Composition's
        parts; the bias is added after DoRA's rescaling, so it is not the product's e."""
        return self.lora_A, None, self.lora_B * self.scaling, None, self.lora_bias, None

    def gather_rows(self, per_adapter, slots) -> Composition:
        rows = Composition(per_adapter, slots)
        extras = [p[4:] for p in rows.parts]
        rows.bias = None if all(b is None for b, _ in extras) else rows.per_row_values([b for b, _ in extras], 0.0)
        rows.dora = None
        if any(d is not None for _, d in extras):  # per row its scale (1 for plain LoRA rows) and scale - 1
            scale = rows.per_row_values([None if d is None else d[0] for _, d in extras], 1.0)
            rows.dora = (scale, scale - 1, next(d[1] for _, d in extras if d is not None))
        return rows

    def on_output_gathered(self, rows, x, y, fresh=False):
        """Per row its own s B A dropout(x); DoRA rows rescaled as DoRA.on_output; then the bias deltas."""
        x = rows.select(x)
        x = cast_for_adapter(self.dropout(x) if self.training else x, rows.parts[0][0])  # eval: no dropout
        if rows.dora is None and rows.bias is None:
            return rows.added(y, x, fresh=fresh)
        delta = rows.product(x)
        if rows.dora is not None:  # (s - 1) base + s lora, which is lora exactly on a row of s = 1
            scale, less_one, base_bias = rows.dora
            base = rows.select(y).to(delta.dtype)
            base = base if base_bias is None else base - base_bias
            delta = torch.addcmul(scale * delta, less_one, base)
        if rows.bias is not None:
            delta = delta + rows.bias
        return rows.add_to(y, delta, fresh)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped like the base weight."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return delta.T if self.transposed else delta

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        refuse_quantized(base_layer)
        add_checked(base_layer.weight, sign * self.delta_weight())
        if self.lora_bias is not None:
            add_checked(base_layer.bias, sign * self.lora_bias.float())


class DoraEffect(LoraEffect):
    """DoRA: W' = m * (W + s B A) / ||W + s B A|| per output feature; m starts at ||W||, so the model
    starts unchanged. The norm is treated as a constant in backward, as the paper (4.3) and PEFT do."""

    def __init__(self, base: nn.Module, config: AdapterConfig, train_bias: bool, r: int, alpha: float):
        if is_quantized(base.weight):
            raise AdapterkitError("DoRA needs the base weight's norm, and this base layer is quantized; use plain "
                                  "LoRA on a quantized base, or load the base with --quantize none")
        super().__init__(base, config, train_bias, r, alpha)
        self._base = [base]  # a reference, not a child: the base weights are not this adapter's
        with torch.no_grad():
            self.magnitude = nn.Parameter(self._weight_norm(self._weight(torch.float32)))
        self._merged_norm: torch.Tensor | None = None

    def _weight(self, dtype: torch.dtype) -> torch.Tensor:
        weight = self._base[0].weight.to(dtype)
        return weight.T if self.transposed else weight  # (out, in)

    def _weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        update = (self.lora_B.to(weight.dtype) @ self.lora_A.to(weight.dtype)) * self.scaling
        return torch.linalg.norm(weight + update, dim=1)

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = cast_for_adapter(self.dropout(x), self.lora_A)
        lora = F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        weight = self._weight(lora.dtype)
        scale = self.magnitude.to(lora.dtype) / self._weight_norm(weight).detach()
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self._base[0].bias
            base = (y if bias is None else y - bias).to(lora.dtype)
        else:  # the base output was computed without dropout: recompute it on the dropped input
            base = F.linear(h, weight)
        delta = (scale - 1) * base + scale * lora
        if self.lora_bias is not None:
            delta = delta + self.lora_bias
        return y + delta.to(y.dtype)

    def gather_key(self) -> tuple | None:
        if self.training and not isinstance(self.dropout, nn.Identity):
            return None  # its base term is recomputed on each adapter's dropped input: row by row
        return super().gather_key()

    def gather_tensors(self) -> tuple:
        scale = self.magnitude / self._weight_norm(self._weight(self.magnitude.dtype)).detach()
        return *super().gather_tensors()[:5], (scale, self._base[0].bias)

    def gather_sources(self) -> list[torch.Tensor]:
        return [*self.parameters(), self._base[0].weight]

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        weight = self._weight(torch.float32)
        if sign > 0:
            norm = self._weight_norm(weight)
            self._merged_norm = norm
            merged = (self.magnitude.float() / norm).unsqueeze(1) * (weight + self.delta_weight_out())
        else:
            original = weight / (self.magnitude.float() / self._merged_norm).unsqueeze(1)
            merged = original - self.delta_weight_out()
        write_checked(base_layer.weight, merged.T if self.transposed else merged)
        if self.lora_bias is not None:
            add_checked(base_layer.bias, sign * self.lora_bias.float())

    def delta_weight_out(self) -> torch.Tensor:
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling


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
        add_checked(base_layer.bias, sign * self.bias.float())


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
