"""What the machine multiplies fast: the precision `auto` resolves to."""

from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products (Cooper Lake / Sapphire Rapids and later)


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | None = None, flags: set[str] | None = None) -> bool:
    """True where bf16 matrix products run natively: a CUDA device with bf16, or a CPU with its flags."""
    if device is not None and device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(flag in (cpu_flags() if flags is None else flags) for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device | None = None, flags: set[str] | None = None) -> str:
    """`auto` -> "bf16" (frozen base in bf16 under autocast) where the hardware has native bf16, else "fp32"."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device, flags) else "fp32"
