"""glibc allocator settings for training on a CPU.

Each training step frees and re-allocates the same large activation buffers. With glibc's defaults
those above 128 KiB to 32 MiB go through mmap/munmap and the heap is trimmed back to the OS, so every
step pays page faults on fresh memory (measured: about 20% of a LoRA step on the default model).
Keeping large blocks on the heap and not trimming it removes that, for a little more resident memory.
Set ADAPTERKIT_MALLOC_TUNING=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_done = False


def tune_allocator() -> bool:
    """Apply on Linux/glibc (again at each call: loading a quantized model sets its own thresholds, see
    models.py); returns whether the settings are in force."""
    global _done
    if os.environ.get("ADAPTERKIT_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
    except (OSError, AttributeError):  # not glibc
        _done = False
    return _done
