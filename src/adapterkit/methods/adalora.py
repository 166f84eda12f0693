"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"): an update in
SVD form, W x + (alpha / ranknum) P (Lambda * Q) x, whose rank budget a rank allocator moves between layers
while training; mergeable into W.

The facts are PEFT 0.21.2's (AdaLoraConfig, SVDLinear, RankAllocator): P = lora_B [out, r], Lambda = lora_E
[r, 1], Q = lora_A [r, in] with r = init_r; lora_E starts at 0 (the update starts at 0), lora_A and lora_B
N(0, 0.02); the scale is alpha / (ranknum + 1e-5) with ranknum = init_r for the adapter's life (pruned
triplets are zeroed, not removed, so the scale never changes). Training adds orth_reg_weight times the mean
over P and Q of ||P^T P - I||_F and ||Q Q^T - I||_F to the loss. After each optimizer step (gradients still
there) the allocator takes each weight's sensitivity |w * grad|, smooths it (EMA beta1) and its uncertainty
|sensitivity - smoothed| (EMA beta2); a triplet's score is its Lambda entry's score plus the mean scores of
its Q row and P column. The budget (total rank over all layers) is init_r per layer until tinit, falls
cubically to target_r per layer at total_step - tfinal, and stays there; every deltaT steps the triplets
below the budget's threshold get Lambda = 0. At step total_step - tfinal the last allocation is fixed as
the rank pattern, and each later step zeroes the triplets it drops. Steps count from 0, as PEFT's
update_and_allocate(global_step) is called in its examples.

Both run through the training loop's generic hooks (Method.start_training / extra_loss /
after_optimizer_step); nothing in the loop names AdaLoRA. total_step, when unset, is the run's number of
optimizer steps (the train recipe's max_steps, or the epochs' steps) given to start_training, and is then
recorded in the config. The rank pattern {module path: [kept, ...] per triplet} is kept in the config, so
saved adapters (which hold all init_r triplets) carry it; PEFT's format holds only the kept triplets.
"""

from __future__ import annotations

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
from .lora_effects import LoraEffect
from .registry import Method, register_method

EPS = 1e-5  # PEFT adds it to ranknum in the scale
WEIGHTS = ("lora_A", "lora_B", "lora_E")


@dataclass
class AdaloraConfig(AdapterConfig):
    """Options of AdaLoRA."""

    method: ClassVar[str] = "adalora"
    init_r: int = option(12, "starting rank of every adapted layer", flag="--adalora-init-r", minimum=1)
    target_r: int = option(8, "average rank per layer the budget falls to", flag="--adalora-target-r", minimum=1)
    tinit: int = option(0, "steps of warmup at the full budget", flag="--adalora-tinit", minimum=0)
    tfinal: int = option(0, "last steps at the final rank pattern (at least 1 to end exactly at target_r)",
                         flag="--adalora-tfinal", minimum=0)
    deltaT: int = option(1, "steps between two budget allocations", flag="--adalora-delta-t", minimum=1)
    beta1: float = option(0.85, "EMA factor of the sensitivity", flag="--adalora-beta1", above=0.0)
    beta2: float = option(0.85, "EMA factor of the uncertainty", flag="--adalora-beta2", above=0.0)
    orth_reg_weight: float = option(0.5, "weight of the orthogonality regulariser of P and Q",
                                    flag="--adalora-orth-reg-weight", minimum=0.0)
    total_step: int | None = option(None, "steps of the schedule (default: the run's optimizer steps, max_steps)",
                                    flag="--adalora-total-step", minimum=1)
    alpha: float = option(8.0, "scale numerator: the update is multiplied by alpha / init_r",
                          flag="--adalora-alpha", above=0)
    dropout: float = option(0.0, "dropout on the AdaLoRA input path", flag="--adalora-dropout", minimum=0.0)
    target_modules: list[str] | str | None = option(
        None, "module names (suffix match), a regex, 'all-linear', or the groups attn / mlp; default: query and "
        "value projections")
    layers: list[int] | None = option(None, "only these decoder layers (default: all)")
    rank_pattern: dict = option({}, "triplets kept per module {module path: [true/false] x init_r}; set by the rank "
                                "allocator while training", flag="--adalora-rank-pattern")

    def validate(self) -> None:
        if self.target_r > self.init_r:
            raise AdapterkitError(f"adalora target_r ({self.target_r}) is above init_r ({self.init_r}): the budget "
                                  "only shrinks; lower --adalora-target-r or raise --adalora-init-r")
        for name in ("beta1", "beta2", "dropout"):
            if not getattr(self, name) < 1.0:
                raise AdapterkitError(f"adalora {name} must be below 1, got {getattr(self, name)!r}")
        if self.total_step is not None:
            check_schedule(self, self.total_step)
        check_targets(self.method, self.target_modules)
        if not isinstance(self.rank_pattern, dict) or any(
                not isinstance(v, list) or len(v) != self.init_r or any(not isinstance(b, bool) for b in v)
                for v in self.rank_pattern.values()):
            raise AdapterkitError(f"adalora rank_pattern must map module paths to {self.init_r} (init_r) true/false "
                                  "values each")


def check_schedule(config: AdaloraConfig, total: int) -> None:
    if config.tinit + config.tfinal >= total:
        raise AdapterkitError(f"adalora schedule does not fit: tinit ({config.tinit}) + tfinal ({config.tfinal}) "
                              f"must be below total_step ({total}), which leaves no steps to shrink the budget; "
                              "lower --adalora-tinit/--adalora-tfinal or train more steps")


class AdaloraEffect(WeightUpdateEffect):
    """dW = alpha / (ranknum + eps) B (A * E); the sensitivity averages of its weights live here too."""

    def __init__(self, base: nn.Module, config: AdaloraConfig):
        super().__init__()
        in_features, out_features, self.transposed = linear_shape(base)
        r = config.init_r
        self.lora_A = nn.Parameter(torch.randn(r, in_features) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1))
        self.lora_B = nn.Parameter(torch.randn(out_features, r) * 0.02)
        self.lora_bias = None  # (as a LoraEffect's without a bias delta)
        self.scaling = config.alpha / (r + EPS)
        self.dropout = Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # weight -> (EMA sensitivity, EMA unc.)

    def on_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = cast_for_adapter(self.dropout(x), self.lora_A)
        delta = F.linear(F.linear(h, self.lora_A * self.lora_E), self.lora_B) * self.scaling  # PEFT's order
        return y + delta.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling

    # A mixed batch runs AdaLoRA in LoRA's group (any rank), as LoRA's gathered product of A' = A * E and
    # B' = scale B.
    gather_key = LoraEffect.gather_key

    def gather_tensors(self) -> tuple:
        return self.lora_A * self.lora_E, None, self.lora_B * self.scaling, None, None, None

    gather_rows = LoraEffect.gather_rows
    on_output_gathered = LoraEffect.on_output_gathered

    def triplet_scores(self) -> torch.Tensor:
        """[r]: each triplet's score, PEFT's combination: E's score + (mean over Q's row + mean over P's column)."""
        score = {name: avg * unc for name, (avg, unc) in self.importance.items()}
        pair = score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0)
        return score["lora_E"].view(-1) + pair


