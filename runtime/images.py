"""Image files -> uint8 pixels as the runtime takes them, with numpy alone.

    from runtime.images import load_image
    arr = load_image("cat.pgm", model.input_shape)          # uint8 (H, W) or (H, W, C)
    model.predict(arr)

What can be read:

* **without PIL** (numpy only, always): Netpbm images (``.pgm`` P2/P5 grayscale, ``.ppm``
  P3/P6 colour, ``.pnm``; 8- or 16-bit, any ``maxval``, ``#`` comments) and ``.npy`` arrays
  (``allow_pickle=False``: uint8, ``(H, W)`` or ``(H, W, C)``);
* **with PIL installed** (``pip install pillow``): also anything PIL reads (PNG, JPEG, BMP,
  GIF, TIFF, WebP...). Netpbm files are still read by the reader here (same pixels).

Channels are converted to what the model takes: 3 -> 1 with ITU-R 601-2 luma
``L = 0.299 R + 0.587 G + 0.114 B`` in PIL's fixed-point arithmetic (the same values as PIL's
``convert("L")``), and
1 -> 3 by repeating the channel; an alpha channel is dropped.

A size that differs from the model's:

* with the bundle's preprocessing record (``load_image(..., preprocess=
  model.manifest.input.raw.preprocess)``, models trained on image folders): resized and
  cropped exactly as training did (:func:`runtime.preprocess.preprocess_image`: shorter side
  to the model's size, PIL's bilinear filter in numpy, centre crop), ``resize`` or not;
* without one: an error unless ``resize=True``, then a bilinear resize to the model's H x W
  (the same numpy code; aspect ratio not preserved).

Errors are :class:`ImageError` (a ``ValueError`` and a ``runtime.errors.PipelineError``) whose
message starts with the file name. PIL is imported only when a non-Netpbm, non-.npy file is
read (resizing is numpy).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from runtime.errors import FileError
from runtime.preprocess import preprocess_image, resize_bilinear

__all__ = ["ImageError", "NETPBM_SUFFIXES", "NATIVE_SUFFIXES", "PIL_SUFFIXES", "have_pil",
           "image_suffixes", "read_netpbm", "read_npy", "read_image", "to_channels",
           "resize_image", "load_image", "is_image_file"]

PathLike = Union[str, "os.PathLike[str]"]

NETPBM_SUFFIXES = (".pgm", ".ppm", ".pnm")
#: Read here with numpy alone.
NATIVE_SUFFIXES = NETPBM_SUFFIXES + (".npy",)
#: Read through PIL when it is installed.
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_MAGIC = {b"P2": (1, False), b"P5": (1, True), b"P3": (3, False), b"P6": (3, True)}
#: PIL's fixed-point ITU-R 601-2 luma weights (``convert("L")``), so both agree bit for bit.
_LUMA = np.array([19595, 38470, 7471], dtype=np.uint32)


class ImageError(FileError):
    """An image file cannot be read or does not fit the model: ``"<file>: <reason>"``."""


def have_pil() -> bool:
    """Whether PIL (pillow) is installed (looked up without importing it)."""
    try:
        return importlib.util.find_spec("PIL") is not None
    except (ImportError, ValueError):  # pragma: no cover - broken installs
        return False


def _pil_image():
    # imported by name: PIL is optional, never needed by the runtime itself
    return importlib.import_module("PIL.Image")


def image_suffixes() -> tuple[str, ...]:
    """File suffixes :func:`read_image` can read on this machine (lower case)."""
    return NATIVE_SUFFIXES + (PIL_SUFFIXES if have_pil() else ())


# ---------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------

def read_netpbm(path: PathLike) -> np.ndarray:
    """A PGM (P2/P5) as uint8 ``(H, W)`` or a PPM (P3/P6) as uint8 ``(H, W, 3)``.

    ``maxval`` other than 255 (16-bit files included) is rescaled to 0..255, rounded."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageError(p, f"cannot read: {exc.strerror or exc}") from None
    magic = data[:2]
    if magic not in _MAGIC:
        raise ImageError(p, f"not a PGM/PPM file (magic {magic!r}; P2, P3, P5 or P6 expected)")
    channels, binary = _MAGIC[magic]
    fields: list[bytes] = []
    i = 2
    while len(fields) < 3:  # width, height, maxval; '#' comments allowed between them
        while i < len(data) and data[i:i + 1].isspace():
            i += 1
        if i >= len(data):
            raise ImageError(p, "truncated header (width, height and maxval expected)")
        if data[i:i + 1] == b"#":
            while i < len(data) and data[i:i + 1] not in (b"\n", b"\r"):
                i += 1
            continue
        j = i
        while j < len(data) and not data[j:j + 1].isspace() and data[j:j + 1] != b"#":
            j += 1
        fields.append(data[i:j])
        i = j
    try:
        w, h, maxval = (int(f) for f in fields)
    except ValueError:
        raise ImageError(p, f"bad header fields {[f.decode('latin-1') for f in fields]}") from None
    if w < 1 or h < 1 or not 1 <= maxval <= 65535:
        raise ImageError(p, f"bad header: width {w}, height {h}, maxval {maxval}")
    count = w * h * channels
    if binary:
        if i >= len(data) or not data[i:i + 1].isspace():
            raise ImageError(p, "truncated header (no whitespace before the raster)")
        i += 1  # exactly one whitespace byte before the raster
        dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
        if len(data) - i < count * dtype.itemsize:
            raise ImageError(p, f"truncated raster: {len(data) - i} bytes, "
                                f"{count * dtype.itemsize} expected for {w}x{h}")
        arr = np.frombuffer(data, dtype=dtype, count=count, offset=i).astype(np.int64)
    else:
        tokens = [t for t in _strip_comments(data[i:]).split()]
        if len(tokens) < count:
            raise ImageError(p, f"truncated raster: {len(tokens)} values, {count} expected "
                                f"for {w}x{h}")
        try:
            arr = np.array(tokens[:count], dtype=np.int64)
        except ValueError:
            raise ImageError(p, "non-numeric pixel values") from None
    if arr.size and (arr.min() < 0 or arr.max() > maxval):
        raise ImageError(p, f"pixel values outside 0..{maxval}")
    if maxval != 255:
        arr = np.floor(arr.astype(np.float64) * 255.0 / maxval + 0.5)
    arr = arr.astype(np.uint8)
    return arr.reshape(h, w) if channels == 1 else arr.reshape(h, w, channels)


