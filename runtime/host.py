"""What the runtime needs to know about the machine it runs on: architecture, ISA flags,
usable cores, NVIDIA GPUs and the installed inference packages.

The one table of architecture names lives here (:data:`ARCH_ALIASES`); devices/ and export/
import it. Stdlib only and cheap: package versions come from ``importlib.metadata`` and are
never imported (``import tvm`` pulls in torch in a full build venv). Probes that read the system
are cached per process.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import shutil
import subprocess
from typing import Any, Optional

__all__ = ["ARCH_ALIASES", "normalize_arch", "machine_arch", "cpuinfo", "isa_flags",
           "usable_cores", "cgroup_cpu_quota", "nvidia_gpus", "package_versions", "importable"]

#: ``platform.machine()`` / triple prefixes -> normalised architecture. 32-bit Arm userlands
#: (``armv7l``, and ``armv8l``: a 32-bit process on a 64-bit core) are ``arm``: aarch64 code
#: cannot load there. Big-endian ``aarch64_be`` is its own architecture.
ARCH_ALIASES = {
    "x86_64": "x86_64", "amd64": "x86_64", "x64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64",
    "armv6l": "arm", "armv7l": "arm", "armv8l": "arm", "armhf": "arm", "arm": "arm",
}

# ISA features worth recording (compiled code may depend on them). Names follow Linux
# /proc/cpuinfo, except on aarch64 where Linux's names are mapped to the compiler's.
_X86_KEEP = re.compile(
    r"^(sse2|ssse3|sse4_1|sse4_2|popcnt|avx|avx2|fma|f16c|bmi1|bmi2|movbe|abm|"
    r"avx512\w*|avx_vnni\w*|avx_vnni|amx\w*)$"
)
_ARM_MAP = {"asimd": "neon", "asimdhp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm",
            "bf16": "bf16", "sve": "sve", "sve2": "sve2", "sme": "sme", "fphp": "fphp"}


def normalize_arch(name: str) -> str:
    """Normalised architecture of a ``platform.machine()`` value or triple prefix."""
    m = name.lower()
    if m.startswith(("armv6", "armv7", "arm-")):
        return "arm"
    return ARCH_ALIASES.get(m, m)


def machine_arch(machine: Optional[str] = None) -> str:
    """This machine's normalised architecture (``x86_64``, ``aarch64``, ``arm``, ...)."""
    return normalize_arch(machine if machine is not None else (platform.machine() or ""))


