"""LoRA (Hu et al. 2021): y = W x + (alpha / r) B A x on chosen linear layers; mergeable into W.

Variants: rsLoRA (Kalajdzievski 2023) is a scaling switch, alpha / sqrt(r); DoRA (Liu et al. 2024)
is its own effect, a trained magnitude per output feature over the normalised updated weight;
rank_pattern / alpha_pattern set r and alpha per module; loraplus_lr_ratio (Hayou et al. 2024)
gives B a larger learning rate than A. init pissa / pissa_niter_N / olora / loftq start from the base
weight and rewrite it (lora_init.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import AdapterkitError, warn
from ..settings import option
from ..sites import base_module, logical_modules
from ..targets import match_modules
from .combining import Combination, low_rank_factors, merge_tensors, split_weight
from .linear_update import linear_targets
from .lora_effects import BiasDelta, DoraEffect, LoraEffect, TrainedCopy
from .lora_experts import ExpertLoraEffect, expert_parameters
from .lora_init import BaseChangingLoraEffect, changes_base, check_init, init_warning
from .registry import Method, register_method

BIAS_MODES = ("none", "lora_only", "all")


@dataclass
class LoraConfig(AdapterConfig):
    """Options of LoRA."""

    method: ClassVar[str] = "lora"
    r: int = option(8, "rank of the update", flag="--lora-r")
    alpha: float = option(16.0, "scale numerator: the update is multiplied by alpha / r", flag="--lora-alpha")
    dropout: float = option(0.0, "dropout on the LoRA input path", flag="--lora-dropout")
    target_modules: list[str] | str | None = option(
        None, "module names (suffix match), a regex, 'all-linear', or the groups attn / mlp (see `adapterkit "
        "inspect`); default: query and value projections", aliases=("--targets",))
    bias: str = option("none", "train biases too: none, lora_only (of the targeted layers), all",
                      flag="--lora-bias")
    init: str = option("default", "default: A Kaiming-uniform, B zero (the update starts at 0); "
                       "gaussian: A ~ N(0, 1/r), B zero; pissa (pissa_niter_N: randomised SVD, N iterations) and "
                       "olora: B A from W's top singular triplets / QR, the base becomes W - s B A; loftq: the base "
                       "becomes W's NF4 quantization Q and B A the rank-r part of W - Q (bitsandbytes)",
                       flag="--lora-init")
    loftq_iter: int = option(1, "init loftq: alternations of quantizing and rank-r fitting (PEFT's loftq_iter)")
    use_rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r)")
    modules_to_save: list[str] = option([], "modules trained in full (a trained copy), e.g. lm_head")
    target_parameters: list[str] | None = option(
        None, "fused mixture-of-experts weights: 'experts' (all of them) or parameter names such as "
        "mlp.experts.gate_up_proj (a low-rank update per expert, as PEFT's target_parameters)")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")
    use_dora: bool = option(False, "DoRA: train a magnitude per output feature of the updated weight")
    rank_pattern: dict = option({}, "per-module rank: {module name or regex suffix: r}")
    alpha_pattern: dict = option({}, "per-module alpha: {module name or regex suffix: alpha}")
    loraplus_lr_ratio: float | None = option(None, "LoRA+: learning rate of B = this ratio x that of A")

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise AdapterkitError(f"lora r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise AdapterkitError(f"lora alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterkitError(f"lora dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise AdapterkitError(f"lora bias must be one of {BIAS_MODES}, got {self.bias!r}")
        check_init(self.init, self.loftq_iter)
        if changes_base(self.init) and (self.use_dora or self.target_parameters):
            raise AdapterkitError(f"lora init {self.init} rewrites linear base weights: it takes plain LoRA on linear "
                                  "layers, without use_dora or target_parameters")
        if isinstance(self.target_parameters, list) and not self.target_parameters:
            raise AdapterkitError("lora target_parameters is an empty list; name expert weights or leave it unset")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise AdapterkitError("lora target_modules is an empty list; name modules or leave it unset")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict) or any(not isinstance(v, (int, float)) or v <= 0 for v in pattern.values()):
                raise AdapterkitError(f"lora {name} must map module names to positive numbers, got {pattern!r}")
        if any(not isinstance(v, int) for v in self.rank_pattern.values()):
            raise AdapterkitError(f"lora rank_pattern values must be integers, got {self.rank_pattern!r}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise AdapterkitError(f"loraplus_lr_ratio must be positive, got {self.loraplus_lr_ratio!r}")

    def for_loaded_weights(self) -> LoraConfig:
        """Loading: the saved base_change tensors rebuild the base, so no SVD or quantization at attach."""
        if not changes_base(self.init):
            return self
        loading = dataclasses.replace(self)
        loading.loading = True  # not a field: never saved
        return loading

    @property
    def scaling(self) -> float:
        return self.scaling_for(self.r, self.alpha)

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """r and alpha of one module: the first pattern whose key matches the end of its path."""
        def lookup(pattern: dict, default):
            for key, value in pattern.items():
                if re.fullmatch(rf"(.*\.)?(?:{key})", path):
                    return value
            return default
        return lookup(self.rank_pattern, self.r), lookup(self.alpha_pattern, self.alpha)

    def lr_ratio(self, key: str) -> float:
        """Learning-rate multiplier of one adapter weight (LoRA+ speeds up B)."""
        return self.loraplus_lr_ratio if self.loraplus_lr_ratio and "lora_B" in key.split(".") else 1.0


def attach_lora(adapted, config: LoraConfig) -> dict[str, nn.Module]:
    layout = adapted.layout
    layer_paths = [layout.layer_path(i) for i in layout.layer_indices(config.layers)]
    model = adapted.causal_lm
    paths = linear_targets(adapted, config.target_modules, config.layers)
    parts: dict[str, nn.Module] = {}
    effect = DoraEffect if config.use_dora else LoraEffect
    try:
        for path in paths:
            r, alpha = config.rank_and_alpha(path)
            if changes_base(config.init):
                parts[path] = BaseChangingLoraEffect(base_module(model, path), config, config.bias != "none", r,
                                                     alpha, path, loading=getattr(config, "loading", False))
            else:
                parts[path] = effect(base_module(model, path), config, config.bias != "none", r, alpha)
        _attach_others(adapted, config, parts, layer_paths)
    except BaseException:
        for part in parts.values():  # put back the base weights changed before the error
            if part.changes_base:
                part.restore_base()
        raise
    if changes_base(config.init) and not getattr(config, "loading", False):
        init_warning(config.init, config.scaling)
    return parts


def _attach_others(adapted, config: LoraConfig, parts: dict[str, nn.Module], layer_paths: list[str]) -> None:
    """Bias deltas, expert updates and trained copies, beside the linear layers' LoRA in `parts`."""
    layout, model = adapted.layout, adapted.causal_lm
    if config.bias == "all":
        for path, module in logical_modules(model):
            if path not in parts and isinstance(getattr(module, "bias", None), nn.Parameter):
                parts[path] = BiasDelta(module)
    if config.target_parameters:
        if config.use_dora or config.dropout > 0:
            raise AdapterkitError("target_parameters takes plain LoRA without dropout (as PEFT's): set --lora-dropout "
                                  "0 and drop use_dora for the expert weights")
        for path, names in expert_parameters(adapted, config.target_parameters, layer_paths).items():
            r, alpha = config.rank_and_alpha(path)
            parts[path] = ExpertLoraEffect(base_module(model, path), names, r, config.scaling_for(r, alpha),
                                           layout.arch.experts_layout, config.init)
    elif layout.arch.experts is not None:
        warn("this mixture-of-experts model's expert weights are not targeted: LoRA adapts "
             f"{len(parts)} linear layers only; add target_parameters=['experts'] (--target-parameters experts) "
             "to adapt the experts too")
    if config.modules_to_save:
        for path in match_modules(model, config.modules_to_save, lambda m: True, "any"):
            if path in parts:
                raise AdapterkitError(f"{path} is both a LoRA target and in modules_to_save; pick one")
            parts[path] = TrainedCopy(base_module(model, path))


