"""The build side of the backend registry (runtime/backends/__init__.py holds the table).

Each backend's export module has the same four functions::

    check_profile(profile) -> None           # raises BackendUnavailable saying why not
    target_name(profile) -> str              # the artifacts' target id, e.g. "x86_64-cpu"
    compile_piece(profile, onnx_path, root, piece_id, *, target, onnx_rel, tune_trials,
                  tuning_db_dir) -> (relpath, artifact options, note)
    deployment(profile, target) -> (Requirements, runner options)   # for the manifest
    can_verify_here(profile) -> bool         # whether its artifacts run on this build machine
"""
from __future__ import annotations

import importlib
import re
from types import ModuleType

from runtime.backends import BACKENDS, PORTABLE, REGISTRY
from runtime.errors import PipelineError
from runtime.manifest import DeploymentTarget, Requirements

__all__ = ["BackendUnavailable", "export_module", "check_backend", "portable_target",
           "artifact_id"]

_ID_BAD = re.compile(r"[^A-Za-z0-9_.+\-]")


class BackendUnavailable(PipelineError, ValueError):
    """A backend cannot be compiled here (or not for this profile)."""


def artifact_id(text: str) -> str:
    """``text`` as a manifest id (``[A-Za-z0-9_.+-]``, at most 128 chars)."""
    s = _ID_BAD.sub("-", text).strip("-.") or "target"
    return s[:128]


def export_module(backend: str) -> ModuleType:
    """The export-side module of ``backend`` (its heavy libraries load only when used)."""
    if backend not in REGISTRY:
        raise BackendUnavailable(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    return importlib.import_module(REGISTRY[backend].export_module)


def check_backend(profile, backend: str) -> None:
    """Raise :class:`BackendUnavailable` saying why ``backend`` cannot be compiled here."""
    module = export_module(backend)
    if profile.backend(backend) is None:
        raise BackendUnavailable(f"profile {profile.name!r} has no {backend} backend "
                                 f"(it has: {', '.join(profile.backend_order()) or 'none'})")
    module.check_profile(profile)


def portable_target(profile) -> DeploymentTarget:
    """The portable ONNX's deployment entry: no requirements, the profile's ONNX Runtime
    runner options (so the fallback runs with the device's threads and providers)."""
    options = {}
    if profile.backend("onnxruntime") is not None:
        options = export_module("onnxruntime").deployment(profile, "portable")[1]
    return DeploymentTarget(backend=PORTABLE, target="portable", requires=Requirements(),
                            runner_options=options)
