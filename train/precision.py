"""Mixed precision: whether bf16 autocast pays off on the device we train on."""
from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 math (Cooper Lake / Zen 4 / Sapphire Rapids on)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU lists a native bf16 instruction set (Linux /proc/cpuinfo flags)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    return any(f in flags for f in BF16_CPU_FLAGS)


def resolve_bf16(setting: bool | str, device: torch.device) -> bool:
    """``True``/``False`` as given; ``"auto"``: bf16 autocast where the hardware computes bf16 natively.

    On CPUs without native bf16 (e.g. AVX2-only) autocast is emulated and slower than fp32, so
    "auto" leaves it off there.
    """
    if setting != "auto":
        return bool(setting)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False