def combine_lora(adapted, names: list[str], weights: list[float], new_name: str, how: Combination) -> None:
    """A new LoRA adapter `new_name` (scaling 1) from a weighted combination of LoRA adapters on the same
    modules, as PEFT 0.21.2's add_weighted_adapter computes it (s_i: adapter i's scaling):

    cat: ranks concatenated, the update exactly sum_i w_i s_i B_i A_i (any ranks);
    linear, ties, dare_linear, dare_ties: the rule applied to the stacked A's with weights
    sign(w_i) sqrt(|w_i s_i|), then to the B's with sqrt(|w_i s_i|) (equal ranks; the product has cross terms);
    svd, ties_svd, dare_linear_svd, dare_ties_svd: the rule applied to the updates s_i B_i A_i with weights
    w_i, cut to rank how.svd_rank (default: the largest rank) by SVD.
    dare masks are drawn per module in the model's module order, A's before B's, from a generator seeded
    with how.seed (PEFT draws the same masks from the global generator).
    """
    how.validate()
    if not names or len(names) != len(weights):
        raise AdapterkitError(f"give one weight per adapter: {len(names)} adapter(s), {len(weights)} weight(s)")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) for w in weights):
        raise AdapterkitError(f"the weights must be finite numbers, got {weights!r}")
    records = [adapted._record(n) for n in names]
    for name, record in zip(names, records, strict=True):
        if not isinstance(record.config, LoraConfig):
            raise AdapterkitError(f"adapter {name!r} is {record.config.method}, not LoRA; combine LoRA adapters")
        if record.config.use_dora:
            raise AdapterkitError(f"adapter {name!r} is DoRA: its magnitudes do not combine linearly with other "
                                  "updates; combine plain LoRA adapters (or merge each DoRA adapter on its own)")
        odd = [p for p, part in record.parts.items() if type(part) is not LoraEffect or part.lora_bias is not None]
        if odd:
            raise AdapterkitError(f"adapter {name!r} trains more than low-rank updates at {odd[0]} (a bias, "
                                  "modules_to_save or expert weights); only plain B A updates can be combined")
    for name, record in zip(names[1:], records[1:], strict=True):
        differ = sorted(set(record.parts) ^ set(records[0].parts))
        if differ:
            raise AdapterkitError(f"adapters {names[0]!r} and {name!r} target different modules (e.g. {differ[0]}); "
                                  "combine adapters trained on the same target modules")
    order = {path: i for i, (path, _) in enumerate(logical_modules(adapted.causal_lm))}
    paths = sorted(records[0].parts, key=order.__getitem__)  # PEFT's order, so dare draws the same masks
    ranks = {path: [r.parts[path].lora_A.shape[0] for r in records] for path in paths}
    if how.how != "cat" and not how.on_delta and any(len(set(rs)) > 1 for rs in ranks.values()):
        raise AdapterkitError(f"combination {how.how} needs equal ranks at each module; use cat or svd")
    largest = max(max(rs) for rs in ranks.values())
    new_ranks = {path: sum(rs) if how.how == "cat" else (how.svd_rank or largest) if how.on_delta else rs[0]
                 for path, rs in ranks.items()}
    factors = {}
    generator = torch.Generator().manual_seed(how.seed)
    with torch.no_grad():
        for path in paths:
            parts = [(w, r.parts[path]) for w, r in zip(weights, records, strict=True)]
            factors[path] = _combined_factors(parts, how, new_ranks[path], generator, path)
    rank = max(new_ranks.values(), key=list(new_ranks.values()).count)  # the most common: fewest patterns
    odd = {re.escape(p): r for p, r in new_ranks.items() if r != rank}
    config = LoraConfig(r=rank, alpha=float(rank), target_modules=paths, rank_pattern=odd,
                        alpha_pattern={k: float(r) for k, r in odd.items()})  # scaling 1 everywhere
    adapted.add_adapter(config, new_name, activate=False)
    with torch.no_grad():
        for path, target in adapted.records[new_name].parts.items():
            lora_A, lora_B = factors[path]
            target.lora_A.copy_(lora_A)
            target.lora_B.copy_(lora_B)