def attach_adalora(adapted, config: AdaloraConfig) -> dict[str, nn.Module]:
    parts = {path: AdaloraEffect(base, config) for path, base in target_bases(adapted, config).items()}
    if config.rank_pattern and sorted(config.rank_pattern) != sorted(parts):
        raise AdapterkitError("adalora rank_pattern names other modules than the adapter's targets "
                              f"({sorted(set(config.rank_pattern) ^ set(parts))[:3]}); drop it or fix the targets")
    return parts


# ----- the rank allocator ---------------------------------------------------------------------------------
def budget(config: AdaloraConfig, total: int, layers: int, step: int) -> tuple[int, bool]:
    """(total rank allowed after `step`, whether to mask at this step): PEFT's budget_schedule."""
    start, end = config.init_r * layers, config.target_r * layers
    if step <= config.tinit:
        return start, False
    if step > total - config.tfinal:
        return end, True
    left = 1 - (step - config.tinit) / (total - config.tfinal - config.tinit)
    return int((start - end) * left ** 3 + end), step % config.deltaT == 0


@torch.no_grad()
def update_importance(effects: list[AdaloraEffect], beta1: float, beta2: float) -> None:
    for effect in effects:
        for name in WEIGHTS:
            p = getattr(effect, name)
            sensitivity = (p * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
            avg, unc = effect.importance.get(name, (torch.zeros_like(p), torch.zeros_like(p)))
            avg = beta1 * avg + (1 - beta1) * sensitivity
            effect.importance[name] = (avg, beta2 * unc + (1 - beta2) * (sensitivity - avg).abs())


@torch.no_grad()
def mask_to_budget(effects: dict[str, AdaloraEffect], allowed: int) -> dict[str, list[bool]]:
    """Zero Lambda of the lowest-scoring triplets over all layers so about `allowed` remain (ties at the
    threshold go too, as PEFT's); returns the rank pattern."""
    scores = {path: effect.triplet_scores() for path, effect in effects.items()}
    drop = sum(s.numel() for s in scores.values()) - allowed
    if drop <= 0:
        return {path: [True] * s.numel() for path, s in scores.items()}
    threshold = torch.kthvalue(torch.cat(list(scores.values())), drop)[0].item()
    pattern = {}
    for path, effect in effects.items():
        keep = scores[path] > threshold
        effect.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
        pattern[path] = keep.tolist()
    return pattern


@torch.no_grad()
def apply_pattern(effects: dict[str, AdaloraEffect], pattern: dict[str, list[bool]]) -> None:
    for path, effect in effects.items():
        keep = torch.tensor(pattern[path], device=effect.lora_E.device)
        effect.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)


