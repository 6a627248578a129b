"""TVM target handling: JSON target dicts -> ``tvm.target.Target``, slugs, cross compilers.

A device profile names its TVM target as a JSON object (a Python dict), the only form TVM 0.27
accepts besides a bare kind name (the old ``"llvm -mtriple=..."`` strings are rejected)::

    {"kind": "llvm"}                                              # this machine (x86_64)
    {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}   # Orin CPU
    {"kind": "cuda", "arch": "sm_87"}                             # Orin GPU, host CPU implied
    {"kind": "cuda", "arch": "sm_87",
     "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}}

Everything here works on plain dicts; ``tvm`` is imported lazily (only :func:`to_tvm_target` and
the mcpu check need it), so the module can be imported where TVM is not installed.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Any

from runtime.errors import UsageError
from runtime.host import machine_arch, normalize_arch

__all__ = [
    "SUPPORTED_KINDS",
    "TargetError",
    "validate_target",
    "to_tvm_target",
    "target_slug",
    "target_arch",
    "host_target",
    "default_cuda_host",
    "cross_compiler",
    "build_machine_arch",
    "is_native",
    "canonical_target_json",
]

SUPPORTED_KINDS = ("llvm", "cuda")

# Integrated (Jetson) GPUs: the CUDA arch determines the SoC, hence the host CPU. TVM's own tags
# are not used because ``nvidia/jetson-orin-nano`` names the Xavier CPU (``mcpu: carmel``, no
# dot-product) and the AGX Orin tags say ``cortex-a78``; Orin's CPU is the Cortex-A78AE.
_JETSON_HOST_CPU = {
    "sm_53": "cortex-a57",  # Jetson Nano / TX1
    "sm_62": "cortex-a57",  # Jetson TX2 (Denver2 + A57; code for the A57 runs on both)
    "sm_72": "carmel",  # Jetson Xavier NX / AGX Xavier
    "sm_87": "cortex-a78ae",  # Jetson Orin (Nano, NX, AGX)
    "sm_101": "neoverse-v3ae",  # Jetson Thor (CUDA 12.8/12.9 name)
    "sm_110": "neoverse-v3ae",  # Jetson Thor (CUDA >= 13 name)
}

# Cross compilers (Debian package names in brackets) by the CPU architecture of the code.
_CROSS_CXX = {
    "aarch64": "aarch64-linux-gnu-g++",  # g++-aarch64-linux-gnu
    "arm": "arm-linux-gnueabihf-g++",  # g++-arm-linux-gnueabihf
    "riscv64": "riscv64-linux-gnu-g++",  # g++-riscv64-linux-gnu
    "x86_64": "x86_64-linux-gnu-g++",  # g++-x86-64-linux-gnu
}

_CUDA_ARCH_RE = re.compile(r"^sm_(\d+)[af]?$")


class TargetError(UsageError):
    """A target dict is malformed or names something TVM cannot compile for."""


def build_machine_arch() -> str:
    """CPU architecture of the machine running the compiler (``x86_64``, ``aarch64``, ...)."""
    return machine_arch()


def default_cuda_host(arch: str) -> dict[str, Any]:
    """Host (CPU) target implied by a CUDA arch: the Jetson SoC's CPU, else this machine."""
    cpu = _JETSON_HOST_CPU.get(arch)
    if cpu is None:
        return {"kind": "llvm"}
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": cpu}


