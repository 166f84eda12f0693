"""Training: the loop, its losses, data parallelism and the allocator setting. No file formats inside."""

from .loop import fit, make_optimizer, micro_step, train_steps  # noqa: F401
from .loss import LowPrecisionCrossEntropy, causal_lm_loss, labelled_loss  # noqa: F401
