"""IDX (MNIST-format) reader and the MNIST / Fashion-MNIST loaders."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from .loader import DataError, DataNotFoundError

# type code -> numpy big-endian dtype (IDX spec)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


#: An IDX file is corrupt (bad magic, truncated, wrong shape): a :class:`DataError`.
IDXFormatError = DataError


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            return zlib.decompress(raw, wbits=31)  # gzip container, faster than gzip.open().read()
        except zlib.error:
            try:  # multi-member gzip files
                return gzip.decompress(raw)
            except (OSError, EOFError) as e:
                raise IDXFormatError(f"{path}: not a valid gzip file ({e})") from e
    return raw


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Read a raw or gzipped IDX file into a numpy array, validating magic number and size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    zero, code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(f"{path}: bad IDX magic number 0x{data[:4].hex()} "
                             f"(expected 0x0000<type><ndim>, e.g. 0x00000803 for images)")
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXFormatError(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim} "
                             f"(magic 0x{data[:4].hex()})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXFormatError(f"{path}: IDX payload is {len(data) - header} bytes, dims {dims} "
                             f"need {expected}")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


_FILES = {
    "train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte",
}


def _candidates(stem: str) -> list[str]:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    return [stem, stem + ".gz", dotted, dotted + ".gz"]


def find_idx_files(root: str | os.PathLike, subdirs: tuple[str, ...] = ("", "raw")) -> dict[str, Path] | list[Path]:
    """Locate the four IDX files under ``root`` (or ``root/<subdir>``).

    Returns the mapping when every file was found in one directory, else the list of
    directories searched (for the error message).
    """
    searched = []
    for sub in subdirs:
        d = Path(root) / sub if sub else Path(root)
        searched.append(d)
        found = {}
        for key, stem in _FILES.items():
            hit = next((d / c for c in _candidates(stem) if (d / c).is_file()), None)
            if hit is not None:
                found[key] = hit
        if len(found) == len(_FILES):
            return found
    return searched


def load_idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 N,1,H,W images, int64 labels) from an images/labels IDX pair, checked for agreement."""
    imgs = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if imgs.dtype != np.uint8:
        raise IDXFormatError(f"{images_path}: expected unsigned-byte pixels, got {imgs.dtype}")
    if len(imgs) != len(labels):
        raise IDXFormatError(f"{images_path} has {len(imgs)} images but {labels_path} has "
                             f"{len(labels)} labels")
    return (torch.from_numpy(imgs.copy()).unsqueeze(1),
            torch.from_numpy(labels.astype(np.int64)))


def missing_idx_message(name: str, searched: list[Path], how_to_get: str) -> str:
    files = ", ".join(f"{s}[.gz]" for s in _FILES.values())
    where = "\n".join(f"  - {p}" for p in searched)
    return (f"{name}: IDX files not found. Need {files}.\nLooked in:\n{where}\n{how_to_get}")


def load_idx_dataset(name: str, roots: list[str], how_to_get: str,
                     subdirs: tuple[str, ...] = ("", "raw")) -> tuple[
        tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], Path]:
    """((train images, labels), (test images, labels), directory) from the first root holding all files."""
    searched: list[Path] = []
    for root in roots:
        res = find_idx_files(root, subdirs)
        if isinstance(res, dict):
            train = load_idx_pair(res["train_images"], res["train_labels"])
            test = load_idx_pair(res["test_images"], res["test_labels"])
            if train[0].shape[1:] != test[0].shape[1:]:
                raise IDXFormatError(f"{res['train_images']} and {res['test_images']} have "
                                     f"different image sizes")
            return train, test, res["train_images"].parent
        searched.extend(res)
    raise DataNotFoundError(missing_idx_message(name, searched, how_to_get))
