"""CIFAR-10 / CIFAR-100 from the official "python version" pickle folders.

Pickles are read with a restricted unpickler that only rebuilds numpy arrays, lists, dicts and
strings, so a tampered file cannot run code.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .loader import DataError, DataNotFoundError

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_LAYOUT = {  # train files, test files, meta file, label key, class-names key
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
                "labels", "label_names"),
    "cifar100": (["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
}


#: A CIFAR pickle is unreadable or has unexpected contents: a :class:`DataError`.
CIFARFormatError = DataError


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 renamed it
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _load_pickle(path: Path) -> dict[str, Any]:
    try:
        obj = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a format error
        raise CIFARFormatError(f"{path}: cannot read CIFAR pickle ({e})") from e
    if not isinstance(obj, dict):
        raise CIFARFormatError(f"{path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _decode(names: list[Any]) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def find_cifar_dir(kind: str, roots: list[str]) -> Path:
    """The pickle folder: each root itself or its ``cifar-10-batches-py``/``cifar-100-python`` child."""
    train_files, test_files, meta, _, _ = _LAYOUT[kind]
    searched = []
    for root in roots:
        for d in (Path(root), Path(root) / _FOLDER[kind]):
            searched.append(d)
            if all((d / f).is_file() for f in train_files + test_files + [meta]):
                return d
    where = "\n".join(f"  - {p}" for p in searched)
    raise DataNotFoundError(
        f"{kind}: CIFAR python-version files ({', '.join(train_files + test_files + [meta])}) "
        f"not found.\nLooked in:\n{where}\nDownload {CIFAR_URLS[kind]} and extract it "
        f"(tar xzf) so that <root>/{_FOLDER[kind]}/ exists, then pass root=<root>.")


def _read_split(d: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        obj = _load_pickle(d / f)
        if "data" not in obj or label_key not in obj:
            raise CIFARFormatError(f"{d / f}: missing 'data' or {label_key!r} entry")
        x = np.asarray(obj["data"], dtype=np.uint8)
        y = np.asarray(obj[label_key], dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
            raise CIFARFormatError(f"{d / f}: data shape {x.shape} / {len(y)} labels, expected "
                                   f"(N, 3072) and N labels")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(kind: str, roots: list[str]) -> tuple[
        tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], list[str], Path]:
    """((train x, y), (test x, y), class names, folder) for ``kind`` in {'cifar10', 'cifar100'}."""
    d = find_cifar_dir(kind, roots)
    train_files, test_files, meta, label_key, names_key = _LAYOUT[kind]
    meta_obj = _load_pickle(d / meta)
    if names_key not in meta_obj:
        raise CIFARFormatError(f"{d / meta}: missing {names_key!r}")
    names = _decode(list(meta_obj[names_key]))
    train = _read_split(d, train_files, label_key)
    test = _read_split(d, test_files, label_key)
    for split, (_, y) in (("train", train), ("test", test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(names)):
            raise CIFARFormatError(f"{d}: {split} labels outside 0..{len(names) - 1}")
    return train, test, names, d

