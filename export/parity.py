"""Parity gate: exported pieces must compute what the torch model computes, on real inputs.

* every piece: its ONNX (run with ONNX Runtime) against the torch piece on the real tensor that
  reaches it (images of the checkpoint's validation split, pushed through the earlier pieces);
* every exit of every skip configuration: the ONNX pieces chained along the execution plan
  (tensors passed by name, exactly as ``runtime.executor`` does) against ``model(x, skip)``.

Tolerances: logits ``max |onnx - torch| <= 1e-4`` (absolute); features (which are not
normalised and can be large in a trained ResNet) ``<= 1e-4 * max(1, max |torch|)``. Anything
non-finite fails. A failure raises :class:`ParityError` naming the piece or the config and
exit, the tensor, the difference and the tolerance.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from export.errors import ExportError
from export.segments import INPUT_NAME, LOGITS, SegmentPlan, prefix_order
from train.path_norms import model_for_path

LOGITS_ATOL = 1e-4
FEATURES_RTOL = 1e-4

#: piece id, {input name: array} -> outputs in the piece's output order
PieceRunnerFn = Callable[[str, Mapping[str, np.ndarray]], Sequence[np.ndarray]]


class ParityError(ExportError):
    """An exported piece or chained exit disagrees with the reference beyond tolerance."""

    def __init__(self, message: str, *, piece: str | None = None, config: str | None = None,
                 exit: int | None = None, tensor: str | None = None, diff: float = float("nan"),
                 tol: float = float("nan")) -> None:
        super().__init__(message)
        self.piece, self.config, self.exit, self.tensor = piece, config, exit, tensor
        self.diff, self.tol = diff, tol


def tolerance(name: str, reference: np.ndarray) -> float:
    """Allowed max abs difference for tensor ``name`` (see module docstring)."""
    if name == LOGITS:
        return LOGITS_ATOL
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    return FEATURES_RTOL * max(1.0, scale)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _ok(diff: float, tol: float) -> bool:
    return diff == diff and diff <= tol  # NaN fails


def _np(t: Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, Tensor) else np.asarray(t)


# ---------------------------------------------------------------------------------------------
# ONNX Runtime sessions for the portable ONNX files
# ---------------------------------------------------------------------------------------------

def ort_runner(paths: Mapping[str, str | Path], *, threads: int | None = None,
               providers: Sequence[str] | None = None,
               graph_optimization_level: str = "all") -> PieceRunnerFn:
    """A :data:`PieceRunnerFn` over ONNX files (sessions opened lazily, cached)."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime_runner import session_options

    sessions: dict[str, object] = {}

    def run(piece_id: str, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        sess = sessions.get(piece_id)
        if sess is None:
            so = session_options(intra_op_threads=threads, inter_op_threads=1,
                                 graph_optimization_level=graph_optimization_level)
            sess = ort.InferenceSession(str(paths[piece_id]), sess_options=so,
                                        providers=list(providers or ["CPUExecutionProvider"]))
            sessions[piece_id] = sess
        names = [i.name for i in sess.get_inputs()]
        return sess.run(None, {n: np.ascontiguousarray(feeds[n], dtype=np.float32) for n in names})

    return run


# ---------------------------------------------------------------------------------------------
# torch references (module-level so tests can monkeypatch them)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def torch_piece_outputs(model, plan: SegmentPlan, piece_id: str, h: Tensor) -> list[np.ndarray]:
    """Reference outputs of one piece (torch, eval mode)."""
    return [_np(t) for t in plan.piece(piece_id)(model, h)]


@torch.no_grad()
def reference_exits(model, x: Tensor, skip_config: str) -> list[np.ndarray]:
    """Reference logits of every exit: the model's own ``forward`` (independent of the cut),
    with the configuration's own norm statistics where they were re-estimated per path."""
    return [_np(t) for t in model_for_path(model, skip_config)(x, skip_config)]


# ---------------------------------------------------------------------------------------------
# the gates
# ---------------------------------------------------------------------------------------------

def check_piece(model, plan: SegmentPlan, piece_id: str, h: Tensor, run: PieceRunnerFn) -> dict[str, float]:
    """One piece against torch on its real input ``h``; returns max abs diff per output."""
    piece = plan.piece(piece_id)
    refs = torch_piece_outputs(model, plan, piece_id, h)
    outs = run(piece_id, {piece.input_name: _np(h)})
    diffs = {}
    for name, ref, out in zip(piece.output_names, refs, outs):
        diff, tol = max_abs_diff(out, ref), tolerance(name, ref)
        diffs[name] = diff
        if not _ok(diff, tol):
            raise ParityError(f"parity check failed: piece {piece_id!r} output {name!r}: max |onnx - torch| "
                              f"= {diff:.3g} > tolerance {tol:.3g} (batch {len(h)})",
                              piece=piece_id, tensor=name, diff=diff, tol=tol)
    return diffs


def check_pieces(model, plan: SegmentPlan, inputs: Mapping[str, Tensor], run: PieceRunnerFn,
                 piece_ids: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    return {pid: check_piece(model, plan, pid, inputs[pid], run)
            for pid in (piece_ids if piece_ids is not None else [p.id for p in plan.pieces])}


def chain_exits(plan_execution: Mapping[str, list[list[str]]], output_names: Mapping[str, Sequence[str]],
                input_names: Mapping[str, Sequence[str]], run: PieceRunnerFn, x: np.ndarray,
                configs: Sequence[str], input_name: str = INPUT_NAME) -> dict[str, list[np.ndarray]]:
    """Logits of every exit of every config, chaining ``run`` along the plans by tensor name.

    Segments shared by configs with the same prefix are run once.
    """
    envs: dict[str, dict[str, np.ndarray]] = {"": {input_name: np.ascontiguousarray(x, dtype=np.float32)}}
    logits: dict[str, np.ndarray] = {}
    for prefix in prefix_order(configs):
        cfg = next(c for c in configs if c.startswith(prefix))
        k = len(prefix) - 1
        env = dict(envs[prefix[:-1]])
        for pid in plan_execution[cfg][k]:
            outs = run(pid, {n: env[n] for n in input_names[pid]})
            env.update(zip(output_names[pid], outs))
        envs[prefix] = env
        logits[prefix] = env[LOGITS]
    return {c: [logits[c[:k + 1]] for k in range(len(c))] for c in configs}


def check_chains(model, plan: SegmentPlan, x: Tensor, run: PieceRunnerFn,
                 configs: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Every exit of every skip config, chained, against ``model(x, skip)``."""
    configs = list(configs or plan.execution)
    got = chain_exits(plan.execution, {p.id: p.output_names for p in plan.pieces},
                      {p.id: [p.input_name] for p in plan.pieces}, run, _np(x), configs)
    diffs: dict[str, list[float]] = {}
    for cfg in configs:
        refs = reference_exits(model, x, cfg)
        diffs[cfg] = []
        for k, (ref, out) in enumerate(zip(refs, got[cfg])):
            diff = max_abs_diff(out, ref)
            diffs[cfg].append(diff)
            if not _ok(diff, LOGITS_ATOL):
                raise ParityError(f"parity check failed: skip config {cfg} exit {k} "
                                  f"(pieces {' > '.join(p for seg in plan.execution[cfg][:k + 1] for p in seg)}): "
                                  f"max |onnx - torch| logits = {diff:.3g} > tolerance {LOGITS_ATOL:g} "
                                  f"(batch {len(x)})", config=cfg, exit=k, tensor=LOGITS, diff=diff,
                                  tol=LOGITS_ATOL)
    return diffs


def compare_runners(manifest, reference: PieceRunnerFn, candidate: PieceRunnerFn, x: np.ndarray,
                    what: str, atol: float = LOGITS_ATOL) -> float:
    """Chained exits of every config of ``manifest``: ``candidate`` against ``reference``.

    Used by ``compile`` to check a compiled backend against ONNX Runtime on the portable ONNX.
    Returns the largest logits difference; raises ParityError beyond ``atol``.
    """
    outs = {p.id: [t.name for t in p.outputs] for p in manifest.pieces}
    ins = {p.id: [t.name for t in p.inputs] for p in manifest.pieces}
    configs = list(manifest.execution)
    ref = chain_exits(manifest.execution, outs, ins, reference, x, configs, manifest.input.name)
    got = chain_exits(manifest.execution, outs, ins, candidate, x, configs, manifest.input.name)
    worst = 0.0
    for cfg in configs:
        for k, (a, b) in enumerate(zip(got[cfg], ref[cfg])):
            diff = max_abs_diff(a, b)
            if not _ok(diff, atol):
                raise ParityError(f"parity check failed: {what}: skip config {cfg} exit {k}: max |{what} - "
                                  f"onnxruntime| logits = {diff:.3g} > tolerance {atol:g}",
                                  config=cfg, exit=k, tensor=LOGITS, diff=diff, tol=atol)
            worst = max(worst, diff)
    return worst
