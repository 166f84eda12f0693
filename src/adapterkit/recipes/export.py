"""`adapterkit export`: write an adapter in another library's format (peft: Hugging Face PEFT)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterkitError
from ..io import save
from ..io.files import check_output
from ..io.native import config_from_json, read_adapter, recorded_base
from ..io.peft import is_peft_folder, refuse_unexportable
from ..models import DEFAULT_MODEL
from ..settings import check_fields, option
from .common import load_for_inference

FORMATS = ("peft",)


@dataclass
class ExportSettings:
    adapter: str = option(None, "adapter folder (adapterkit's format)", required=True)
    output: str = option(None, "folder to write", required=True)
    format: str = option("peft", "peft: a Hugging Face PEFT folder", choices=FORMATS)
    model: str | None = option(None, "the base model (default: the one recorded in the adapter)")
    overwrite: bool = option(False, "replace a non-empty output folder")
    force: bool = option(False, "load the adapter onto a base model other than its own")

    def __post_init__(self) -> None:
        check_fields(self)


def export(settings: ExportSettings) -> Path:
    """Load the adapter onto its base model and write it in the chosen format; returns the folder."""
    if is_peft_folder(settings.adapter):
        raise AdapterkitError(f"{settings.adapter} is a PEFT adapter folder already; PEFT loads it as it is")
    meta, _ = read_adapter(settings.adapter)
    refuse_unexportable(config_from_json(meta))  # before the slow part
    check_output(Path(settings.output), settings.overwrite)
    base = settings.model or recorded_base(meta) or DEFAULT_MODEL
    adapted, _ = load_for_inference(base, settings.adapter, force=settings.force)
    return save(adapted, settings.output, format=settings.format, overwrite=settings.overwrite)
