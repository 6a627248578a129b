"""Execution backends for bundle pieces. Each is imported lazily: a device needs only its own."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

BACKENDS = ("onnxruntime", "tvm", "tensorrt")


class PieceRunner(Protocol):
    """Runs one compiled piece: named float32 inputs in, outputs in manifest order out."""

    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def open_runner(backend: str, path: str | Path, options: dict[str, Any] | None = None,
                input_names: list[str] | None = None,
                output_names: list[str] | None = None, *,
                data: bytes | None = None) -> PieceRunner:
    """Open the artifact at ``path`` with ``backend``.

    ``options`` are the artifact's (from the device profile at compile time); ``input_names`` /
    ``output_names`` come from the manifest's piece, so no unverified side file is trusted.
    ``data``: the artifact's bytes as verified against the manifest
    (``Bundle.read_artifact``). When given, onnxruntime creates its session from them and TVM
    loads a private copy of them, so a file changed on disk after the check is never run;
    ``path`` then only names the artifact in messages. (TensorRT runs an engine built on the
    device, found next to the bundle; the ONNX it was built from is what ``data`` checks.)
    """
    options = dict(options or {})
    if backend in ("onnxruntime", "onnx"):
        from runtime.backends.onnxruntime_runner import ORTPieceRunner
        return ORTPieceRunner(path, model_bytes=data, **options)
    if backend == "tvm":
        from runtime.backends.tvm_runner import TVMPieceRunner
        return TVMPieceRunner(path, device=options.get("device", "cpu"), batch=options.get("batch"),
                              input_names=input_names, output_names=output_names,
                              library_bytes=data)
    if backend == "tensorrt":
        from runtime.backends.tensorrt_runner import TensorRTPieceRunner
        return TensorRTPieceRunner(path, **options)
    raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