def _describe(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 120 else text[:117] + "..."


def _validate_llvm(t: dict[str, Any], where: str) -> None:
    for key in ("mtriple", "mcpu"):
        if key in t and (not isinstance(t[key], str) or not t[key].strip()):
            raise TargetError(f"{where}: '{key}' must be a non-empty string, got {_describe(t[key])}")
    if "mtriple" in t and "-" not in t["mtriple"]:
        raise TargetError(
            f"{where}: 'mtriple' must be an LLVM triple such as 'aarch64-linux-gnu', "
            f"got {t['mtriple']!r}"
        )
    if "mattr" in t:
        mattr = t["mattr"]
        if isinstance(mattr, str) or not isinstance(mattr, list | tuple):
            raise TargetError(
                f"{where}: 'mattr' must be a list of strings like ['+neon', '+dotprod'], "
                f"got {_describe(mattr)}"
            )
        bad = [a for a in mattr if not isinstance(a, str) or not a or a[0] not in "+-"]
        if bad:
            raise TargetError(f"{where}: every 'mattr' entry must start with '+' or '-', got {bad}")
        t["mattr"] = list(mattr)
    if "num-cores" in t:
        n = t["num-cores"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TargetError(f"{where}: 'num-cores' must be a positive integer, got {_describe(n)}")


def _validate_cuda(t: dict[str, Any], where: str) -> None:
    arch = t.get("arch")
    if arch is None:
        raise TargetError(
            f"{where}: a CUDA target needs 'arch', the GPU's compute capability as 'sm_NN' "
            f"(Orin: 'sm_87', Thor: 'sm_110', Ada: 'sm_89'), got no 'arch' in {_describe(t)}"
        )
    if not isinstance(arch, str) or not _CUDA_ARCH_RE.match(arch):
        raise TargetError(f"{where}: 'arch' must look like 'sm_87', got {_describe(arch)}")
    if "host" in t:
        host = t["host"]
        if not isinstance(host, Mapping):
            raise TargetError(
                f"{where}: 'host' must be an llvm target dict such as "
                f"{{'kind': 'llvm', 'mtriple': 'aarch64-linux-gnu', 'mcpu': 'cortex-a78ae'}}, "
                f"got {_describe(host)}"
            )
        host = dict(host)
        if host.get("kind") != "llvm":
            raise TargetError(f"{where}: the host of a CUDA target must have kind 'llvm', got {_describe(host)}")
        _validate_llvm(host, where + ".host")
        t["host"] = host


def validate_target(target: Any, *, check_with_tvm: bool = False) -> dict[str, Any]:
    """Check a target dict and return a normalized deep copy; raise :class:`TargetError` if bad.

    With ``check_with_tvm`` the dict is also handed to ``tvm.target.Target`` (unknown options are
    reported with TVM's list of known ones) and an llvm ``mcpu`` is checked against LLVM's CPU list
    for the triple (LLVM itself only warns and silently falls back to ``generic``).
    """
    if isinstance(target, str):
        raise TargetError(
            f"TVM targets are JSON objects here, e.g. {{'kind': 'llvm', 'mtriple': "
            f"'aarch64-linux-gnu', 'mcpu': 'cortex-a78ae'}}; got the string {target!r} "
            f"(TVM 0.27 rejects the old 'llvm -mtriple=...' form)"
        )
    if not isinstance(target, Mapping):
        raise TargetError(f"a TVM target must be a dict, got {type(target).__name__}: {_describe(target)}")
    t = copy.deepcopy(dict(target))
    kind = t.get("kind")
    if kind is None:
        raise TargetError(f"target dict has no 'kind' (one of {list(SUPPORTED_KINDS)}): {_describe(t)}")
    if kind not in SUPPORTED_KINDS:
        raise TargetError(f"unsupported target kind {kind!r}; supported: {list(SUPPORTED_KINDS)}")
    if kind == "llvm":
        if "host" in t:
            raise TargetError("an llvm target is its own host; 'host' is only for cuda targets")
        _validate_llvm(t, "target")
    else:
        _validate_cuda(t, "target")
    if check_with_tvm:
        to_tvm_target(t)
        for llvm_dict in (t,) if kind == "llvm" else (host_target(t),):
            _check_mcpu(llvm_dict)
    return t


def _check_mcpu(llvm_dict: Mapping[str, Any]) -> None:
    cpu = llvm_dict.get("mcpu")
    if not cpu or cpu in ("native", "generic"):
        return
    from tvm.target import codegen  # noqa: PLC0415

    triple = llvm_dict.get("mtriple") or codegen.llvm_get_system_triple()
    if not codegen.llvm_is_valid_cpu(cpu, triple):
        raise TargetError(
            f"LLVM {codegen.llvm_version_major()} does not know mcpu={cpu!r} for mtriple={triple!r} "
            f"(it would silently fall back to 'generic')"
        )


def host_target(target: Mapping[str, Any]) -> dict[str, Any]:
    """The llvm dict the host-side code (and, for llvm targets, everything) is compiled for."""
    t = validate_target(target)
    if t["kind"] == "llvm":
        return t
    return dict(t.get("host") or default_cuda_host(t["arch"]))


def to_tvm_target(target: Mapping[str, Any]):
    """Build the ``tvm.target.Target``; a CUDA target gets its host (explicit or implied)."""
    t = validate_target(target)
    try:
        from tvm.target import Target  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Apache TVM is not installed; install the 'tvm' extra "
            "(apache-tvm==0.27.0.post1, apache-tvm-ffi==0.1.14.post1)"
        ) from exc
    try:
        if t["kind"] == "cuda":
            device = {k: v for k, v in t.items() if k != "host"}
            return Target(device, host=host_target(t))
        return Target(t)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TargetError(f"TVM rejected target {json.dumps(t, sort_keys=True)}: {exc}") from exc


def target_arch(target: Mapping[str, Any]) -> str:
    """CPU architecture of the code in the compiled library (the host's for CUDA targets)."""
    host = host_target(target)
    triple = host.get("mtriple")
    if not triple:
        return build_machine_arch()
    return normalize_arch(triple.split("-", 1)[0])


def is_native(target: Mapping[str, Any]) -> bool:
    """True when the library's CPU code runs on this machine (needed to tune or run it here)."""
    return target_arch(target) == build_machine_arch()


def _slug_part(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


def _llvm_slug(t: Mapping[str, Any]) -> str:
    triple = t.get("mtriple")
    arch = normalize_arch(triple.split("-", 1)[0]) if triple else build_machine_arch()
    return f"{arch}-{_slug_part(t.get('mcpu') or 'llvm')}"


def target_slug(target: Mapping[str, Any]) -> str:
    """Short, stable name for file names and cache keys.

    ``{"kind": "llvm"}`` -> ``x86_64-llvm``; ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu",
    "mcpu": "cortex-a78ae"}`` -> ``aarch64-cortex-a78ae``; ``{"kind": "cuda", "arch": "sm_87"}`` ->
    ``cuda-sm87`` (a host other than the implied one is appended: ``cuda-sm89-aarch64-neoverse-v2``).
    ``mattr`` and ``num-cores`` are not part of the slug.
    """
    t = validate_target(target)
    if t["kind"] == "llvm":
        return _llvm_slug(t)
    slug = "cuda-" + t["arch"].replace("_", "")
    host = t.get("host")
    if host is not None and _llvm_slug(host) != _llvm_slug(default_cuda_host(t["arch"])):
        slug += "-" + _llvm_slug(host)
    return slug


def cross_compiler(target: Mapping[str, Any]) -> str:
    """C++ compiler (command name) that links the library for the target's CPU architecture."""
    arch = target_arch(target)
    if arch == build_machine_arch():
        return "g++"
    try:
        return _CROSS_CXX[arch]
    except KeyError:
        raise TargetError(
            f"no cross compiler known for architecture {arch!r} (known: {sorted(_CROSS_CXX)})"
        ) from None


def canonical_target_json(target: Mapping[str, Any]) -> str:
    """Deterministic JSON of the normalized target (sorted keys), for metadata and cache checks."""
    return json.dumps(validate_target(target), sort_keys=True, separators=(",", ":"))
