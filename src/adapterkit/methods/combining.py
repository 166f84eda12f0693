"""Combining several adapters' weights into one (the algebra of PEFT 0.21.2's add_weighted_adapter):
the options and the pure tensor functions, with no method or model in sight.

TIES (Yadav et al. 2023): trim each task tensor to its top-`density` magnitudes, elect a sign per entry,
average the weighted entries that agree with it. DARE (Yu et al. 2023): drop entries with probability
1 - density, rescale the kept ones by 1 / density, then sum (dare_linear) or go on as TIES (dare_ties).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AdapterkitError

# PEFT's names. The plain ones act on the adapters' factors (LoRA: the stacked A's, then the B's);
# svd and the *_svd ones on each adapter's full update, cut back to a low rank by SVD.
COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "ties_svd", "dare_linear_svd",
                "dare_ties_svd")
SIGN_METHODS = ("total", "frequency")


@dataclass
class Combination:
    """How to combine: the kind and the options of its steps."""

    how: str = "cat"
    density: float | None = None  # fraction of entries kept (ties, dare); required by them
    majority_sign_method: str = "total"  # ties: elect by the sum of values, or by the count of signs
    svd_rank: int | None = None  # svd kinds: rank of the result (default: the largest rank combined)
    seed: int = 0  # dare: the drop masks come from a generator seeded with this

    def validate(self) -> None:
        if self.how not in COMBINATIONS:
            raise AdapterkitError(f"combination must be one of {', '.join(COMBINATIONS)}, got {self.how!r}")
        if self.pruning:
            if self.density is None:
                raise AdapterkitError(f"combination {self.how} needs a density (the fraction of entries kept, in "
                                      "(0, 1]): pass --density, e.g. 0.5")
        elif self.density is not None:
            raise AdapterkitError(f"density applies to ties and dare combinations, not {self.how}; drop it")
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise AdapterkitError(f"density must be in (0, 1], got {self.density!r}")
        if self.majority_sign_method not in SIGN_METHODS:
            raise AdapterkitError(f"majority_sign_method must be total or frequency, got {self.majority_sign_method!r}")
        if self.svd_rank is not None:
            if not self.on_delta:
                raise AdapterkitError(f"svd_rank applies to the svd combinations, not {self.how}; drop it")
            if not isinstance(self.svd_rank, int) or isinstance(self.svd_rank, bool) or self.svd_rank < 1:
                raise AdapterkitError(f"svd_rank must be a positive integer, got {self.svd_rank!r}")

    @property
    def pruning(self) -> bool:
        return self.how.startswith(("ties", "dare"))

    @property
    def on_delta(self) -> bool:
        """Combine full updates (then SVD) rather than factors."""
        return self.how == "svd" or self.how.endswith("_svd")

    @property
    def rule(self) -> str:
        """The rule applied to the task tensors: linear, ties, dare_linear or dare_ties."""
        return "linear" if self.how == "svd" else self.how.removesuffix("_svd")


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density * numel) entries of largest magnitude, zero the others (TIES' trim)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().flatten(), k=int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (a Bernoulli mask from `generator`) and divide
    the kept ones by `density`, so the expected tensor is unchanged. density 1 draws nothing."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def elect_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each task tensor (stacked on dim 0) agrees with the elected sign: the sign of the sum of
    values ("total") or of the sum of signs ("frequency"); ties go to +. Zeros agree with neither."""
    signs = stacked.sign()
    votes = (stacked if method == "total" else signs).sum(dim=0)
    return signs == torch.where(votes >= 0, 1.0, -1.0).to(signs.dtype)


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of the weighted values that agree with the elected sign (0 where none do)."""
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def merge_tensors(tensors: list[torch.Tensor], weights: list[float], how: Combination,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One tensor from same-shaped task tensors by the rule `how.rule`; dare draws its masks from
    `generator` in the order of `tensors`."""
    rule = how.rule
    if rule.startswith("ties"):
        tensors = [trim(t, how.density) for t in tensors]
    elif rule.startswith("dare"):
        if generator is None:
            raise AdapterkitError("dare combinations need a seeded generator")
        tensors = [drop(t, how.density, generator) for t in tensors]
    stacked = torch.stack(tensors)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if rule in ("ties", "dare_ties"):
        return disjoint_mean(weighted, elect_sign(stacked, how.majority_sign_method))
    return weighted.sum(dim=0)


def split_weight(weight: float) -> tuple[float, float]:
    """A weight shared by two factors whose product it scales: sqrt(|w|) each, the sign on the first."""
    root = math.sqrt(abs(weight))
    return math.copysign(root, weight), root


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-`rank` approximation of `delta` (out, in): B = U_r diag(S_r),
    A = Vh_r from its SVD."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]
