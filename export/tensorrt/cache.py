"""On-device TensorRT engine cache.

A serialized engine (a *plan*) is valid only for the GPU it was built on (compute capability)
and the exact TensorRT version that built it, and only for the ONNX and build options it came
from. The cache key covers all four: ``(compute capability, TensorRT version, ONNX sha256,
plan hash)``; the directory layout (``engines/<sm>_<trt version>/<piece>.plan`` + sidecar) is
documented in :mod:`runtime.backends.tensorrt_cache`.

Writes are atomic (temp file + ``os.replace``); the sidecar is written last and is the commit
marker, so a reader never accepts a half-written engine. The runtime must never build an
engine at first inference: it calls :func:`require_engine`, which raises
:class:`EngineNotBuiltError` telling the user to run ``pipeline engines --bundle B`` on the device.

The read side (key derivation, directory layout, sidecar checks) lives in
:mod:`runtime.backends.tensorrt_cache`, shared with the runtime's TensorRT runner, which looks
engines up without importing ``export``.
"""
from __future__ import annotations

import hashlib
import json
import os
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
# The read side (key derivation, layout, sidecar checks) is shared with the runtime, which
# finds the engines this module stores; it lives in runtime/ (dependency direction export -> runtime).
from runtime.backends import tensorrt_cache as _shared
from runtime.backends.tensorrt_cache import ENGINES_DIR, SIDECAR_SCHEMA, EngineCacheReader, sha256_file

__all__ = ["ENGINES_DIR", "SIDECAR_SCHEMA", "EngineCache", "device_dir_name", "engine_cache_key",
           "require_engine", "sha256_file", "write_atomic"]


def engine_cache_key(compute_capability: Any, trt_version: Any, onnx_sha256: str, plan_hash: str) -> str:
    """Stable hex key of (GPU compute capability, TensorRT version, ONNX sha256, plan hash)."""
    return _shared.engine_cache_key(normalize_compute_capability(compute_capability),
                                    parse_trt_version(trt_version), onnx_sha256, plan_hash)


def device_dir_name(compute_capability: Any, trt_version: Any) -> str:
    """``("8.7", (10, 3, 0))`` -> ``"sm_87_trt10.3.0"``."""
    return _shared.device_dir_name(normalize_compute_capability(compute_capability),
                                   parse_trt_version(trt_version))


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


class EngineCache(EngineCacheReader):
    """The engines of one (GPU compute capability, TensorRT version) under ``root/engines/``.

    Paths, ``read_sidecar``, ``why_missing`` and ``lookup`` come from
    :class:`runtime.backends.tensorrt_cache.EngineCacheReader`; this adds plan keys and writes.
    """

    def __init__(self, root: str | Path, compute_capability: Any, trt_version: Any):
        super().__init__(root, normalize_compute_capability(compute_capability), parse_trt_version(trt_version))

    def key(self, onnx_sha256: str, plan: EngineBuildPlan) -> str:
        if tuple(plan.trt_version) != self.trt_version:
            raise TensorRTError(f"plan was made for TensorRT {version_str(plan.trt_version)}, this cache "
                                f"is for {version_str(self.trt_version)}")
        return engine_cache_key(self.compute_capability, self.trt_version, onnx_sha256, plan.plan_hash())

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
