"""ONNX Runtime execution of one piece (the embedded default backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# Session-creation failures that are the machine's, not the artifact's (an execution provider
# or device that cannot start): re-raised as they are instead of as a BundleIntegrityError.
_NOT_THE_ARTIFACT = ("EPFail", "EngineError", "DeviceReset")


def session_options(intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                    graph_optimization_level: str = "all",
                    optimized_model_path: str | Path | None = None,
                    allow_spinning: Optional[bool] = None):
    """ORT SessionOptions from a device profile's `onnxruntime` options.

    The monolithic baseline (``pipeline.evaluate.MonolithicSession``) builds its session with
    this same function, so both get identical options. ``allow_spinning``: None keeps ORT's
    default (intra-op worker threads spin while waiting for work); False sets
    ``session.intra_op.allow_spinning=0`` (less CPU burnt between calls on a shared machine).
    """
    import onnxruntime as ort

    if graph_optimization_level not in _LEVELS:
        raise ValueError(f"graph_optimization_level {graph_optimization_level!r}: expected one of "
                         f"{', '.join(_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[graph_optimization_level])
    if intra_op_threads:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if allow_spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning",
                                    "1" if allow_spinning else "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def available_providers(requested: list[str] | None) -> list[str]:
    """The requested execution providers this onnxruntime build has, CPU always last."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    chosen = [p for p in (requested or []) if p in have and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


class ORTPieceRunner:
    """An InferenceSession over one piece; thread-safe (ORT sessions allow concurrent run()).

    ``model_bytes``: the piece's ONNX as bytes (what ``Bundle.read_artifact`` returned after
    checking its sha256); the session is created from them, so the bytes that run are the
    bytes that were verified. ``path`` then only names the file in messages. Without
    ``model_bytes`` the session reads ``path``.

    A file that onnxruntime cannot load (not ONNX, an invalid graph, an operator this
    onnxruntime lacks) raises :class:`runtime.errors.BundleIntegrityError` naming it.
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization_level: str = "all", *, model_bytes: bytes | None = None,
                 allow_spinning: Optional[bool] = None, **_ignored: Any) -> None:
        import onnxruntime as ort

        so = session_options(intra_op_threads, inter_op_threads, graph_optimization_level,
                             allow_spinning=allow_spinning)
        self.path = Path(path)
        if model_bytes is None and not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        source = model_bytes if model_bytes is not None else str(self.path)
        try:
            self.session = ort.InferenceSession(source, sess_options=so,
                                                providers=available_providers(providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception classes
            if type(exc).__name__ in _NOT_THE_ARTIFACT or isinstance(exc, MemoryError):
                raise
            from runtime.errors import BundleIntegrityError

            why = f"{type(exc).__name__}: {_one_line(exc)}"
            raise BundleIntegrityError(self.path, (
                f"onnxruntime {ort.__version__} cannot load this file although its checksum "
                f"matches the manifest ({why}); rebuild the bundle, or run it with the "
                "onnxruntime version it was compiled with") if model_bytes is not None else
                f"onnxruntime {ort.__version__} cannot load this file ({why})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The public InferenceSession.run re-validates the feed names and handles execution
        # provider fallback on every call. With the CPU provider alone there is no fallback,
        # and the executor always feeds exactly input_names, so call the bound C++ run
        # directly (a few us per piece at batch 1). Anything else keeps the public path.
        native = getattr(self.session, "_sess", None)
        fast = getattr(native, "run", None)
        if fast is not None and self.session.get_providers() == ["CPUExecutionProvider"]:
            names = self.output_names
            self.run = lambda feeds: fast(names, feeds, None)  # type: ignore[method-assign]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)
