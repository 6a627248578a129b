"""Deterministic, stratified splits.

Indices are ordered inside each class by a splitmix64 hash of ``(seed, index)`` instead of a
library RNG, so a split is reproduced bit-for-bit from ``(fraction, seed)`` on any platform and
with any numpy/torch version (stopping rules are calibrated on the validation split later).
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import Tensor

#: Seed and fraction for carving a test split out of datasets that ship without one. Fixed, so
#: the test split does not move when ``split_seed`` changes.
TEST_SPLIT_SEED = 20240531
TEST_FRACTION = 0.2

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _M64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return x ^ (x >> np.uint64(31))


def hash_keys(n: int, seed: int) -> np.ndarray:
    """A seeded pseudo-random uint64 key per index 0..n-1 (platform independent)."""
    with np.errstate(over="ignore"):
        s = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        return _splitmix64(np.arange(n, dtype=np.uint64) ^ s)


def stratified_split(labels: Tensor | np.ndarray, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Split indices into (keep, held_out), ``held_out`` ~ ``fraction`` of every class.

    The held-out total is exactly ``round(n * fraction)``, shared out between classes by largest
    remainder. Both index tensors are sorted (int64) and disjoint.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64)
    n = len(y)
    total = int(round(n * fraction))
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    ideal = counts * fraction
    take = np.floor(ideal).astype(np.int64)
    short = total - int(take.sum())
    if short > 0:  # largest fractional parts first, ties by class order
        order = np.lexsort((np.arange(len(classes)), -(ideal - take)))
        take[order[:short]] += 1
    keys = hash_keys(n, seed)
    # sort by (class, key): within each class a seeded pseudo-random order
    order = np.lexsort((keys, inverse))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_class = np.empty(n, dtype=np.int64)
    rank_in_class[order] = np.arange(n) - np.repeat(starts, counts)
    held = rank_in_class < take[inverse]
    return (torch.from_numpy(np.flatnonzero(~held)).long(),
            torch.from_numpy(np.flatnonzero(held)).long())


def index_digest(indices: Tensor) -> str:
    """Short sha256 of a (sorted) index set, recorded so a split can be checked later."""
    arr = np.sort(np.asarray(indices, dtype=np.int64)).astype("<i8")
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def train_val_test_split(labels: Tensor, val_fraction: float, split_seed: int,
                         test_fraction: float = TEST_FRACTION) -> tuple[Tensor, Tensor, Tensor]:
    """For data without an official test set: a fixed test split, then val from the rest."""
    rest, test = stratified_split(labels, test_fraction, TEST_SPLIT_SEED)
    tr, va = stratified_split(labels[rest], val_fraction, split_seed)
    return rest[tr], rest[va], test
