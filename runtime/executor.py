"""Chains a bundle's pieces along its execution plan with one backend (numpy in, numpy out)."""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from runtime.backends import PieceRunner, open_runner
from runtime.bundle import Bundle


class SegmentExecutor:
    """Runs segment k of a skip configuration; tensors pass between pieces by name.

    Runners are opened lazily (once per piece) and shared; each call keeps its own tensor
    dictionary, so one executor serves many threads.
    """

    def __init__(self, bundle: Bundle, backend: str, target: str | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = backend
        self.target = target
        self.options = dict(options or {})
        self._runners: dict[str, PieceRunner] = {}
        self._lock = threading.Lock()
        self.input_name = self.manifest.input.name

    def runner(self, piece_id: str) -> PieceRunner:
        runner = self._runners.get(piece_id)
        if runner is None:
            with self._lock:
                runner = self._runners.get(piece_id)
                if runner is None:
                    path = self.bundle.artifact_path(piece_id, self.backend, self.target)
                    artifact = self.bundle.artifact(piece_id, self.backend, self.target)
                    piece = self.manifest.piece(piece_id)
                    runner = open_runner(self.backend, path, {**artifact.options, **self.options},
                                         input_names=[t.name for t in piece.inputs],
                                         output_names=[t.name for t in piece.outputs])
                    self._runners[piece_id] = runner
        return runner

    def warm(self, skip_config: str) -> None:
        """Open every runner a skip configuration needs (so timing excludes session creation)."""
        for segment in self.manifest.segments(skip_config):
            for piece in segment:
                self.runner(piece.id)

    def run_segment(self, skip_config: str, k: int, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """Run segment k in place on ``tensors`` (updated with every output); return its logits."""
        logits = None
        for piece in self.manifest.segments(skip_config)[k]:
            runner = self.runner(piece.id)
            outputs = runner.run({name: tensors[name] for name in runner.input_names})
            tensors.update(zip(runner.output_names, outputs))
            if piece.returns_logits:
                logits = tensors["logits"]
        assert logits is not None, f"segment {k} of {skip_config} returned no logits"
        return logits

    def run_exits(self, x: np.ndarray, skip_config: str, upto: int | None = None) -> list[np.ndarray]:
        """Logits of exits 0..upto (default: all) for a preprocessed float32 batch."""
        tensors = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        last = self.manifest.stages - 1 if upto is None else upto
        return [self.run_segment(skip_config, k, tensors) for k in range(last + 1)]