def read_text(path: str) -> Optional[str]:
    """A small system file's text, or None when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def cpuinfo() -> tuple[dict[str, str], tuple[str, ...]]:
    """First processor block of /proc/cpuinfo (plus board-level keys) and its flag list."""
    text = read_text("/proc/cpuinfo") or ""
    first: dict[str, str] = {}
    tail: dict[str, str] = {}
    block = 0
    for line in text.splitlines():
        if not line.strip():
            block += 1
            continue
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if block == 0 and key not in first:
            first[key] = value
        tail[key] = value  # Raspberry Pi puts "Model"/"Hardware" after the last core
    for key in ("Model", "Hardware", "Revision"):
        if key in tail and key not in first:
            first[key] = tail[key]
    flags = (first.get("flags") or first.get("Features") or "").split()
    return first, tuple(flags)


@functools.lru_cache(maxsize=1)
def isa_flags() -> tuple[str, ...]:
    """Sorted ISA features of this CPU that compiled code may depend on."""
    arch = machine_arch()
    _, flags = cpuinfo()
    out: set[str] = set()
    if arch == "x86_64":
        out = {f for f in flags if _X86_KEEP.match(f)}
        out.add("sse2")  # x86-64 baseline, even if /proc/cpuinfo is unavailable
    elif arch == "aarch64":
        out = {_ARM_MAP[f] for f in flags if f in _ARM_MAP}
        out.add("neon")  # Advanced SIMD is mandatory on AArch64 (Linux calls it asimd)
    return tuple(sorted(out))


def _ancestors(rel: str) -> list[str]:
    """``/a/b`` -> ``["/a/b", "/a", "/"]`` (a cgroup's limit is the tightest of its ancestors')."""
    parts = [p for p in rel.strip().split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), -1, -1)]


def cgroup_cpu_quota(proc_cgroup: str = "/proc/self/cgroup",
                     root: str = "/sys/fs/cgroup") -> Optional[float]:
    """CPUs of this process's cgroup CPU quota (``quota / period``), None when unlimited or
    unreadable. cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``);
    the tightest limit along the cgroup's path up to the root (inside a container the path in
    ``/proc/self/cgroup`` may be the host's: the container's own root is read too)."""
    text = read_text(proc_cgroup)
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2 unified hierarchy: "0::/path"
            for d in _ancestors(rel):
                raw = read_text(os.path.join(root, d.lstrip("/"), "cpu.max"))
                fields = raw.split() if raw else []
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        q, p = int(fields[0]), int(fields[1])
                    except ValueError:
                        continue
                    if q > 0 and p > 0:
                        limits.append(q / p)
        elif "cpu" in controllers.split(","):  # v1: "4:cpu,cpuacct:/path"
            for mount in (controllers, "cpu", "cpu,cpuacct"):
                base = os.path.join(root, mount)
                if not os.path.isdir(base):
                    continue
                for d in _ancestors(rel):
                    q = read_text(os.path.join(base, d.lstrip("/"), "cpu.cfs_quota_us"))
                    p = read_text(os.path.join(base, d.lstrip("/"), "cpu.cfs_period_us"))
                    try:
                        qi, pi = int(q or "-1"), int(p or "0")
                    except ValueError:
                        continue
                    if qi > 0 and pi > 0:
                        limits.append(qi / pi)
                break
    return min(limits) if limits else None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (``os.sched_getaffinity``; else
    ``os.cpu_count()``), capped by a cgroup CPU quota rounded down (``--cpus=1.5`` -> 1: a
    second busy thread would exhaust the quota and be throttled for the rest of the period)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        n = min(n, max(1, math.floor(quota + 1e-9)))
    return max(1, n)


@functools.lru_cache(maxsize=1)
def nvidia_gpus(timeout_s: float = 5.0) -> tuple[dict[str, Any], ...]:
    """GPUs reported by ``nvidia-smi`` (name, compute_capability, memory_gb); empty if none.

    Needs a driver new enough for the ``compute_cap`` query field (R510+); older drivers
    report the name only. Never raises.
    """
    exe = shutil.which("nvidia-smi")
    if not exe:
        return ()
    for query in ("name,compute_cap,memory.total", "name,memory.total"):
        try:
            res = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout_s, check=False)
        except (OSError, subprocess.SubprocessError):
            return ()
        if res.returncode != 0:
            continue
        gpus = []
        for line in res.stdout.strip().splitlines():
            cols = [c.strip() for c in line.split(",")]
            if query.startswith("name,compute_cap") and len(cols) >= 3:
                name, cc, mem = cols[0], cols[1], cols[2]
            elif len(cols) >= 2:
                name, cc, mem = cols[0], None, cols[1]
            else:
                continue
            if cc is not None and not re.match(r"^\d+\.\d+$", cc):
                cc = None
            try:
                mem_gb: Optional[float] = round(float(mem) / 1024.0, 1)  # MiB
            except ValueError:
                mem_gb = None
            gpus.append({"name": name, "compute_capability": cc, "memory_gb": mem_gb})
        return tuple(gpus)
    return ()


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible (device node or nvidia-smi)."""
    return (os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvhost-gpu")
            or shutil.which("nvidia-smi") is not None)


_DISTS = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml",
                    "onnxruntime-openvino"),
    "tvm": ("apache-tvm", "tvm", "mlc-ai-nightly", "mlc-ai-nightly-cu122"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs"),
}


def importable(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def package_versions() -> dict[str, Optional[str]]:
    """Installed versions of numpy / onnxruntime / tvm / tensorrt, without importing them.

    ``None`` if absent; ``"unknown"`` if importable but without distribution metadata
    (e.g. TensorRT from JetPack's apt packages or TVM built from source).
    """
    out: dict[str, Optional[str]] = {}
    for key, dists in _DISTS.items():
        version = None
        for dist in dists:
            try:
                version = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        if version is None:
            version = "unknown" if importable(key) else None
        out[key] = version
    return out