def allocate(config: AdaloraConfig, effects: dict[str, AdaloraEffect], step: int) -> None:
    """PEFT's AdaLoraModel.update_and_allocate at 0-based `step`, after the optimizer step."""
    total = config.total_step
    if total is None:
        raise AdapterkitError("adalora total_step is unset: call start_training(total_steps) before the first step "
                              "(the training loop does), or set total_step")
    final = total - config.tfinal
    if step < final:
        update_importance(list(effects.values()), config.beta1, config.beta2)
        allowed, due = budget(config, total, len(effects), step)
        if due:
            config.rank_pattern = mask_to_budget(effects, allowed)
    elif step == final and all(effect.importance for effect in effects.values()):
        config.rank_pattern = mask_to_budget(effects, budget(config, total, len(effects), step)[0])
        for effect in effects.values():
            effect.importance.clear()
    else:
        if not config.rank_pattern:  # a run resumed in the final phase: the triplets dropped have Lambda = 0
            config.rank_pattern = {path: (e.lora_E.view(-1) != 0).tolist() for path, e in effects.items()}
        apply_pattern(effects, config.rank_pattern)


def orthogonal_penalty(effects) -> torch.Tensor:
    """Mean over the P and Q matrices of ||P^T P - I||_F and ||Q Q^T - I||_F (PEFT's orthogonal regulariser)."""
    norms = []
    for effect in effects:
        for gram in (effect.lora_A @ effect.lora_A.T, effect.lora_B.T @ effect.lora_B):
            norms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device)))
    return torch.stack(norms).mean()


def rank_of(config: AdaloraConfig, path: str) -> int:
    """The triplets a module keeps (init_r until the allocator has run)."""
    return sum(config.rank_pattern[path]) if path in config.rank_pattern else config.init_r


class Adalora(Method):
    name = "adalora"
    config_class = AdaloraConfig
    family = "low-rank"
    summary = "AdaLoRA: LoRA in SVD form whose rank budget is moved between layers while training, to target_r"
    mergeable = True
    study_lrs = (3e-4, 1e-3, 3e-3)  # Lambda starts at 0 and the scale is alpha / init_r: a little above LoRA's

    def attach(self, adapted, config: AdaloraConfig) -> dict[str, nn.Module]:
        return attach_adalora(adapted, config)

    def start_training(self, adapted, name: str, total_steps: int) -> None:
        record = adapted.records[name]
        if any(type(p).__name__ == "DTensor" for part in record.parts.values() for p in part.parameters()):
            raise AdapterkitError("adalora ranks the triplets of all layers together, from whole weights and "
                                  "gradients; train it without --shard (data parallel runs are fine)")
        if record.config.total_step is None:
            check_schedule(record.config, total_steps)
            record.config.total_step = total_steps
        for effect in record.parts.values():  # a run starts its sensitivity averages afresh
            effect.importance.clear()

    def extra_loss(self, adapted, name: str) -> torch.Tensor | None:
        config = adapted.records[name].config
        if config.orth_reg_weight == 0:
            return None
        return config.orth_reg_weight * orthogonal_penalty(adapted.records[name].parts.values())

    def after_optimizer_step(self, adapted, name: str, step: int) -> None:
        record = adapted.records[name]
        allocate(record.config, record.parts, step)


register_method(Adalora())