def _combined_factors(parts: list[tuple[float, LoraEffect]], how: Combination, rank: int,
                      generator: torch.Generator, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combined update at one module, in fp32, checked finite."""
    if how.how == "cat":
        lora_A = torch.cat([w * p.scaling * p.lora_A.float() for w, p in parts])
        lora_B = torch.cat([p.lora_B.float() for _, p in parts], dim=1)
    elif how.on_delta:
        out_features, in_features = parts[0][1].lora_B.shape[0], parts[0][1].lora_A.shape[1]
        if rank > min(out_features, in_features):
            raise AdapterkitError(f"svd_rank {rank} exceeds what {path} ({out_features} x {in_features}) holds; "
                                  f"use at most {min(out_features, in_features)}")
        deltas = [p.scaling * p.lora_B.float() @ p.lora_A.float() for _, p in parts]
        lora_B, lora_A = low_rank_factors(merge_tensors(deltas, [w for w, _ in parts], how, generator), rank)
    else:
        split = [split_weight(w * p.scaling) for w, p in parts]
        lora_A = merge_tensors([p.lora_A.float() for _, p in parts], [a for a, _ in split], how, generator)
        lora_B = merge_tensors([p.lora_B.float() for _, p in parts], [b for _, b in split], how, generator)
    if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
        raise AdapterkitError(f"the combined update at {path} holds NaN or inf (from the adapters' weights or "
                              "the combination weights); nothing was added")
    return lora_A, lora_B


class Lora(Method):
    name = "lora"
    config_class = LoraConfig
    family = "low-rank"
    summary = "low-rank update B A on linear layers (rsLoRA, DoRA, per-module ranks, LoRA+)"
    mergeable = True

    def attach(self, adapted, config: LoraConfig) -> dict[str, nn.Module]:
        return attach_lora(adapted, config)

    def lr_ratio(self, config: LoraConfig, key: str) -> float:
        return config.lr_ratio(key)

    def combine(self, adapted, names, weights, new_name, how: Combination) -> None:
        combine_lora(adapted, names, weights, new_name, how)


register_method(Lora())
