"""Files and formats: adapterkit's own adapter folders, PEFT folders, fingerprints, checkpoints.

`save` and `load` are the one pair that picks the format. This package imports core; core never
imports it at load time (`AdaptedModel.save` is a thin call into `save`).
"""

from __future__ import annotations

from pathlib import Path

from ..core import AdaptedModel
from . import native, peft


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
