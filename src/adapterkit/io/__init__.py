"""Files and formats: adapterkit's own adapter folders, PEFT folders, fingerprints, checkpoints.

`save` and `load` are the one pair that picks the format. This package imports core; core never
imports it at load time (`AdaptedModel.save` is a thin call into `save`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..core import AdaptedModel
from ..errors import AdapterkitError
from . import fingerprint, native, peft


def save(adapted: AdaptedModel, directory: str | Path, name: str | None = None, format: str = "native",
         overwrite: bool = False) -> Path:
    """Write adapter `name` as adapterkit's own folder ("native") or as a PEFT folder ("peft", into
    an empty folder unless `overwrite`)."""
    name = name or adapted._single_name()
    if format == "peft":
        return peft.export_peft(adapted, directory, name, overwrite=overwrite)
    return native.save_adapter(adapted, Path(directory), name)


def load(model, directory: str | Path, name: str = "default", trainable: bool = False, force: bool = False):
    """Attach the adapter saved in `directory` (adapterkit's or PEFT's format) to `model`, a
    transformers model or an AdaptedModel; returns the AdaptedModel."""
    adapted = model if isinstance(model, AdaptedModel) else AdaptedModel(model)
    if peft.is_peft_folder(directory):  # a Hugging Face PEFT folder: read directly (safetensors only)
        return peft.load_peft(adapted, directory, name, trainable=trainable)
    return native.load_adapter(adapted, directory, name, trainable=trainable, force=force)


def hotswap(adapted: AdaptedModel, directory: str | Path, name: str = "default", force: bool = False) -> None:
    """Put the weights saved in `directory` (adapterkit's or PEFT's folder) into adapter `name` in place,
    checked like a load (base identity, finite weights, the saved fingerprint). The two must have the same
    method and settings, so the same shapes and scalings: nothing is attached or removed, so a compiled
    model runs the new weights without recompiling and a served name keeps its mixed-batch stacks."""
    record = adapted._record(name)
    if any(getattr(part, "changes_base", False) for part in record.parts.values()):
        raise AdapterkitError(f"cannot hot-swap into adapter {name!r}: its LoRA init rewrote the base weights, "
                              "which the new weights do not fit; load the new adapter onto a fresh base instead")
    if peft.is_peft_folder(directory):
        meta, tensors = peft.read_peft(directory)
        config, weights = peft.from_peft(meta, tensors, adapted.layout.shape)
        saved_fingerprint = None  # PEFT folders carry none
    else:
        meta, tensors = native.read_adapter(directory)
        config = native.config_from_json(meta)
        native.check_loadable(meta, tensors, force)
        native.check_base(meta.get("base_model"), native.base_identity(adapted), force)
        weights, saved_fingerprint = native.trainable_only(tensors), meta.get("fingerprint")
    own, new = record.config.for_loaded_weights().to_dict(), config.for_loaded_weights().to_dict()
    differ = [key for key, value in own.items() if new.get(key) != value]
    if type(config) is not type(record.config) or differ:
        what = f"method {config.method} (not {record.config.method})" if type(config) is not type(record.config) \
            else ", ".join(f"{key} {new.get(key)!r} (not {own[key]!r})" for key in differ)
        raise AdapterkitError(f"cannot hot-swap {directory} into adapter {name!r}: it has {what}; load it under "
                              "a new name instead")
    before = {key: t.clone() for key, t in adapted.adapter_state_dict(name).items()}
    adapted.load_adapter_state_dict(weights, name)
    try:
        if saved_fingerprint is not None or not force:
            with torch.compiler.set_stance("force_eager"):  # probes of their own shapes: compile nothing for them
                fingerprint.check(adapted, name, saved_fingerprint, int(meta.get("trained_steps", 0)))
    except AdapterkitError:
        adapted.load_adapter_state_dict(before, name)  # the adapter stays as it was
        raise
