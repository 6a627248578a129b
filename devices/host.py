"""Detect the machine this code runs on.

Used by the ``x86-host`` profile (alias ``host``) at load time, by the ``nvidia-gpu``
profile (``nvidia-smi``), by :meth:`devices.profile.Profile.is_host_compatible`, and by
the measuring profiler to stamp results with a machine fingerprint.

Stdlib only, and cheap. The probes the runtime itself needs (architecture names, ISA flags,
GPUs, package versions, usable cores) live in :mod:`runtime.host`; this module adds what
profiles and the profiler need on top (CPU model, peak estimate, LLVM target, fingerprint).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import sys
from typing import Any

from runtime.host import cpuinfo as _cpuinfo
from runtime.host import isa_flags, machine_arch, nvidia_gpus, package_versions, usable_cores
from runtime.host import read_text as _read

__all__ = [
    "cpu_info",
    "fingerprint",
    "guess_profile",
    "isa_flags",
    "llvm_target",
    "machine_arch",
    "memory_gb",
    "nvidia_gpus",
    "package_versions",
    "peak_cpu_gflops",
    "x86_64_level",
]

# x86-64 micro-architecture levels (psABI); v4 is the AVX-512 baseline.
_X86_LEVELS = (
    (4, {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    (3, {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"}),
    (2, {"sse4_1", "sse4_2", "ssse3", "popcnt"}),
)
# Arm "CPU part" (MIDR) -> (LLVM mcpu, human name); implementer 0x41 (Arm) unless noted.
_ARM_PARTS = {
    ("0x41", "0xd03"): ("cortex-a53", "Arm Cortex-A53"),
    ("0x41", "0xd07"): ("cortex-a57", "Arm Cortex-A57"),
    ("0x41", "0xd08"): ("cortex-a72", "Arm Cortex-A72"),
    ("0x41", "0xd0b"): ("cortex-a76", "Arm Cortex-A76"),
    ("0x41", "0xd0c"): ("neoverse-n1", "Arm Neoverse-N1"),
    ("0x41", "0xd40"): ("neoverse-v1", "Arm Neoverse-V1"),
    ("0x41", "0xd41"): ("cortex-a78", "Arm Cortex-A78"),
    ("0x41", "0xd42"): ("cortex-a78ae", "Arm Cortex-A78AE"),
    ("0x41", "0xd49"): ("neoverse-n2", "Arm Neoverse-N2"),
    ("0x41", "0xd4f"): ("neoverse-v2", "Arm Neoverse-V2"),
    ("0x4e", "0x004"): ("carmel", "NVIDIA Carmel"),
}


def x86_64_level(isa: tuple[str, ...] | None = None) -> int | None:
    """x86-64 micro-architecture level (1-4) from ISA flags; None off x86-64."""
    if isa is None:
        if machine_arch() != "x86_64":
            return None
        isa = isa_flags()
    have = set(isa)
    for level, need in _X86_LEVELS:
        # "abm" is how Linux spells LZCNT; some hypervisors hide it, so don't insist.
        if need - {"abm"} <= have:
            return level
    return 1


def _max_ghz(first: dict[str, str]) -> float | None:
    khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if khz and khz.strip().isdigit():
        return round(int(khz.strip()) / 1e6, 3)
    mhz = first.get("cpu MHz")
    try:
        return round(float(mhz) / 1000.0, 3) if mhz else None
    except ValueError:
        return None


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model, vendor, logical/usable cores, threads per core, max clock, LLVM mcpu."""
    arch = machine_arch()
    first, _ = _cpuinfo()
    logical = os.cpu_count() or 1
    usable = usable_cores()
    vendor = first.get("vendor_id")
    model = first.get("model name") or first.get("Processor") or ""
    core_type = None
    if arch == "aarch64":
        key = (first.get("CPU implementer", "").lower(), first.get("CPU part", "").lower())
        if key in _ARM_PARTS:
            core_type, human = _ARM_PARTS[key]
            model = model or human
        vendor = vendor or {"0x41": "Arm", "0x4e": "NVIDIA"}.get(key[0])
    threads_per_core = 1
    try:
        siblings, cores = int(first.get("siblings", 0)), int(first.get("cpu cores", 0))
        if siblings and cores and siblings >= cores:
            threads_per_core = max(1, siblings // cores)
    except ValueError:
        pass
    if arch == "x86_64":
        core_type = f"x86-64-v{x86_64_level()}" if x86_64_level() > 1 else "x86-64"
    return {
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_vendor": vendor,
        "cpu_core_type": core_type,
        "cpu_cores": logical,
        "usable_cores": usable,
        "threads_per_core": threads_per_core,
        "cpu_max_ghz": _max_ghz(first),
    }


@functools.lru_cache(maxsize=1)
def memory_gb() -> float | None:
    """Physical memory in GiB (None if it cannot be read)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if platform.system() == "Darwin":  # no SC_PHYS_PAGES on macOS
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5)
            return round(int(out.stdout.strip()) / 1024**3, 1)
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
    return None


def _triple(arch: str) -> str:
    system = platform.system()
    if system == "Darwin":
        return "arm64-apple-macos" if arch == "aarch64" else "x86_64-apple-macos"
    if system == "Windows":
        return f"{arch}-pc-windows-msvc"
    return f"{arch}-linux-gnu"


def peak_cpu_gflops(info: dict[str, Any] | None = None, isa: tuple[str, ...] | None = None) -> float:
    """Rough fp32 peak: physical cores x GHz x FLOP/cycle from the widest FMA unit.

    FLOP/cycle per core assumes two FMA pipes: 64 for AVX-512 on Intel (32 on AMD, whose
    Zen 4 runs 512-bit ops as two 256-bit halves), 32 for AVX2+FMA, 16 for AVX or
    NEON (2 x 128-bit FMA), 8 for SSE.  Clock defaults to 2.0 GHz when unknown.
    This is an *estimate*; the measuring profiler replaces it.
    """
    info = info or cpu_info()
    have = set(isa if isa is not None else isa_flags())
    if "avx512f" in have:
        per_cycle = 32 if (info.get("cpu_vendor") or "").startswith("AuthenticAMD") else 64
    elif {"avx2", "fma"} <= have:
        per_cycle = 32
    elif "avx" in have or "neon" in have:
        per_cycle = 16
    else:
        per_cycle = 8
    physical = max(1, info["cpu_cores"] // max(1, info.get("threads_per_core") or 1))
    ghz = info.get("cpu_max_ghz") or 2.0
    return round(physical * ghz * per_cycle, 1)


def llvm_target(info: dict[str, Any] | None = None, isa: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A TVM JSON-dict llvm target for this machine (no TVM import needed).

    x86-64: ``mcpu`` is the psABI level (``x86-64-v3``/``-v4``), plus ``mattr`` for
    features beyond that level (VNNI, BF16, AMX).  AArch64: ``mcpu`` from the MIDR
    part number when known, ``mattr`` with ``+neon`` and dotprod/fp16/i8mm/sve.
    """
    info = info or cpu_info()
    isa = tuple(isa if isa is not None else isa_flags())
    arch = machine_arch()
    have = set(isa)
    target: dict[str, Any] = {"kind": "llvm"}
    if arch == "x86_64":
        target["mtriple"] = _triple(arch)
        target["mcpu"] = info.get("cpu_core_type") or "x86-64"
        extra = {
            "avx512_vnni": "+avx512vnni",
            "avx512_bf16": "+avx512bf16",
            "avx_vnni": "+avxvnni",
            "amx_tile": "+amx-tile",
            "amx_int8": "+amx-int8",
            "amx_bf16": "+amx-bf16",
        }
        mattr = [v for k, v in extra.items() if k in have]
        if mattr:
            target["mattr"] = mattr
    elif arch == "aarch64":
        target["mtriple"] = _triple(arch)
        if info.get("cpu_core_type"):
            target["mcpu"] = info["cpu_core_type"]
        feats = {"neon": "+neon", "dotprod": "+dotprod", "fp16": "+fullfp16", "i8mm": "+i8mm", "sve": "+sve"}
        target["mattr"] = [v for k, v in feats.items() if k in have]
    target["num-cores"] = info.get("usable_cores") or info["cpu_cores"]
    return target


def _board() -> str | None:
    model = _read("/proc/device-tree/model") or _read("/sys/firmware/devicetree/base/model")
    if model:
        return model.strip("\x00\n ") or None
    return _cpuinfo()[0].get("Model")


def _l4t() -> str | None:
    text = _read("/etc/nv_tegra_release")
    if not text:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def fingerprint() -> dict[str, Any]:
    """A JSON-serialisable description of this machine and its inference software.

    Keys: arch, system, os, board, l4t, cpu_model, cpu_vendor, cpu_core_type,
    cpu_cores, usable_cores, threads_per_core, cpu_max_ghz, isa, x86_64_level,
    memory_gb, gpus, python, python_implementation, numpy, onnxruntime, tvm, tensorrt.
    """
    info = cpu_info()
    fp: dict[str, Any] = {
        "arch": machine_arch(),
        "system": platform.system(),
        "os": platform.platform(),
        "board": _board(),
        "l4t": _l4t(),
        **info,
        "isa": list(isa_flags()),
        "x86_64_level": x86_64_level() if machine_arch() == "x86_64" else None,
        "memory_gb": memory_gb(),
        "gpus": [dict(g) for g in nvidia_gpus()],
        "python": platform.python_version(),
        "python_implementation": sys.implementation.name,
    }
    fp.update(package_versions())
    return fp


# Board-string / GPU-name fragments -> shipped profile name (first match wins).
_BOARD_HINTS = (
    ("orin nano", "jetson-orin-nano"),
    ("orin nx", "jetson-orin-nx"),
    ("agx orin", "jetson-agx-orin"),
    ("xavier nx", "jetson-xavier-nx"),
    ("raspberry pi 5", "raspberry-pi-5"),
    ("raspberry pi 4", "raspberry-pi-4"),
)


def guess_profile(fp: dict[str, Any] | None = None) -> str:
    """Name of the shipped profile that best describes a machine (default: this one)."""
    fp = fp if fp is not None else fingerprint()
    board = (fp.get("board") or "").lower()
    for hint, name in _BOARD_HINTS:
        if hint in board:
            return name
    if fp.get("gpus"):
        return "nvidia-gpu"
    return "x86-host"
