"""Writing files safely: atomic folders of files, a manifest of what adapterkit wrote, output folders
checked before any work, and disk errors as one clear line."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import AdapterkitError

MANIFEST = ".adapterkit-outputs.json"  # the names adapterkit wrote in a folder: all --overwrite may remove


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn a failed write (read-only folder, full disk) into one line naming the path and the fix."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        if "No space" in reason or "os error 28" in reason:
            reason = "no space left on the disk"
        raise AdapterkitError(f"cannot write {path}: {reason}; free space or make the folder writable, or choose "
                              "another --output (the last complete files are kept)") from exc


def usual_mode(path: Path) -> None:
    """Give a file (or every file under a folder) the mode the umask gives new files (0644 by default):
    safetensors writes 0600, which another user or a serving container cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    for file in [p for p in Path(path).rglob("*") if p.is_file()] if Path(path).is_dir() else [Path(path)]:
        os.chmod(file, 0o666 & ~mask)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with writing(path):
        save_file(tensors, str(path), metadata={"format": "pt"})
        usual_mode(path)


def write_files(directory: Path, texts: dict[str, str], tensor_files: dict[str, dict[str, torch.Tensor]],
                record: bool = False) -> None:
    """Write every file into a temporary folder beside `directory`, then move each into place; with
    `record`, add their names to the folder's manifest (what --overwrite may remove).

    A crash leaves either the old file or the new one, never a half-written one.
    """
    directory = Path(directory)
    with writing(directory):
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory))
    try:
        for name, tensors in tensor_files.items():
            save_tensors(tensors, tmp / name)
        with writing(directory):
            for name, text in texts.items():
                (tmp / name).write_text(text, encoding="utf-8")
            if record:
                note_outputs(directory, [*tensor_files, *texts])
            for name in [*tensor_files, *texts]:  # the config moves last: it marks the folder complete
                os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def written_by_us(directory: Path) -> set[str]:
    try:
        names = json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def note_outputs(directory: Path, names: list[str]) -> None:
    """Add names (files or folders directly in `directory`) to its manifest, atomically."""
    directory = Path(directory)
    known = written_by_us(directory) | set(names)
    with writing(directory):
        tmp = directory / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(sorted(known)) + "\n", encoding="utf-8")
        os.replace(tmp, directory / MANIFEST)


def foreign_files(directory: Path) -> list[str]:
    """Entries of a folder that adapterkit did not write there."""
    ours = written_by_us(directory) | {MANIFEST}
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in ours and not p.name.startswith(".tmp"))


def check_folder_target(path: Path) -> None:
    """A folder can be made (or used) at `path`: it is not a file, and no folder above it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise AdapterkitError(f"output {path} exists and is not a folder; choose another --output")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise AdapterkitError(f"output {path} cannot be made: {above} is a file; choose another --output")


def check_output(path: Path, overwrite: bool, resuming: bool = False, resumable: bool = False) -> None:
    """Refuse a non-empty output folder unless resuming into it, or asked to overwrite a folder that
    holds only adapterkit's own outputs; nothing is created or removed here."""
    path = Path(path)
    check_folder_target(path)
    if not path.is_dir() or not any(path.iterdir()) or resuming:
        return
    if not overwrite:
        raise AdapterkitError(f"output folder {path} is not empty; choose another --output, pass --overwrite"
                              + (", or --resume auto to continue its run" if resumable else ""))
    foreign = foreign_files(path)
    if foreign:
        raise AdapterkitError(f"--overwrite removes only what adapterkit wrote, and {path} also holds "
                              f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}; move those or "
                              "choose another --output")


def clear_outputs(path: Path) -> None:
    """Remove what adapterkit wrote in a folder (after check_output allowed --overwrite)."""
    path = Path(path)
    for name in written_by_us(path):
        target = path / name
        with writing(target):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    (path / MANIFEST).unlink(missing_ok=True)


def publish_folder(tmp: Path, out: Path) -> None:
    """Move a fully written temporary folder into place as `out`: its files listed in its manifest and
    given the usual mode; an old `out` (which check_output found holds only adapterkit's files) replaced."""
    with writing(out):
        note_outputs(tmp, [p.name for p in tmp.iterdir()])
        usual_mode(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
