"""Input conventions of the on-device runtime: raw images or model-ready tensors -> float32 NCHW.

Two kinds of input are accepted (numpy only):

* **uint8 = raw pixels**, channels last, values 0..255, H and W equal to the model's
  (resizing/cropping is the caller's job):

  - one image: ``(H, W, C)``, or ``(H, W)`` for a 1-channel model;
  - a batch: ``(N, H, W, C)``, or ``(N, H, W)`` for a 1-channel model.

  They are normalised exactly like training does it: ``x = raw / 255 * (1/std) - mean/std``
  per channel (float32), then transposed to NCHW.

* **float (float32, float16, float64) = already-normalised model input**, channels first,
  exactly what the first segment consumes: one sample ``(C, H, W)`` or a batch ``(N, C, H, W)``.
  No scaling is applied (a float image in [0, 1] is *not* what the model expects: convert it to
  uint8 or normalise it yourself with :func:`normalize`). Values must be finite.

Everything else is refused with a ``ValueError`` that names the problem: other dtypes (integers
other than uint8, bool, complex, object), wrong rank, wrong channel count, wrong H/W, NaN/inf,
an empty batch.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .errors import UsageError

__all__ = ["prepare_input", "normalize", "FLOAT_DTYPES"]

#: Float dtypes taken as already-normalised model input.
FLOAT_DTYPES = (np.float32, np.float16, np.float64)


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def normalize(raw: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC pixels -> float32 NCHW model input, ``(raw / 255 - mean) / std`` per channel.

    Computed as ``raw * (1 / (255 * std)) - mean / std`` in float32, the same arithmetic as
    training's ``normalize_batch``, so the runtime feeds the model what it was trained on.
    """
    c = raw.shape[-1]
    std32 = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, c)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, c)
    scale = np.float32(1.0) / (np.float32(255.0) * std32)
    shift = mean32 / std32
    x = raw.astype(np.float32) * scale - shift
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def prepare_input(x: Any, shape: Sequence[int], mean: Sequence[float],
                  std: Sequence[float]) -> tuple[np.ndarray, bool]:
    """Validate ``x`` against the model input ``shape`` = [C, H, W] and return
    ``(float32 NCHW batch, was_batched)``. See the module docstring for the conventions."""
    C, H, W = (int(s) for s in shape)
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple)):
            try:
                x = np.asarray(x)
            except ValueError as exc:
                raise UsageError(f"input: cannot convert the list to an array ({exc})") from None
        else:
            raise UsageError(f"input: expected a numpy array, got {type(x).__name__}")
    if x.dtype == np.uint8:
        return _prepare_raw(x, C, H, W, mean, std)
    if x.dtype.type in FLOAT_DTYPES:
        return _prepare_float(x, C, H, W)
    raise UsageError(
        f"input: unsupported dtype {x.dtype}; pass uint8 pixels (HWC, 0..255) or float32 "
        f"already-normalised model input (NCHW)" + (
            " (convert integer pixels with x.astype(np.uint8) after checking they are 0..255)"
            if np.issubdtype(x.dtype, np.integer) else ""))


def _prepare_raw(x: np.ndarray, C: int, H: int, W: int, mean, std) -> tuple[np.ndarray, bool]:
    want = f"uint8 images of shape (H, W, C) = {_shape((H, W, C))} or a batch (N, H, W, C)" + (
        f", or grayscale (H, W) = {_shape((H, W))} / (N, H, W)" if C == 1 else "")
    if x.ndim == 2:
        if C != 1:
            raise UsageError(f"input: a 2-D (grayscale) image {_shape(x.shape)} needs a 1-channel "
                             f"model; this model expects {C} channels: {want}")
        batch, batched = x[None, :, :, None], False
    elif x.ndim == 3:
        if x.shape[-1] == C and x.shape[:2] == (H, W):
            batch, batched = x[None], False
        elif C == 1 and x.shape[1:] == (H, W):
            batch, batched = x[:, :, :, None], True
        elif x.shape == (C, H, W) and C != H:
            raise UsageError(f"input: uint8 image {_shape(x.shape)} looks channels-first; raw "
                             f"uint8 pixels must be channels-last (H, W, C) = {_shape((H, W, C))} "
                             "(use x.transpose(1, 2, 0))")
        else:
            batch, batched = x[None], False
            _check_hwc(batch, C, H, W, want)
    elif x.ndim == 4:
        if x.shape[1:] == (C, H, W) and x.shape[1:] != (H, W, C):
            raise UsageError(f"input: uint8 batch {_shape(x.shape)} looks channels-first (NCHW); "
                             f"raw uint8 pixels must be channels-last (N, H, W, C) = "
                             f"(N, {H}, {W}, {C}) (use x.transpose(0, 2, 3, 1))")
        batch, batched = x, True
    else:
        raise UsageError(f"input: expected {want}, got a {x.ndim}-D array {_shape(x.shape)}")
    _check_hwc(batch, C, H, W, want)
    return normalize(batch, mean, std), batched


def _check_hwc(batch: np.ndarray, C: int, H: int, W: int, want: str) -> None:
    n, h, w, c = batch.shape
    if n == 0:
        raise UsageError("input: empty batch (N = 0)")
    if c != C:
        raise UsageError(f"input: wrong channel count: got {c} channel(s), the model expects {C} "
                         f"(images are channels-last: {want})")
    if (h, w) != (H, W):
        raise UsageError(f"input: wrong image size: got H x W = {h} x {w}, the model expects "
                         f"{H} x {W} (resize/crop before calling predict)")


def _prepare_float(x: np.ndarray, C: int, H: int, W: int) -> tuple[np.ndarray, bool]:
    want = (f"float model input of shape (C, H, W) = {_shape((C, H, W))} or a batch "
            f"(N, C, H, W), already normalised")
    if x.ndim == 3:
        batch, batched = x[None], False
    elif x.ndim == 4:
        batch, batched = x, True
    else:
        raise UsageError(f"input: expected {want}, got a {x.ndim}-D array {_shape(x.shape)}")
    n, c, h, w = batch.shape
    if n == 0:
        raise UsageError("input: empty batch (N = 0)")
    if c != C:
        hint = (" (float input is channels-first NCHW; for channels-last pixels pass uint8)"
                if w == C else "")
        raise UsageError(f"input: wrong channel count: got {c} channel(s) in axis "
                         f"{1 if batched else 0}, the model expects {C}{hint}")
    if (h, w) != (H, W):
        raise UsageError(f"input: wrong image size: got H x W = {h} x {w}, the model expects "
                         f"{H} x {W} (resize/crop before calling predict)")
    out = np.ascontiguousarray(batch, dtype=np.float32)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        kind = "NaN" if np.isnan(out).any() else "inf"
        raise UsageError(f"input: {bad} non-finite value(s) ({kind}) in the float input")
    return out, batched
