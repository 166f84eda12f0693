"""glibc allocator settings for training on a CPU.

Each training step frees and re-allocates the same large activation buffers. With glibc's defaults
those above 128 KiB to 32 MiB go through mmap/munmap and the heap is trimmed back to the OS, so every
step pays page faults on fresh memory (measured: about 20% of a LoRA step on the default model).
Keeping large blocks on the heap and not trimming it removes that, for a little more resident memory.

With gradient checkpointing the trade goes the other way: each layer's input is kept for the whole
step, scattered between the freed temporaries of the forward, and the backward's larger blocks do not
fit the holes, so the heap grows far past what is live (1.1B shape, nf4, 2,048 tokens: 1.9 GiB of heap
for 1.2 GiB in use). There blocks of 4 MiB and more get their own mapping, returned when freed, and the
free heap is handed back between the forward and the backward (`release_free_memory`): a quarter less
peak, for steps about a fifth slower (page faults; BENCHMARKS.md, long context).

ADAPTERKIT_MALLOC_TUNING=0 leaves the allocator alone; =heap keeps the heap setting even with
checkpointing.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAPPED_FROM = 4 << 20
_mode: str | None = None  # the setting in force: "heap", "mapped" or None (glibc's own)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


def tune_allocator(checkpointing: bool = False) -> str | None:
    """Apply the setting for a run with or without gradient checkpointing (again at each call: loading
    a quantized model sets its own thresholds, see models.py); returns the setting in force."""
    global _mode
    choice = os.environ.get("ADAPTERKIT_MALLOC_TUNING", "1")
    libc = _libc()
    if choice == "0" or libc is None:
        return _mode
    mode = "mapped" if checkpointing and choice != "heap" else "heap"
    mapped = mode == "mapped"
    if libc.mallopt(_M_MMAP_THRESHOLD, _MAPPED_FROM if mapped else 1 << 30) and \
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20 if mapped else 1 << 31):
        _mode = mode
    return _mode


def usual_thresholds() -> None:
    """glibc's thresholds where its own adjustment settles (mmap from 32 MiB, trim above 64 MiB): what a
    program that never sets them trains with (the memory benchmark's PEFT runs)."""
    global _mode
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
        _mode = None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS, where the mapped setting is in force (a few ms)."""
    if _mode == "mapped":
        _libc().malloc_trim(0)
