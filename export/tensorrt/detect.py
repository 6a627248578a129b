"""Guarded detection of the TensorRT version and the GPU compute capability (never imports torch).

Both functions return ``None`` instead of raising when the information is not available, so
they are safe to call on machines without TensorRT, CUDA or a GPU (such as this project's CI).
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

from export.tensorrt.config import normalize_compute_capability, parse_trt_version

# Jetson SoCs without nvidia-smi (JetPack 5/6): device-tree "compatible" -> compute capability.
_TEGRA_CC = {"tegra194": "7.2", "tegra234": "8.7"}


def import_tensorrt():
    """Import and return the ``tensorrt`` module, or ``None`` when it (or libnvinfer) is missing."""
    try:
        if importlib.util.find_spec("tensorrt") is None:
            return None
        return importlib.import_module("tensorrt")
    except Exception:  # ImportError, OSError from a missing libnvinfer, ...
        return None


def tensorrt_version(trt=None) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of the installed TensorRT Python package, or ``None``."""
    module = trt if trt is not None else import_tensorrt()
    if module is None:
        return None
    text = getattr(module, "__version__", None)
    if not text:
        return None
    try:
        return parse_trt_version(text)
    except ValueError:
        return None


def _from_nvidia_smi(device: int) -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader", f"--id={device}"],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    for line in out.stdout.splitlines():
        try:
            return normalize_compute_capability(line.strip())
        except ValueError:
            continue
    return None


def _from_cuda_python(device: int) -> str | None:
    for name in ("cuda.bindings.runtime", "cuda.cudart"):  # cuda-python >= 12.6 / older layout
        try:
            if importlib.util.find_spec(name.rsplit(".", 1)[0]) is None:
                continue
            rt = importlib.import_module(name)
        except Exception:
            continue
        try:
            err, major = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, device)
            err2, minor = rt.cudaDeviceGetAttribute(rt.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, device)
            if int(err) == 0 and int(err2) == 0:
                return f"{int(major)}.{int(minor)}"
        except Exception:
            return None
    return None


def _from_tegra_device_tree(root: Path = Path("/proc/device-tree/compatible")) -> str | None:
    try:
        compatible = root.read_bytes().decode(errors="ignore")
    except OSError:
        return None
    for soc, cc in _TEGRA_CC.items():
        if soc in compatible:
            return cc
    return None


def gpu_compute_capability(device: int = 0) -> str | None:
    """Compute capability of GPU ``device`` as ``"8.7"``, or ``None`` when it cannot be found.

    Tries ``nvidia-smi --query-gpu=compute_cap``, then cuda-python (if installed), then the Jetson
    device tree (Xavier -> 7.2, Orin -> 8.7; JetPack 5/6 have no full nvidia-smi).
    """
    return _from_nvidia_smi(device) or _from_cuda_python(device) or _from_tegra_device_tree()
