"""The backend registry: the one table of execution backends, build side and device side.

Each backend is two modules with the same small interface:

* runtime side (``runtime_module``, numpy + the backend's library, imported only when used)::

      open_runner(path, options, *, input_names, output_names, data) -> PieceRunner
      why_unusable(bundle, target, artifacts) -> str | None   # backend-specific checks

* build side (``export_module``; see export/backends.py)::

      check_profile(profile) -> None          # raises BackendUnavailable saying why not
      target_name(profile) -> str             # the artifacts' target, e.g. "x86_64-cpu"
      compile_piece(...) -> (relpath, artifact options, note)
      deployment(profile, target) -> (requires, runner_options)

Adding a backend: write those two modules and add one :class:`Backend` row below. Stdlib only.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Optional, Protocol

if TYPE_CHECKING:  # numpy is not needed to read the registry
    import numpy as np

__all__ = ["Backend", "REGISTRY", "BACKENDS", "PORTABLE", "ARTIFACT_BACKENDS", "PieceRunner",
           "backend_info", "runtime_module", "open_runner", "runner_options"]


@dataclass(frozen=True)
class Backend:
    """One execution backend: its library, its two modules and the options its runner takes."""
    name: str
    library: str            # the Python package that executes its artifacts
    runtime_module: str     # open_runner / why_unusable
    export_module: str      # check_profile / target_name / compile_piece / deployment
    runner_options: frozenset[str]
    description: str


REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("onnxruntime", "onnxruntime", "runtime.backends.onnxruntime_runner",
            "export.onnxruntime_backend",
            frozenset({"providers", "provider_options", "intra_op_threads", "inter_op_threads",
                       "graph_optimization_level", "allow_spinning"}),
            "ONNX Runtime sessions (the embedded default)"),
    Backend("tvm", "tvm", "runtime.backends.tvm_runner", "export.tvm.backend",
            frozenset({"device", "batch"}),
            "Apache TVM Relax libraries compiled ahead of time (x86, aarch64, CUDA)"),
    Backend("tensorrt", "tensorrt", "runtime.backends.tensorrt_runner",
            "export.tensorrt.backend",
            frozenset({"build_plan", "compute_capability", "trt_major", "device_id", "verify",
                       "log_level"}),
            "TensorRT engines built on the device from the bundle's ONNX"),
)}
#: Backends that execute artifacts, in registry order.
BACKENDS: tuple[str, ...] = tuple(REGISTRY)
#: The artifact backend of the portable ONNX files (run with onnxruntime).
PORTABLE = "onnx"
#: Every artifact backend a manifest may name.
ARTIFACT_BACKENDS: tuple[str, ...] = (PORTABLE, *BACKENDS)


class PieceRunner(Protocol):
    """Runs one compiled piece: named float32 inputs in, outputs in manifest order out."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, "np.ndarray"]) -> list["np.ndarray"]: ...


def backend_info(name: str) -> Backend:
    """The registry row of an artifact backend (``onnx`` runs with onnxruntime)."""
    info = REGISTRY.get("onnxruntime" if name == PORTABLE else name)
    if info is None:
        raise KeyError(f"unknown backend {name!r}; known: {', '.join(ARTIFACT_BACKENDS)}")
    return info


def runtime_module(name: str) -> ModuleType:
    """The runtime-side module of a backend (imports its library lazily, not here)."""
    return importlib.import_module(backend_info(name).runtime_module)


def runner_options(name: str, options: Optional[dict[str, Any]], *, source: str = "",
                   strict: bool = True) -> dict[str, Any]:
    """The options a backend's runner takes, checked: an unknown key raises ConfigError
    (``strict``) or is left out (not strict: v1 artifacts mix build provenance into them)."""
    known = backend_info(name).runner_options
    options = dict(options or {})
    unknown = sorted(k for k in options if k not in known)
    if unknown and strict:
        from runtime.errors import ConfigError
        raise ConfigError(source or f"{name} runner", f"options.{unknown[0]}",
                          f"unknown {backend_info(name).name} runner option "
                          f"(known: {', '.join(sorted(known))})")
    return {k: v for k, v in options.items() if k in known}


def open_runner(backend: str, path: str | Path, options: Optional[dict[str, Any]] = None,
                input_names: Optional[list[str]] = None,
                output_names: Optional[list[str]] = None, *,
                data: Optional[bytes] = None) -> PieceRunner:
    """Open the artifact at ``path`` with ``backend`` (``onnx``: the portable ONNX).

    ``options`` are runner options (unknown keys are refused); ``input_names`` /
    ``output_names`` come from the manifest's piece. ``data``: the artifact's bytes as verified
    against the manifest (``Bundle.read_artifact``); the runner loads those bytes, so a file
    changed on disk after the check never runs, and ``path`` only names it in messages.
    """
    opts = runner_options(backend, options, source=str(path))
    return runtime_module(backend).open_runner(path, opts, input_names=input_names,
                                               output_names=output_names, data=data)
