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
        return cpu_has_native_bf16() and not _capped_below_avx512()
    return False


def _capped_below_avx512() -> bool:
    """True when torch's CPU kernels are capped below native bf16 (``ATEN_CPU_CAPABILITY=avx2``
    or ``ONEDNN_MAX_CPU_ISA`` below ``AVX512_CORE_BF16``): bf16 then runs emulated, slower than
    fp32."""
    import os

    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_BELOW_BF16:
        return True
    try:
        return torch.backends.cpu.get_cpu_capability().upper() in ("DEFAULT", "AVX2")
    except (AttributeError, RuntimeError):
        return False


#: oneDNN ISA caps without native bf16 math
_ONEDNN_BELOW_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                                "AVX512_CORE_VNNI"})
