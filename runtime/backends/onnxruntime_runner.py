"""ONNX Runtime execution of one piece (the embedded default backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def session_options(intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                    graph_optimization_level: str = "all",
                    optimized_model_path: str | Path | None = None):
    """ORT SessionOptions from a device profile's `onnxruntime` options."""
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
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def available_providers(requested: list[str] | None) -> list[str]:
    """The requested execution providers this onnxruntime build has, CPU always last."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    chosen = [p for p in (requested or []) if p in have and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


class ORTPieceRunner:
    """An InferenceSession over one piece; thread-safe (ORT sessions allow concurrent run())."""

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization_level: str = "all", **_ignored: Any) -> None:
        import onnxruntime as ort

        so = session_options(intra_op_threads, inter_op_threads, graph_optimization_level)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), sess_options=so,
                                            providers=available_providers(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)
