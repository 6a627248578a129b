"""TensorRT engine cache: key, directory layout and read-side checks (standard library only).

This is the part of the engine cache that both sides need: ``pipeline engines`` (in ``export/``)
writes engines with it and the runtime's :mod:`runtime.backends.tensorrt_runner` finds them with
it. It lives in ``runtime/`` because the dependency direction is export -> runtime, and
:mod:`export.tensorrt.cache` imports it from here (it adds plans and writing on top).

Layout, under a bundle (or any root) directory::

    engines/
      sm_87_trt10.3.0/           # one directory per (GPU compute capability, TensorRT version)
        <piece>.plan             # serialized engine
        <piece>.json             # sidecar: key, its four parts, the build plan, engine sha256
        <piece>.calib            # INT8 calibration cache (TensorRT 10 implicit INT8 only)
        timing.cache             # TensorRT timing cache shared by the pieces of this directory

The cache key is ``sha256`` of ``(compute capability, TensorRT version, ONNX sha256, plan
hash)``. The sidecar is written last (it is the commit marker), so a reader never pairs a
sidecar with a half-written engine.

:func:`find_engine` is what the runtime calls. It never builds anything: a missing or stale
engine raises :class:`EngineNotBuiltError`, which tells the user to run
``pipeline engines --bundle B`` on the device.

Nothing here imports ``tensorrt``. ``normalize_compute_capability``, ``parse_trt_version`` and
``plan_hash_of`` repeat the rules of ``export/tensorrt/config.py`` (which the runtime may not
import); ``tests/test_tensorrt_runner.py`` checks that both give the same answers.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ENGINES_DIR = "engines"


#: How far above an artifact file its bundle's ``manifest.json`` is looked for.
BUNDLE_ROOT_MAX_DEPTH = 8


def find_bundle_root(path: Path, depth: int = BUNDLE_ROOT_MAX_DEPTH) -> Optional[Path]:
    """The directory holding ``manifest.json`` at most ``depth`` levels above ``path`` (the
    bundle), or None."""
    from runtime.manifest import MANIFEST_NAME

    for d in [path.parent, *path.parent.parents][:depth]:
        if (d / MANIFEST_NAME).is_file():
            return d
    return None


SIDECAR_SCHEMA = 1
#: Must equal ``export.tensorrt.config.PLAN_SCHEMA`` (it is part of every plan hash).
PLAN_SCHEMA = 1
#: Build-plan fields that come from the device profile's options and the ONNX, and do not
#: depend on the TensorRT version: an engine built on the device must agree with the bundle's
#: plan on all of them (flags, typing and calibration differ between TensorRT 10 and 11).
PLAN_OPTION_FIELDS = ("precision", "inputs", "profiles", "memory_pool_limits", "default_device_type",
                      "dla_core", "builder_optimization_level")
_PIECE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class EngineNotBuiltError(FileNotFoundError):
    """No (valid) engine for this piece / GPU / TensorRT version: build it on the device first.

    Runtime-side twin of ``export.tensorrt.EngineNotBuiltError`` (both are FileNotFoundError).
    """


# ----------------------------------------------------------------------------- parts of the key
def parse_trt_version(version: Any) -> tuple[int, int, int]:
    """``"10.3.0.30"`` / ``(10, 3)`` / ``[11, 4, 1]`` -> ``(major, minor, patch)``."""
    if isinstance(version, str):
        parts: list[Any] = version.strip().split(".")
    elif isinstance(version, Iterable):
        parts = list(version)
    else:
        raise ValueError(f"TensorRT version {version!r} is not a version string or tuple")
    try:
        nums = [int(str(p).split("+")[0].split("rc")[0]) for p in parts[:3]]
    except ValueError:
        raise ValueError(f"cannot parse TensorRT version {version!r}") from None
    if not nums:
        raise ValueError(f"cannot parse TensorRT version {version!r}")
    while len(nums) < 3:
        nums.append(0)
    return nums[0], nums[1], nums[2]


def version_str(version: Any) -> str:
    return ".".join(str(v) for v in parse_trt_version(version))


def normalize_compute_capability(cc: Any) -> str:
    """``"8.7"``, ``"87"``, ``"sm87"``, ``"sm_87"``, ``(8, 7)``, ``8.7`` -> ``"8.7"``."""
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return f"{int(cc[0])}.{int(cc[1])}"
    text = str(cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, _, minor = text.partition(".")
        if major.isdigit() and minor.isdigit():
            return f"{int(major)}.{int(minor)}"
    elif text.isdigit() and len(text) >= 2:
        return f"{int(text[:-1])}.{int(text[-1])}"
    raise ValueError(f"cannot parse GPU compute capability {cc!r} (expected e.g. '8.7' or 'sm87')")


def sm_tag(cc: Any) -> str:
    """``"8.7"`` -> ``"sm_87"``."""
    major, minor = normalize_compute_capability(cc).split(".")
    return f"sm_{major}{minor}"


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
        "tensorrt_version": version_str(trt_version),
        "onnx_sha256": str(onnx_sha256).lower(),
        "plan_hash": str(plan_hash).lower(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def plan_hash_of(plan: Mapping[str, Any]) -> str:
    """Hash of a build plan's dict (``EngineBuildPlan.to_dict()``): notes and timing-cache use excluded.

    Same value as ``export.tensorrt.config.EngineBuildPlan.plan_hash()``.
    """
    d = json.loads(json.dumps(dict(plan)))
    d.pop("notes", None)
    d.pop("timing_cache", None)
    d["schema"] = PLAN_SCHEMA
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def plan_option_differences(built: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """``["precision: engine 'fp16', bundle 'int8'", ...]`` over :data:`PLAN_OPTION_FIELDS`."""
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731 - tuples -> lists, as in the JSON files
    out = []
    for name in PLAN_OPTION_FIELDS:
        a, b = norm(built.get(name)), norm(expected.get(name))
        if a != b:
            out.append(f"{name}: engine {a!r}, bundle {b!r}")
    return out


def device_dir_name(compute_capability: Any, trt_version: Any) -> str:
    """``("8.7", (10, 3, 0))`` -> ``"sm_87_trt10.3.0"``."""
    return f"{sm_tag(compute_capability)}_trt{version_str(trt_version)}"


def check_piece_id(piece_id: str) -> str:
    if not isinstance(piece_id, str) or not _PIECE_RE.match(piece_id) or ".." in piece_id:
        raise ValueError(f"piece id {piece_id!r} must be a plain file name ([A-Za-z0-9._-], no '..')")
    return piece_id


# ---------------------------------------------------------------------------------- the cache
class EngineCacheReader:
    """The engines of one (GPU compute capability, TensorRT version) under ``root/engines/``.

    Read side only; ``export.tensorrt.EngineCache`` adds plan keys and atomic writes.
    """

    def __init__(self, root: str | Path, compute_capability: Any, trt_version: Any):
        self.root = Path(root)
        self.compute_capability = normalize_compute_capability(compute_capability)
        self.trt_version = parse_trt_version(trt_version)
        self.dir = self.root / ENGINES_DIR / device_dir_name(self.compute_capability, self.trt_version)

    # -- paths
    def plan_path(self, piece_id: str) -> Path:
        return self.dir / f"{check_piece_id(piece_id)}.plan"

    def sidecar_path(self, piece_id: str) -> Path:
        return self.dir / f"{check_piece_id(piece_id)}.json"

    def calibration_cache_path(self, piece_id: str) -> Path:
        return self.dir / f"{check_piece_id(piece_id)}.calib"

    @property
    def timing_cache_path(self) -> Path:
        return self.dir / "timing.cache"

    def other_device_dirs(self) -> list[str]:
        return sorted(p.name for p in (self.root / ENGINES_DIR).glob("*") if p.is_dir() and p != self.dir)

    # -- read
    def read_sidecar(self, piece_id: str) -> dict[str, Any] | None:
        try:
            meta = json.loads(self.sidecar_path(piece_id).read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def why_missing(self, piece_id: str, key: str, *, onnx_sha256: str | None = None,
                    plan_hash: str | None = None, verify: bool = True) -> str | None:
        """``None`` when a valid engine is stored under ``key``, else the reason in words."""
        if not self.dir.is_dir():
            others = self.other_device_dirs()
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


# ------------------------------------------------------------------------------ runtime lookup
@dataclass(frozen=True)
class FoundEngine:
    path: Path
    key: str
    sidecar: dict


def engine_not_built(bundle_dir: str | Path, piece_id: str, compute_capability: Any, trt_version: Any,
                     reason: str, hint: str = "") -> EngineNotBuiltError:
    return EngineNotBuiltError(
        f"no TensorRT engine for piece '{piece_id}' on this device (GPU {sm_tag(compute_capability)}, "
        f"TensorRT {version_str(trt_version)}): {reason}.{hint} Engines are built on the target device, "
        f"never at first inference - run `pipeline engines --bundle {bundle_dir}` on this device first.")


def find_engine(bundle_dir: str | Path, piece_id: str, onnx_path: str | Path, *, compute_capability: Any,
                trt_version: Any, build_plan: Mapping[str, Any] | None = None, verify: bool = True,
                hint: str = "") -> FoundEngine:
    """The engine ``pipeline engines`` built for ``piece_id`` on this GPU + TensorRT, or an error.

    Checks, in order: the ``engines/<sm>_trt<version>/`` directory and the piece's sidecar exist;
    the sidecar's ONNX sha256 is that of ``onnx_path`` (the ONNX the bundle ships); the sidecar's
    plan agrees with ``build_plan`` (the bundle's plan, if given) on every option-derived field
    (:data:`PLAN_OPTION_FIELDS`) and hashes to the sidecar's plan hash; the sidecar's key is
    ``engine_cache_key(compute_capability, trt_version, onnx sha256, plan hash)``; the engine file
    has the recorded size (and sha256 with ``verify``). Any failure raises
    :class:`EngineNotBuiltError` naming it; nothing is ever built. ``hint`` is appended to the
    reason (e.g. "the bundle was compiled for sm_87").
    """
    cache = EngineCacheReader(bundle_dir, compute_capability, trt_version)

    def fail(reason: str) -> EngineNotBuiltError:
        return engine_not_built(bundle_dir, piece_id, cache.compute_capability, cache.trt_version, reason, hint)

    if not cache.dir.is_dir() or cache.read_sidecar(piece_id) is None:
        raise fail(cache.why_missing(piece_id, "") or "no engine")
    meta = cache.read_sidecar(piece_id) or {}
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")
    onnx_sha = sha256_file(onnx_path)
    if str(meta.get("onnx_sha256", "")).lower() != onnx_sha:
        raise fail(f"the stored engine for piece '{piece_id}' was built from a different ONNX file "
                   f"(was the bundle recompiled?)")
    plan = meta.get("plan")
    plan_hash = str(meta.get("plan_hash", ""))
    if not isinstance(plan, dict) or plan_hash_of(plan) != plan_hash:
        raise fail(f"the sidecar {cache.sidecar_path(piece_id)} does not match its build plan")
    if build_plan is not None:
        diffs = plan_option_differences(plan, build_plan)
        if diffs:
            raise fail(f"the stored engine for piece '{piece_id}' was built with different build options "
                       f"(device profile tensorrt options changed: {'; '.join(diffs)})")
    key = engine_cache_key(cache.compute_capability, cache.trt_version, onnx_sha, plan_hash)
    reason = cache.why_missing(piece_id, key, onnx_sha256=onnx_sha, plan_hash=plan_hash, verify=verify)
    if reason is not None:
        raise fail(reason)
    return FoundEngine(cache.plan_path(piece_id), key, meta)
