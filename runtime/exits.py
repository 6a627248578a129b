"""Vectorised early-exit bookkeeping over precomputed per-exit probabilities (numpy only)."""
from __future__ import annotations

import numpy as np


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
