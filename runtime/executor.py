"""Chains a bundle's pieces along its execution plan with one backend (numpy in, numpy out)."""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np

from runtime.backends import PieceRunner, open_runner, runner_options
from runtime.bundle import Bundle

#: One piece of a segment, ready to run: (runner.run, input names, output names, returns logits).
Step = tuple[Callable[[dict], list], tuple[str, ...], tuple[str, ...], bool]


class SegmentExecutor:
    """Runs segment k of a skip configuration; tensors pass between pieces by name.

    Runners are opened lazily (once per piece) and shared; each call keeps its own tensor
    dictionary, so one executor serves many threads. A runner is opened from the artifact's
    bytes as :meth:`Bundle.read_artifact` returns them (read once, sha256 checked on exactly
    those bytes), so an artifact changed after ``load`` is refused with a
    ``BundleIntegrityError`` when it is first opened, never run. The pieces of each
    (skip config, segment) are resolved once and cached, so a call does no manifest lookups.
    """

    def __init__(self, bundle: Bundle, backend: str, target: str | None = None,
                 options: dict[str, Any] | None = None) -> None:
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = backend
        self.target = target
        self.options = dict(options or {})
        self._runners: dict[str, PieceRunner] = {}
        self._steps: dict[tuple[str, int], tuple[Step, ...]] = {}
        self._span_steps: dict[tuple[int, int, str, str | None], tuple[Step, ...]] = {}
        self._lock = threading.Lock()
        self.input_name = self.manifest.input.name

    def runner(self, piece_id: str) -> PieceRunner:
        runner = self._runners.get(piece_id)
        if runner is None:
            with self._lock:
                runner = self._runners.get(piece_id)
                if runner is None:
                    runner = self._open(piece_id)
                    self._runners[piece_id] = runner
        return runner

    def _open(self, piece_id: str) -> PieceRunner:
        artifact = self.bundle.artifact(piece_id, self.backend, self.target)
        path = self.bundle.resolve(artifact.file)
        data = self.bundle.read_artifact(piece_id, self.backend, self.target)
        piece = self.manifest.piece(piece_id)
        # the runner's own keys of the artifact options (v1 bundles kept them there), then the
        # deployment record's and the caller's
        options = {**runner_options(self.backend, artifact.options, strict=False), **self.options}
        names = dict(input_names=[t.name for t in piece.inputs],
                     output_names=[t.name for t in piece.outputs])
        if self.backend == "tensorrt":
            # the engine built on the device runs; the ONNX it was built from was checked
            # just now (read_artifact) and is checked again against the engine's sidecar
            return open_runner(self.backend, path, options, **names)
        return open_runner(self.backend, path, options, **names, data=data)

    def steps(self, skip_config: str, k: int) -> tuple[Step, ...]:
        """The pieces of segment ``k`` of ``skip_config``, runners opened (cached)."""
        key = (skip_config, k)
        steps = self._steps.get(key)
        if steps is None:
            segments = self.manifest.segments(skip_config)
            if not 0 <= k < len(segments):
                raise IndexError(f"segment {k} out of range: {skip_config!r} has "
                                 f"{len(segments)} segments")
            built = []
            for piece in segments[k]:
                r = self.runner(piece.id)
                built.append((r.run, tuple(r.input_names), tuple(r.output_names),
                              bool(piece.returns_logits)))
            steps = tuple(built)
            self._steps[key] = steps  # idempotent: a racing thread stores an equal tuple
        return steps

    def _step(self, piece) -> Step:
        r = self.runner(piece.id)
        return (r.run, tuple(r.input_names), tuple(r.output_names), bool(piece.returns_logits))

    def has_merged(self, first: int, last: int, variant: str, prefix: str | None = None) -> bool:
        """Whether the bundle has a merged piece for this span (on path ``prefix``, the
        variants of stages 0..first-1; None: any) with an artifact for this executor's
        backend (and target)."""
        piece = self.manifest.merged_piece(first, last, variant, prefix)
        return piece is not None and bool(piece.find_artifacts(self.backend, self.target))

    def span_steps(self, first: int, last: int, variant: str,
                   prefix: str | None = None) -> tuple[Step, ...]:
        """Stages ``first..last`` under ``variant`` (one 'F'/'T' per stage) plus exit head
        ``last``, reached through ``prefix`` (the variants of stages 0..first-1; None: any
        path, e.g. to time the span), runners opened (cached): the merged piece when the
        bundle has one for this backend/target (one step), else the chain of the per-stage
        segments of a skip config that follows the path (``prefix + variant``)."""
        key = (first, last, variant, prefix)
        steps = self._span_steps.get(key)
        if steps is not None:
            return steps
        S = self.manifest.stages
        if not (isinstance(first, int) and isinstance(last, int) and 0 <= first <= last < S):
            raise IndexError(f"span {first}..{last} out of range: the bundle has stages "
                             f"0..{S - 1}")
        if (not isinstance(variant, str) or len(variant) != last - first + 1
                or set(variant) - {"T", "F"}):
            raise ValueError(f"variant {variant!r}: expected {last - first + 1} chars 'T'/'F', "
                             f"one per stage {first}..{last}")
        if prefix is not None and (not isinstance(prefix, str) or len(prefix) != first
                                   or set(prefix) - {"T", "F"}):
            raise ValueError(f"prefix {prefix!r}: expected {first} chars 'T'/'F', one per "
                             f"stage before {first}")
        if self.has_merged(first, last, variant, prefix):
            steps = (self._step(self.manifest.merged_piece(first, last, variant, prefix)),)
        else:
            configs = self.manifest.span_configs(first, last, variant, prefix)
            steps = tuple(step for k, cfg in enumerate(configs, start=first)
                          for step in self.steps(cfg, k))
        self._span_steps[key] = steps  # idempotent: a racing thread stores an equal tuple
        return steps

    def run_span(self, first: int, last: int, variant: str, tensors: dict[str, np.ndarray],
                 prefix: str | None = None) -> np.ndarray:
        """Run stages ``first..last`` under ``variant`` on the path ``prefix`` (variants of
        stages 0..first-1) in place on ``tensors`` (updated with every output; intermediate
        exits' logits are overwritten); return exit ``last``'s logits. ``tensors`` must hold
        the span's input (the model input for ``first == 0``, else ``features{first-1}``)."""
        steps = (self._span_steps.get((first, last, variant, prefix))
                 or self.span_steps(first, last, variant, prefix))
        for run, inputs, outputs, _returns_logits in steps:
            tensors.update(zip(outputs, run({name: tensors[name] for name in inputs})))
        return tensors["logits"]

    def warm(self, skip_config: str) -> None:
        """Open every runner a skip configuration needs (so timing excludes session creation)."""
        for k in range(len(self.manifest.segments(skip_config))):
            self.steps(skip_config, k)
        for piece in self.manifest.pieces:  # merged spans that run in this configuration
            if (piece.variant is not None and piece.first_stage is not None
                    and skip_config[piece.first_stage:piece.stage + 1] == piece.variant
                    and piece.serves(skip_config)
                    and piece.find_artifacts(self.backend, self.target)):
                self.span_steps(piece.first_stage, piece.stage, piece.variant,
                                skip_config[:piece.first_stage])

    def run_segment(self, skip_config: str, k: int, tensors: dict[str, np.ndarray]) -> np.ndarray:
        """Run segment k in place on ``tensors`` (updated with every output); return its logits."""
        steps = self._steps.get((skip_config, k)) or self.steps(skip_config, k)
        logits = None
        for run, inputs, outputs, returns_logits in steps:
            tensors.update(zip(outputs, run({name: tensors[name] for name in inputs})))
            if returns_logits:
                logits = tensors["logits"]
        assert logits is not None, f"segment {k} of {skip_config} returned no logits"
        return logits

    def run_exits(self, x: np.ndarray, skip_config: str, upto: int | None = None) -> list[np.ndarray]:
        """Logits of exits 0..upto (default: all) for a preprocessed float32 batch."""
        tensors = {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}
        last = self.manifest.stages - 1 if upto is None else upto
        return [self.run_segment(skip_config, k, tensors) for k in range(last + 1)]
