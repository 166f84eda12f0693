"""The training loop's hooks into the methods, as a part of AdaptedModel kept in its own module: the loop
calls these without naming a method, and each adapter being trained (not merged, with trainable weights)
gets its method's hook (Method.start_training / extra_loss / after_optimizer_step; AdaLoRA's rank
allocator and regulariser run through them)."""

from __future__ import annotations

import torch

from .methods import get_method


class MethodHooks:
    """start_training / extra_loss / after_optimizer_step of AdaptedModel (which supplies records)."""

    def _trained(self) -> list[tuple]:
        return [(get_method(r.config.method), r.name) for r in self.records.values()
                if not r.merged and any(p.requires_grad for p in self._parameters_of(r).values())]

    def start_training(self, total_steps: int) -> None:
        """Before a run of `total_steps` optimizer steps (a method may check or set its schedule)."""
        for method, name in self._trained():
            method.start_training(self, name, total_steps)

    def extra_loss(self) -> torch.Tensor | None:
        """The methods' terms added to each micro-batch's loss (regularisers), or None."""
        terms = [t for method, name in self._trained() if (t := method.extra_loss(self, name)) is not None]
        return sum(terms) if terms else None

    def after_optimizer_step(self, step: int) -> None:
        """After optimizer step `step` (0-based), before the gradients are cleared."""
        for method, name in self._trained():
            method.after_optimizer_step(self, name, step)