def _strip_comments(body: bytes) -> bytes:
    if b"#" not in body:
        return body
    return b"\n".join(line.split(b"#", 1)[0] for line in body.splitlines())


def read_npy(path: PathLike) -> np.ndarray:
    """A ``.npy`` array, without pickle (any shape and dtype; callers check them)."""
    p = Path(path)
    try:
        return np.load(p, allow_pickle=False)
    except (ValueError, EOFError) as exc:
        raise ImageError(p, f"not a plain .npy array ({' '.join(str(exc).split())})") from None
    except OSError as exc:
        raise ImageError(p, f"cannot read: {exc.strerror or exc}") from None


def read_image(path: PathLike) -> np.ndarray:
    """An image file as uint8 ``(H, W)`` (grayscale), ``(H, W, 3)`` or ``(H, W, 4)``.

    Netpbm and ``.npy`` with numpy; anything else with PIL (an :class:`ImageError` saying to
    install pillow when it is missing)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        arr = read_npy(p)
        return _check_pixels(p, arr)
    if suffix in NETPBM_SUFFIXES:
        return read_netpbm(p)
    try:
        head = p.read_bytes()[:2] if p.is_file() else b""
    except OSError:
        head = b""
    if head in _MAGIC:  # a Netpbm file under another name
        return read_netpbm(p)
    if not have_pil():
        raise ImageError(p, f"reading {suffix or 'this'} files needs PIL (pip install pillow); "
                            f"without it: {', '.join(NATIVE_SUFFIXES)}")
    Image = _pil_image()
    try:
        with Image.open(p) as im:
            mode = im.mode
            if mode in ("L", "LA", "RGB", "RGBA"):
                want = mode
            elif mode in ("P", "PA"):
                want = "RGBA" if mode == "PA" or "transparency" in im.info else "RGB"
            elif mode == "1" or mode.startswith("I") or mode == "F":
                want = "L"  # PIL's conversion (16-bit values are clipped, as PIL does)
            else:  # CMYK, YCbCr, LAB, HSV...
                want = "RGBA" if "A" in mode else "RGB"
            return np.array(im if want == mode else im.convert(want), dtype=np.uint8)
    except OSError as exc:
        if type(exc).__name__ == "UnidentifiedImageError":
            raise ImageError(p, "not an image PIL can read") from None
        raise ImageError(p, f"cannot read: {exc}") from None


def _check_pixels(p: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageError(p, f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (1, 3, 4)):
        return arr
    raise ImageError(p, f"expected one image (H, W) or (H, W, C) with C in 1, 3, 4; "
                        f"got shape {tuple(arr.shape)}")


# ---------------------------------------------------------------------------------------------
# channels and size
# ---------------------------------------------------------------------------------------------

def to_channels(arr: np.ndarray, channels: int, *, file: object = "<image>") -> np.ndarray:
    """uint8 ``(H, W)`` for ``channels == 1`` (grayscale), else ``(H, W, channels)``."""
    if arr.ndim == 2:
        arr = arr[..., None]
    have = arr.shape[-1]
    if have in (2, 4):  # drop alpha
        arr, have = arr[..., :have - 1], have - 1
    if channels == 1:
        if have == 3:
            luma = (arr.astype(np.uint32) * _LUMA).sum(axis=-1)
            return ((luma + 32768) >> 16).astype(np.uint8)
        if have == 1:
            return np.ascontiguousarray(arr[..., 0])
    elif channels == 3:
        if have == 3:
            return np.ascontiguousarray(arr)
        if have == 1:
            return np.ascontiguousarray(np.repeat(arr, 3, axis=-1))
    elif have == channels:
        return np.ascontiguousarray(arr)
    raise ImageError(file, f"{have}-channel image, the model takes {channels} channels "
                           "(pass a .npy array with the right channels)")


def resize_image(arr: np.ndarray, size: Sequence[int], *, method: str = "auto") -> np.ndarray:
    """uint8 ``(H, W[, C])`` resized to ``size = (H, W)``.

    ``method``: ``"auto"`` / ``"bilinear"`` (PIL's bilinear filter, antialiased, computed in
    numpy: :func:`runtime.preprocess.resize_bilinear`, PIL not needed), ``"nearest"`` (each
    output pixel centre takes the input pixel under it).
    """
    H, W = int(size[0]), int(size[1])
    if arr.shape[:2] == (H, W):
        return arr
    if method not in ("auto", "bilinear", "nearest"):
        raise ValueError(f"resize method {method!r}: auto, bilinear or nearest")
    if method != "nearest":
        return resize_bilinear(arr, (H, W))
    h, w = arr.shape[:2]
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return np.ascontiguousarray(arr[rows][:, cols])


def load_image(path: PathLike, input_shape: Sequence[int], *, resize: bool = False,
               method: str = "auto", preprocess: object = None) -> np.ndarray:
    """An image file as the model takes it: uint8 ``(H, W)`` for a 1-channel model, else
    ``(H, W, C)``, of the model's ``input_shape = (C, H, W)``.

    ``preprocess``: the bundle's ``input.raw.preprocess`` (a ``PreprocessSpec``, its dict, or
    None): an image of another size is resized and cropped as training did. Without it a size
    mismatch is an :class:`ImageError` unless ``resize`` (then :func:`resize_image`).
    """
    C, H, W = (int(s) for s in input_shape)
    p = Path(path)
    arr = to_channels(read_image(p), C, file=p)
    if arr.shape[:2] != (H, W):
        if preprocess is not None:
            return preprocess_image(arr, preprocess)
        if not resize:
            raise ImageError(p, f"image is {arr.shape[1]}x{arr.shape[0]} (WxH), the model "
                                f"expects {W}x{H}; pass --resize or resize it yourself")
        arr = resize_image(arr, (H, W), method=method)
    return arr


def is_image_file(path: PathLike, suffixes: Optional[Sequence[str]] = None) -> bool:
    """Whether ``path`` has a suffix :func:`read_image` reads here."""
    return Path(path).suffix.lower() in tuple(suffixes or image_suffixes())
