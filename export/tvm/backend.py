"""The ``tvm`` backend's registry interface (export/backends.py): Relax libraries per piece."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

from runtime.jsonsafe import json_safe

UNTUNED_NOTE = ("untuned TVM CPU code is far slower than ONNX Runtime here (20-70x on the ResNet "
                "pieces, docs/export.md): tune with --tune-trials N; the profile's backend order "
                "decides which backend the runtime prefers")


def _target(profile) -> dict:
    return dict(profile.backend("tvm").options.get("target") or {})


def check_profile(profile) -> None:
    """TVM importable, the profile's target valid, and its compilers on PATH."""
    from export.backends import BackendUnavailable

    try:
        from export.tvm import cross_compiler, validate_target
        from export.tvm.compile import require_tvm
    except ImportError as exc:
        raise BackendUnavailable(f"tvm: cannot import export.tvm ({exc})") from None
    try:
        require_tvm()
    except ImportError as exc:
        raise BackendUnavailable(f"tvm: {exc}") from None
    target = _target(profile)
    try:
        validate_target(target, check_with_tvm=False)
    except ValueError as exc:
        raise BackendUnavailable(f"tvm: bad target in profile {profile.name!r}: {exc}") from None
    if target.get("kind") == "cuda" and shutil.which("nvcc") is None:
        raise BackendUnavailable("tvm: the profile's target is CUDA and nvcc is not on PATH "
                                 "(kernels are compiled ahead of time)")
    cxx = cross_compiler(target)
    if shutil.which(cxx) is None:
        raise BackendUnavailable(f"tvm: linking for this target needs {cxx}, which is not on PATH"
                                 + (" (apt install g++-aarch64-linux-gnu)" if "aarch64" in cxx else ""))


def target_name(profile) -> str:
    from export.backends import artifact_id
    from export.tvm import target_slug

    return artifact_id(target_slug(_target(profile)))


def _device(target: dict) -> str:
    return "cuda" if target.get("kind") == "cuda" else "cpu"


def _artifact_info(artifact: Any) -> dict:
    """JSON-able fields of a TVMArtifact (library path kept only when absolute)."""
    if artifact is None:
        return {}
    d = dict(artifact.to_dict()) if hasattr(artifact, "to_dict") else (
        {k: getattr(artifact, k) for k in artifact.__dataclass_fields__}
        if hasattr(artifact, "__dataclass_fields__") else dict(artifact))
    out = {}
    for k, v in d.items():
        if k in ("path", "file", "library"):
            if v is not None and Path(v).is_absolute():
                out["path"] = str(v)
            continue
        if k in ("target", "tuning_db"):  # the profile's dict is kept; cache paths are host-local
            continue
        out[k] = v
    return out


def compile_piece(profile, onnx_path: Path, root: Path, piece_id: str, *, target: str,
                  tune_trials: int = 0, tuning_db_dir: Optional[Path] = None,
                  **_kw: Any) -> tuple[str, dict, str]:
    """One piece's library under ``tvm/<target>/`` (tuned with MetaSchedule if asked)."""
    from export.tvm import compile_onnx
    from runtime.manifest import sha256_file

    options = profile.backend("tvm").options
    rel = f"tvm/{target}/{piece_id}.so"
    tvm_target = _target(profile)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    artifact = compile_onnx(onnx_path, tvm_target, root / rel, tune_trials=tune_trials,
                            tuning_db_dir=tuning_db_dir, progress=None)
    info = _artifact_info(artifact)
    lib = Path(info.pop("path", root / rel)).resolve()
    rel = lib.relative_to(root.resolve()).as_posix()
    meta = lib.with_name(lib.name + ".json")  # names/batch of a library used standalone
    if meta.is_file():
        info["metadata"] = {"file": meta.relative_to(root.resolve()).as_posix(),
                            "sha256": sha256_file(meta), "size_bytes": meta.stat().st_size}
    opts = {"target": tvm_target, "opt_level": options.get("opt_level", 3),
            "device": _device(tvm_target), "tune_trials": int(tune_trials),
            "tuned": bool(tune_trials), **info}
    what = "tuned" if opts.get("tuned") else "untuned"
    return rel, json_safe(opts), f"{what} {tvm_target.get('kind')}, batch {opts.get('batch') or 'any'}"


def deployment(profile, target: str):
    """Native code: the target's architecture and the profile's CPU features; CUDA kernels
    also need a GPU of the profile's compute capability."""
    from export.tvm import target_arch
    from runtime.manifest import Requirements

    t = _target(profile)
    cuda = t.get("kind") == "cuda"
    return (Requirements(arch=target_arch(t) or profile.arch,
                         isa=[] if cuda else list(profile.hardware.isa), gpu=cuda,
                         gpu_compute_capability=profile.hardware.gpu_compute_capability if cuda
                         else None),
            {"device": _device(t)})


def can_verify_here(profile) -> bool:
    t = _target(profile)
    return t.get("kind", "llvm") == "llvm" and profile.is_host_compatible()
