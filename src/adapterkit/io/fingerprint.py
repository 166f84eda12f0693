"""Proof that an adapter is applied: the adapted and the base model's logits at fixed probe positions.

Saved with every adapter; `load`, `merge`, `export` and `adapterkit verify` recompute it, so an
adapter that silently changes nothing (wrong modules, another base, a dropped prefix) fails loudly.
"""

from __future__ import annotations

import torch

from ..errors import AdapterkitError

PROBE_LENGTH = 16
PROBE_POSITIONS = (3, 7, 11, 15)
PROBE_VOCAB = 16  # logits kept at this many fixed vocabulary indices per position
# Largest relative drift (max |a - b| / max |b|) accepted for the weights' dtype.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Across precisions, the largest drift of the adapter's own change (adapted - base logits) relative to its
# size: bf16 vs fp32 rounding moved it by 14-34% for the study's adapters (135M model), a missing adapter by 100%.
CROSS_PRECISION = 0.5


def probe_ids(vocab_size: int) -> torch.Tensor:
    """A fixed token sequence (no tokenizer needed): spread over the vocabulary, avoiding the first ids
    where special tokens usually sit."""
    low = min(16, vocab_size // 4)
    return torch.tensor([[low + (i * 7919) % (vocab_size - low) for i in range(PROBE_LENGTH)]])


def _vocab_columns(vocab_size: int) -> torch.Tensor:
    return torch.linspace(0, vocab_size - 1, PROBE_VOCAB).long()


@torch.no_grad()
def _logits(adapted, ids: torch.Tensor) -> torch.Tensor:
    was_training = adapted.causal_lm.training
    adapted.eval()
    device = next(adapted.causal_lm.parameters()).device
    try:
        # The class's own forward, autocast off: a mixed-precision wrapper that training left on the
        # instance (accelerate's, under HF Trainer bf16=True) would otherwise round the probe logits.
        with torch.autocast(device.type, enabled=False):
            logits = type(adapted).forward(adapted, input_ids=ids.to(device)).logits.float().cpu()
    finally:
        adapted.train(was_training)
    return logits[0, list(PROBE_POSITIONS)]


def compute(adapted, name: str) -> dict:
    """The fingerprint of adapter `name` alone: probe logits with it and without any adapter."""
    vocab = adapted.causal_lm.config.vocab_size
    ids = probe_ids(vocab)
    previous = adapted.active
    adapted.set_active(name)
    try:
        with_adapter = _logits(adapted, ids)
        with adapted.disabled():
            base = _logits(adapted, ids)
    finally:
        adapted.set_active(*previous)
    columns = _vocab_columns(vocab)
    return {
        "probe_ids": ids[0].tolist(), "positions": list(PROBE_POSITIONS), "vocab_columns": columns.tolist(),
        "dtype": str(next(adapted.causal_lm.parameters()).dtype).removeprefix("torch."),
        "adapted": with_adapter[:, columns].tolist(), "base": base[:, columns].tolist(),
        "adapted_argmax": with_adapter.argmax(-1).tolist(),
        "max_change": (with_adapter - base).abs().max().item(),
    }


def relative_drift(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp(min=1e-6)).item()


def _saved_dtype(saved: dict) -> torch.dtype:
    """The dtype a fingerprint was taken in: only the listed ones, so a file cannot widen the tolerance."""
    name = saved.get("dtype", "float32")
    names = {str(d).removeprefix("torch."): d for d in TOLERANCE}
    if not isinstance(name, str) or name not in names:
        raise AdapterkitError(f"the saved fingerprint has dtype {name!r}; adapterkit writes one of "
                              f"{', '.join(sorted(names))}: the adapter file was altered")
    return names[name]


def check(adapted, name: str, saved: dict | None, trained_steps: int = 0) -> dict:
    """Recompute and compare; raises with one clear line on drift or a no-op adapter. Returns the
    recomputed fingerprint with `drift` (relative to the saved adapted logits)."""
    now = compute(adapted, name)
    dtype = next(adapted.causal_lm.parameters()).dtype
    saved_dtype = _saved_dtype(saved) if isinstance(saved, dict) else dtype
    tolerance = max(TOLERANCE.get(dtype, 5e-2), TOLERANCE.get(saved_dtype, 5e-2))
    if saved:
        if not isinstance(saved, dict):
            raise AdapterkitError("the saved fingerprint is not an object: the adapter file was altered")
        if saved.get("probe_ids") != now["probe_ids"]:
            raise AdapterkitError("the saved fingerprint was taken on another vocabulary; this is another base model")
        try:
            saved_base, saved_adapted = torch.tensor(saved["base"]), torch.tensor(saved["adapted"])
            base_drift = relative_drift(torch.tensor(now["base"]), saved_base)
            relative_drift(torch.tensor(now["adapted"]), saved_adapted)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise AdapterkitError("the saved fingerprint is malformed (its probe logits do not read back): the "
                                  "adapter file was altered") from exc
        if not base_drift <= tolerance:
            raise AdapterkitError(f"the base model's probe logits differ from the ones saved with the adapter "
                                  f"(relative drift {base_drift:.2g} > {tolerance:g}): this is another base model; "
                                  "load the adapter's own base, or pass --force")
        now["drift"] = relative_drift(torch.tensor(now["adapted"]), saved_adapted)
        # Taken in another precision (trained in bf16, loaded in fp32), an adapter can amplify the rounding noise
        # of the whole forward past bf16's tolerance; then its own change (adapted - base) must still be there:
        # an adapter not applied, or applied to other modules, moves that change by about 100% of itself.
        change_drift = relative_drift(torch.tensor(now["adapted"]) - torch.tensor(now["base"]),
                                      saved_adapted - saved_base)
        if not (now["drift"] <= tolerance or (saved_dtype != dtype and change_drift <= CROSS_PRECISION)):
            raise AdapterkitError(f"the adapted model's probe logits drift from the saved fingerprint by "
                                  f"{now['drift']:.2g} (> {tolerance:g} for {dtype}"
                                  + (f"; the adapter's change by {change_drift:.2g} > {CROSS_PRECISION:g}"
                                     if saved_dtype != dtype else "") + "); the adapter is not applied "
                                  "as it was saved (modules renamed, weights altered, or another base)")
    if trained_steps > 0 and now["max_change"] == 0.0:
        raise AdapterkitError(f"adapter {name!r} was trained for {trained_steps} steps but gives exactly the base "
                              "model's logits: it changes nothing (zero update, or nothing attached)")
    return now
