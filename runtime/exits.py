"""Per-exit statistics the stopping rules read, and cumulative latency (numpy only).

Conventions: ``probs`` is (S, N, C) — softmax of exit k for sample n — or, for the per-exit
statistics, any array whose LAST axis is the class axis. Exits are 0-based in arrays; the
reported ``mean_exit`` is 1-based (exit 0 counts as 1), as everywhere in the project.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["top_prob", "top2_margin", "normalised_entropy", "cumulative_ms"]


# -- per-exit statistics (last axis = classes) --------------------------------------------------

def top_prob(p: np.ndarray) -> np.ndarray:
    """Largest class probability, ``max_c p[..., c]``."""
    return np.max(np.asarray(p), axis=-1)


def top2_margin(p: np.ndarray) -> np.ndarray:
    """Difference between the two largest class probabilities (the top prob when C == 1)."""
    p = np.asarray(p)
    if p.shape[-1] < 2:
        return p[..., 0] if p.shape[-1] else np.zeros(p.shape[:-1])
    part = np.partition(p, p.shape[-1] - 2, axis=-1)
    return part[..., -1] - part[..., -2]


def normalised_entropy(p: np.ndarray) -> np.ndarray:
    """Shannon entropy divided by log C, in [0, 1] (0: one-hot, 1: uniform); 0 log 0 = 0.

    Computed in float64. With C == 1 the entropy is 0.
    """
    p = np.asarray(p, dtype=np.float64)
    c = p.shape[-1]
    if c < 2:
        return np.zeros(p.shape[:-1])
    safe = np.where(p > 0, p, 1.0)
    h = -(p * np.log(safe)).sum(axis=-1) / math.log(c)
    return np.clip(h, 0.0, 1.0)


# -- latency bookkeeping -------------------------------------------------------------------------

def cumulative_ms(segment_ms) -> np.ndarray:
    """Latency to reach (and evaluate) each exit: ``C_k = sum_{j <= k} segment_ms[j]``."""
    return np.cumsum(np.asarray(segment_ms, dtype=np.float64))
