"""Writing files safely: atomic folders of files, and output folders that are checked before work."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import AdapterkitError


def write_files(directory: Path, texts: dict[str, str], tensor_files: dict[str, dict[str, torch.Tensor]]) -> None:
    """Write every file into a temporary folder beside `directory`, then move each into place.

    A crash leaves either the old file or the new one, never a half-written one.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        for name, tensors in tensor_files.items():
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        for name, text in texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        for name in [*tensor_files, *texts]:  # the config moves last: it marks the folder complete
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_output(path: Path, overwrite: bool, resuming: bool = False) -> None:
    """Refuse a non-empty output folder unless asked (or resuming into it); nothing is created here."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterkitError(f"output {path} exists and is not a folder; choose another --output")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resuming):
        raise AdapterkitError(f"output folder {path} is not empty; choose another --output, pass --overwrite"
                              + (", or --resume auto to continue its run" if not resuming else ""))
