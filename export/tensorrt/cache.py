"""On-device TensorRT engine cache.

A serialized engine (a *plan*) is valid only for the GPU it was built on (compute capability)
and the exact TensorRT version that built it, and only for the ONNX and build options it came
from. The cache key covers all four: ``(compute capability, TensorRT version, ONNX sha256,
plan hash)``. Layout, under a bundle (or any root) directory::

    engines/
      sm_87_trt10.3.0/           # one directory per (GPU compute capability, TensorRT version)
        <piece>.plan             # serialized engine
        <piece>.json             # sidecar: key, its four parts, the build plan, engine sha256
        <piece>.calib            # INT8 calibration cache (TensorRT 10 implicit INT8 only)
        timing.cache             # TensorRT timing cache shared by the pieces of this directory

Writes are atomic (temp file + ``os.replace``); the sidecar is written last and is the commit
marker, so a reader never accepts a half-written engine. The runtime must never build an
engine at first inference: it calls :func:`require_engine`, which raises
:class:`EngineNotBuiltError` telling the user to run ``pipeline engines --bundle B`` on the device.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export.tensorrt.config import (
    EngineBuildPlan,
    EngineNotBuiltError,
    TensorRTError,
    TensorRTUnavailableError,
    make_build_plan,
    normalize_compute_capability,
    parse_trt_version,
    sm_tag,
    version_str,
)

ENGINES_DIR = "engines"
SIDECAR_SCHEMA = 1
_PIECE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def engine_cache_key(compute_capability: Any, trt_version: Any, onnx_sha256: str, plan_hash: str) -> str:
    """Stable hex key of (GPU compute capability, TensorRT version, ONNX sha256, plan hash)."""
    parts = {
        "compute_capability": normalize_compute_capability(compute_capability),
        "tensorrt_version": version_str(parse_trt_version(trt_version)),
        "onnx_sha256": str(onnx_sha256).lower(),
        "plan_hash": str(plan_hash).lower(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def device_dir_name(compute_capability: Any, trt_version: Any) -> str:
    """``("8.7", (10, 3, 0))`` -> ``"sm_87_trt10.3.0"``."""
    return f"{sm_tag(compute_capability)}_trt{version_str(parse_trt_version(trt_version))}"


def _check_piece(piece_id: str) -> str:
    if not isinstance(piece_id, str) or not _PIECE_RE.match(piece_id) or ".." in piece_id:
        raise ValueError(f"piece id {piece_id!r} must be a plain file name ([A-Za-z0-9._-], no '..')")
    return piece_id


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineCache:
    """The engines of one (GPU compute capability, TensorRT version) under ``root/engines/``."""

    def __init__(self, root: str | Path, compute_capability: Any, trt_version: Any):
        self.root = Path(root)
        self.compute_capability = normalize_compute_capability(compute_capability)
        self.trt_version = parse_trt_version(trt_version)
        self.dir = self.root / ENGINES_DIR / device_dir_name(self.compute_capability, self.trt_version)

    # -- paths
    def plan_path(self, piece_id: str) -> Path:
        return self.dir / f"{_check_piece(piece_id)}.plan"

    def sidecar_path(self, piece_id: str) -> Path:
        return self.dir / f"{_check_piece(piece_id)}.json"

    def calibration_cache_path(self, piece_id: str) -> Path:
        return self.dir / f"{_check_piece(piece_id)}.calib"

    @property
    def timing_cache_path(self) -> Path:
        return self.dir / "timing.cache"

    def key(self, onnx_sha256: str, plan: EngineBuildPlan) -> str:
        if tuple(plan.trt_version) != self.trt_version:
            raise TensorRTError(f"plan was made for TensorRT {version_str(plan.trt_version)}, this cache "
                                f"is for {version_str(self.trt_version)}")
        return engine_cache_key(self.compute_capability, self.trt_version, onnx_sha256, plan.plan_hash())

    # -- read
    def read_sidecar(self, piece_id: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.sidecar_path(piece_id).read_text())
        except (OSError, ValueError):
            return None

    def why_missing(self, piece_id: str, key: str, *, onnx_sha256: str | None = None,
                    plan_hash: str | None = None, verify: bool = True) -> str | None:
        """``None`` when a valid engine is stored under ``key``, else the reason in words."""
        if not self.dir.is_dir():
            others = sorted(p.name for p in (self.root / ENGINES_DIR).glob("*") if p.is_dir())
            have = f" (engines exist only for: {', '.join(others)})" if others else ""
            return f"{self.dir} does not exist{have}"
        meta = self.read_sidecar(piece_id)
        plan_file = self.plan_path(piece_id)
        if meta is None:
            return f"no engine for piece '{piece_id}' in {self.dir}"
        if meta.get("key") != key:
            if onnx_sha256 is not None and meta.get("onnx_sha256") != onnx_sha256:
                return f"the stored engine for piece '{piece_id}' was built from a different ONNX file"
            if plan_hash is not None and meta.get("plan_hash") != plan_hash:
                return (f"the stored engine for piece '{piece_id}' was built with different build options "
                        "(device profile tensorrt options changed)")
            return f"the stored engine for piece '{piece_id}' has a different cache key"
        if not plan_file.is_file():
            return f"engine file {plan_file} is missing"
        if plan_file.stat().st_size != meta.get("engine_bytes"):
            return f"engine file {plan_file} is incomplete or was replaced (size mismatch)"
        if verify and sha256_file(plan_file) != meta.get("engine_sha256"):
            return f"engine file {plan_file} is corrupt (sha256 mismatch)"
        return None

    def lookup(self, piece_id: str, key: str, *, verify: bool = True) -> Path | None:
        return self.plan_path(piece_id) if self.why_missing(piece_id, key, verify=verify) is None else None

    # -- write
    def store(self, piece_id: str, engine: bytes, key: str, *, onnx_sha256: str,
              plan: EngineBuildPlan, extra: Mapping[str, Any] | None = None) -> Path:
        """Atomically store ``engine`` and its sidecar; returns the ``.plan`` path."""
        if not engine:
            raise TensorRTError(f"refusing to store an empty engine for piece '{piece_id}'")
        sidecar = self.sidecar_path(piece_id)
        sidecar.unlink(missing_ok=True)  # uncommit first: readers never pair an old sidecar with a new plan
        plan_file = self.plan_path(piece_id)
        write_atomic(plan_file, engine)
        meta = {
            "schema": SIDECAR_SCHEMA,
            "piece": piece_id,
            "key": key,
            "compute_capability": self.compute_capability,
            "tensorrt_version": version_str(self.trt_version),
            "onnx_sha256": onnx_sha256,
            "plan_hash": plan.plan_hash(),
            "plan": plan.to_dict(),
            "engine_sha256": hashlib.sha256(engine).hexdigest(),
            "engine_bytes": len(engine),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **dict(extra or {}),
        }
        write_atomic(sidecar, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        return plan_file


def _detect(compute_capability: Any, trt_version: Any) -> tuple[str, tuple[int, int, int]]:
    from export.tensorrt.detect import gpu_compute_capability, tensorrt_version

    if trt_version is None:
        trt_version = tensorrt_version()
        if trt_version is None:
            raise TensorRTUnavailableError(
                "TensorRT is not installed on this machine (import tensorrt failed); the TensorRT "
                "backend needs it to build and to run engines")
    if compute_capability is None:
        compute_capability = gpu_compute_capability()
        if compute_capability is None:
            raise TensorRTError("cannot determine the GPU compute capability (no nvidia-smi, cuda-python "
                                "or Jetson device tree); pass compute_capability='8.7' explicitly")
    return normalize_compute_capability(compute_capability), parse_trt_version(trt_version)


def require_engine(bundle_dir: str | Path, piece_id: str, onnx_path: str | Path,
                   options: Mapping[str, Any] | EngineBuildPlan, *, compute_capability: Any = None,
                   trt_version: Any = None, verify: bool = True) -> Path:
    """Path of the prebuilt engine for ``piece_id`` on this device, or :class:`EngineNotBuiltError`.

    ``options`` is the device profile's ``tensorrt`` options dict (or an already made plan).
    Never builds anything: engines are built on the device by ``pipeline engines --bundle B``.
    """
    cc, version = _detect(compute_capability, trt_version)
    if isinstance(options, EngineBuildPlan):
        plan = options
    else:
        plan = make_build_plan(onnx_path, options, version, compute_capability=cc, allow_fp16_conversion=True)
    cache = EngineCache(bundle_dir, cc, version)
    onnx_sha = sha256_file(onnx_path)
    key = cache.key(onnx_sha, plan)
    reason = cache.why_missing(piece_id, key, onnx_sha256=onnx_sha, plan_hash=plan.plan_hash(), verify=verify)
    if reason is not None:
        raise EngineNotBuiltError(
            f"no TensorRT engine for piece '{piece_id}' on this device (GPU {sm_tag(cc)}, "
            f"TensorRT {version_str(version)}): {reason}. Engines are built on the target device, never "
            f"at first inference - run `pipeline engines --bundle {bundle_dir}` on this device first.")
    return cache.plan_path(piece_id)
