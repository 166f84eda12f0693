"""The training loop's glibc allocator setting, read back through glibc's own statistics and the kernel's."""

import ctypes
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_batch, tiny_model

import adapterkit as ak
from adapterkit.training import allocator, train_steps


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _mapped_bytes() -> int:
    """Bytes glibc holds in blocks of their own mapping (mallinfo2's hblkhd)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.fixture(autouse=True)
def heap_setting_after():
    yield
    allocator.tune_allocator(checkpointing=False)  # what every other test's training starts from


def _train_one_step(checkpointing: bool) -> None:
    adapted = ak.adapt(tiny_model("llama"), ak.LoraConfig(r=4, alpha=8))
    if checkpointing:
        adapted.gradient_checkpointing_enable()
    train_steps(adapted, itertools.repeat(tiny_batch()), steps=1)


_MAPPING_PROBE = """
import sys
import torch
sys.path.insert(0, sys.argv[2])
from test_allocator import _mapped_bytes, _train_one_step, allocator
_train_one_step(sys.argv[1] == "1")
allocator.release_free_memory()  # mapped setting: a free top of the heap (kept below 64 MiB) could serve the block
before = _mapped_bytes()
block = torch.ones(3 << 20)  # 12 MiB: above the mapped setting's 4 MiB, below the heap setting's 1 GiB
grown, size = _mapped_bytes() - before, block.nbytes
del block
print(grown, size, _mapped_bytes() - before)
"""


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_loop_maps_large_blocks_only_with_checkpointing(checkpointing):
    # A fresh process: in a long-lived test worker a free heap chunk left by earlier tests can serve the
    # block whatever the threshold (glibc looks in its free lists before it maps).
    done = subprocess.run([sys.executable, "-c", _MAPPING_PROBE, str(int(checkpointing)), str(Path(__file__).parent)],
                          capture_output=True, text=True, check=True)
    grown, block_bytes, after_free = map(int, done.stdout.split()[-3:])
    assert (grown >= block_bytes) == checkpointing, grown
    assert after_free == 0  # a mapped block goes back to the OS when freed


def test_heap_choice_keeps_the_heap_under_checkpointing(monkeypatch):
    monkeypatch.setenv("ADAPTERKIT_MALLOC_TUNING", "heap")
    _train_one_step(True)
    before = _mapped_bytes()
    block = torch.ones(3 << 20)
    assert _mapped_bytes() - before < block.nbytes


def test_release_returns_the_heaps_free_pages():
    assert allocator.tune_allocator(checkpointing=True) == "mapped"
    blocks = [torch.ones(1 << 18) for _ in range(64)]  # 64 blocks of 1 MiB on the heap, touched
    del blocks[::2]  # 32 MiB of holes between live blocks: the heap cannot shrink from its top
    resident = _resident()
    allocator.release_free_memory()
    assert resident - _resident() >= 24 << 20
    assert all(bool((b == 1).all()) for b in blocks)  # the live blocks are untouched
