"""The training loop's glibc allocator setting, read back through glibc's own statistics and the kernel's."""

import ctypes
import itertools

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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_loop_maps_large_blocks_only_with_checkpointing(checkpointing):
    _train_one_step(checkpointing)
    before = _mapped_bytes()
    block = torch.ones(3 << 20)  # 12 MiB: above the mapped setting's 4 MiB, below the heap setting's 1 GiB
    grown = _mapped_bytes() - before
    assert (grown >= block.nbytes) == checkpointing, grown
    del block
    assert _mapped_bytes() == before  # a mapped block goes back to the OS when freed


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
