"""Vectorised simulation of a stopping rule over precomputed per-exit probabilities (numpy only).

``simulate(rule, probs, labels, ctx)`` gives exactly what running the rule on the device would
give — segment after segment, each sample stopping at the first exit where the rule says so (the
last exit always stops) — but for all samples at once: rules are row-wise, so the rule is asked
once per exit for every sample and the first "stop" of each sample is its exit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from runtime.exits import cumulative_ms
from runtime.rules import StopContext, StoppingRule

__all__ = ["SimResult", "simulate", "check_probs", "check_labels", "first_exit_where",
           "max_prob_exits", "outcome_at_exits", "latency_at_exits"]


# -- exits chosen over precomputed per-exit probabilities -----------------------------------

def first_exit_where(stop: np.ndarray) -> np.ndarray:
    """Index of the first True along axis 0 of ``stop`` (S, N); the last exit where none is True."""
    stop = np.asarray(stop, dtype=bool).copy()
    stop[-1] = True
    return stop.argmax(axis=0)


def max_prob_exits(probs: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """Exit taken per sample when stopping at the first exit whose top probability >= threshold.

    ``probs`` is (S, N, C); ``thresholds`` a scalar or one value per exit.
    """
    thresholds = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (probs.shape[0],))
    return first_exit_where(probs.max(axis=2) >= thresholds[:, None])


def outcome_at_exits(probs: np.ndarray, labels: np.ndarray, exits: np.ndarray) -> dict:
    """Accuracy, mean 1-based exit and histogram for the chosen exit of every sample."""
    n = probs.shape[1]
    chosen = probs[exits, np.arange(n)]
    correct = chosen.argmax(axis=1) == labels
    histogram = np.bincount(exits, minlength=probs.shape[0])
    return {"accuracy": float(correct.mean()) if n else float("nan"),
            "mean_exit": float(exits.mean() + 1) if n else float("nan"),
            "exit_histogram": histogram.tolist()}


def latency_at_exits(segment_ms, exits: np.ndarray) -> np.ndarray:
    """Per-sample latency (ms) of stopping at ``exits`` (0-based): the cumulative ``C_exit``."""
    return cumulative_ms(segment_ms)[np.asarray(exits, dtype=np.intp)]


@dataclass
class SimResult:
    """Outcome of a rule on N samples. ``exits`` are 0-based, ``mean_exit`` is 1-based."""
    exits: np.ndarray                 # (N,) int, exit taken per sample
    predictions: np.ndarray           # (N,) int, argmax of the exit taken
    accuracy: Optional[float]         # None without labels
    mean_exit: float                  # 1-based mean exit
    exit_histogram: list[int]         # samples per exit (length S)
    mean_latency_ms: float            # mean of C_exit = sum of segment_ms up to the exit
    p99_latency_ms: float
    latency_ms: np.ndarray = field(repr=False, default=None)  # (N,) per-sample latency
    correct: Optional[np.ndarray] = field(repr=False, default=None)  # (N,) bool, with labels

    def summary(self) -> dict:
        """JSON-able summary (no per-sample arrays)."""
        return {"accuracy": self.accuracy, "mean_exit": self.mean_exit,
                "exit_histogram": list(self.exit_histogram),
                "mean_latency_ms": self.mean_latency_ms, "p99_latency_ms": self.p99_latency_ms}


def check_probs(probs: object, *, what: str = "probs", atol: float = 1e-3) -> np.ndarray:
    """Validate an (S, N, C) array of per-exit class probabilities; returns it as an ndarray."""
    p = np.asarray(probs)
    if p.ndim != 3:
        raise ValueError(f"{what}: expected an (S exits, N samples, C classes) array, got shape "
                         f"{p.shape}")
    S, N, C = p.shape
    if S < 1 or N < 1 or C < 1:
        raise ValueError(f"{what}: empty dimension in shape {p.shape}")
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(f"{what}: expected floating-point probabilities, got dtype {p.dtype}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{what}: contains NaN or infinite values")
    if np.any(p < 0) or np.any(np.abs(p.sum(axis=2, dtype=np.float64) - 1.0) > atol):
        raise ValueError(f"{what}: rows are not probability vectors (negative values or sums "
                         "!= 1); pass softmax outputs, not logits")
    return p


def check_labels(labels: object, n: int, num_classes: int) -> np.ndarray:
    """Validate (N,) integer labels in [0, num_classes)."""
    y = np.asarray(labels)
    if y.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},) to match probs (S, N={n}, C), got "
                         f"{y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise ValueError("labels: contains NaN or infinite values")
        if np.any(y != np.round(y)):
            raise ValueError("labels: expected integer class indices")
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iu":
        raise ValueError(f"labels: expected integer class indices, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels: class indices must be in [0, {num_classes}), got "
                         f"[{y.min()}, {y.max()}]")
    return y.astype(np.int64)


def _as_ctx(ctx: Union[StopContext, Sequence[float]], S: int) -> StopContext:
    if not isinstance(ctx, StopContext):
        ctx = StopContext(segment_ms=ctx)
    if ctx.num_exits != S:
        raise ValueError(f"ctx.segment_ms has {ctx.num_exits} entries but probs has {S} exits")
    return ctx


def simulate(rule: StoppingRule, probs: np.ndarray, labels: Optional[np.ndarray],
             ctx: Union[StopContext, Sequence[float]]) -> SimResult:
    """Run ``rule`` over precomputed probabilities ``probs`` (S, N, C).

    ``labels`` (N,) or None; ``ctx`` a StopContext (or just the segment_ms list). Per sample the
    latency is ``C_exit = segment_ms[0] + ... + segment_ms[exit]``.
    """
    p = check_probs(probs)
    S, N, C = p.shape
    ctx = _as_ctx(ctx, S)
    y = None if labels is None else check_labels(labels, N, C)
    exits = first_exit_where(rule.stop_matrix(p, ctx))
    predictions = p[exits, np.arange(N)].argmax(axis=1)
    lat = latency_at_exits(ctx.segment_ms, exits)
    correct = None if y is None else predictions == y
    return SimResult(
        exits=exits, predictions=predictions,
        accuracy=None if correct is None else float(correct.mean()),
        mean_exit=float(exits.mean() + 1),
        exit_histogram=np.bincount(exits, minlength=S).tolist(),
        mean_latency_ms=float(lat.mean()),
        p99_latency_ms=float(np.percentile(lat, 99)),
        latency_ms=lat, correct=correct)
