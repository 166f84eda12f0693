"""LoRA on fused mixture-of-experts weights (3-D parameters [experts, out, in], not nn.Linear layers):
a low-rank update per expert, B[e] A[e] * scaling, the analogue of PEFT's `target_parameters`.

The experts module keeps its own forward: it runs through `torch.func.functional_call` with the
updated weights passed in, so nothing of the transformers class is patched.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from ..errors import AdapterkitError
from ..sites import Effect


class ExpertLoraEffect(Effect):
    """Per-expert low-rank updates of some parameters of one experts module."""

    replaces_base = True
    mergeable = True
    row_wise = False  # the experts see routed tokens, not batch rows

    def __init__(self, experts: nn.Module, names: list[str], r: int, scaling: float, layout: str, init: str):
        super().__init__()
        self._base = [experts]  # a reference, not a child: the base weights are not this adapter's
        self.names, self.scaling, self.out_in = names, scaling, layout == "out_in"
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in names:
            count, rows, cols = getattr(experts, name).shape
            out_features, in_features = (rows, cols) if self.out_in else (cols, rows)
            a = torch.empty(count, r, in_features)
            for e in range(count):
                if init == "gaussian":
                    nn.init.normal_(a[e], std=1.0 / r)
                else:
                    nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(count, out_features, r))

    def delta(self, name: str) -> torch.Tensor:
        """scaling * B[e] @ A[e] for every expert, laid out as the base parameter."""
        d = torch.einsum("eor,eri->eoi", self.lora_B[name], self.lora_A[name]) * self.scaling
        return d if self.out_in else d.transpose(1, 2)

    def replacement(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        experts = self._base[0]
        weights = {n: getattr(experts, n) + self.delta(n).to(getattr(experts, n).dtype) for n in self.names}
        return functional_call(experts, weights, (x, *args), kwargs)

    @torch.no_grad()
    def merge_into(self, base_layer: nn.Module, sign: float = 1.0) -> None:
        for name in self.names:
            weight = getattr(base_layer, name)
            result = weight.float() + sign * self.delta(name).float()
            if not torch.isfinite(result).all():
                raise AdapterkitError("merge would produce non-finite weights; the adapter holds inf/NaN values")
            weight.data.copy_(result.to(weight.dtype))


def expert_parameters(adapted, targets: list[str], layer_paths: list[str]) -> dict[str, list[str]]:
    """{experts module path: [parameter names]} for target_parameters: "experts" (every 3-D weight of the
    table's experts module) or parameter paths matched at their end (e.g. mlp.experts.gate_up_proj)."""
    layout, model = adapted.layout, adapted.causal_lm
    if layout.arch.experts is None:
        raise AdapterkitError("target_parameters adapts the fused expert weights of a mixture-of-experts model; "
                              "this model has none (use target_modules)")
    found: dict[str, list[str]] = {}
    for layer in layer_paths:
        path = f"{layer}.{layout.arch.experts}"
        module = model.get_submodule(path)
        module = getattr(module, "base_layer", module)
        for name, p in module.named_parameters(recurse=False):
            full = f"{path}.{name}"
            if p.dim() == 3 and any(t == "experts" or full == t or full.endswith("." + t) for t in targets):
                found.setdefault(path, []).append(name)
    if not found:
        raise AdapterkitError(f"target_parameters {targets} match no expert weight; this model's are "
                              f"{layout.arch.experts}.<name> with names "
                              f"{sorted(n for n, p in module.named_parameters(recurse=False) if p.dim() == 3)}")
    return found
