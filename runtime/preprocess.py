"""Input conventions of the on-device runtime: raw images or model-ready tensors -> float32 NCHW.

Two kinds of input are accepted (numpy only):

* **uint8 = raw pixels**, channels last, values 0..255, H and W equal to the model's
  (resizing/cropping is the caller's job, unless the bundle records how training did it,
  ``input.raw.preprocess``, and the caller passes it: ``prepare_input(..., preprocess=)``,
  :func:`preprocess_image`, ``runtime.images.load_image(..., preprocess=)``):

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

from typing import Any, Optional, Sequence

import numpy as np

from .errors import UsageError
from .manifest import PREPROCESS_CROP, PREPROCESS_INTERPOLATION, PREPROCESS_RESIZE

__all__ = ["prepare_input", "normalize", "FLOAT_DTYPES", "preprocess_image", "fit_raw",
           "resize_bilinear",
           "shorter_side_geometry", "PREPROCESS_RESIZE", "PREPROCESS_CROP",
           "PREPROCESS_INTERPOLATION"]

#: Float dtypes taken as already-normalised model input.
FLOAT_DTYPES = (np.float32, np.float16, np.float64)


def _shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


#: (mean, std, channels) -> (scale, shift) float32 arrays of normalize (a handful per process)
_AFFINE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _affine(mean: Sequence[float], std: Sequence[float], c: int) -> tuple[np.ndarray, np.ndarray]:
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std), c)
    hit = _AFFINE.get(key)
    if hit is None:
        std32 = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, c)
        mean32 = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, c)
        hit = (np.float32(1.0) / (np.float32(255.0) * std32), mean32 / std32)
        if len(_AFFINE) < 64:
            _AFFINE[key] = hit
    return hit


def normalize(raw: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 NHWC pixels -> float32 NCHW model input, ``(raw / 255 - mean) / std`` per channel.

    Computed as ``raw * (1 / (255 * std)) - mean / std`` in float32, the same arithmetic as
    training's ``normalize_batch``, so the runtime feeds the model what it was trained on.
    """
    c = raw.shape[-1]
    scale, shift = _affine(mean, std, c)
    x = raw.astype(np.float32)
    x *= scale
    x -= shift
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def prepare_input(x: Any, shape: Sequence[int], mean: Sequence[float],
                  std: Sequence[float], *, preprocess: Any = None) -> tuple[np.ndarray, bool]:
    """Validate ``x`` against the model input ``shape`` = [C, H, W] and return
    ``(float32 NCHW batch, was_batched)``. See the module docstring for the conventions.

    ``preprocess``: the manifest's ``input.raw.preprocess`` (or None): uint8 images of another
    size are then resized/cropped as training did (:func:`preprocess_image`) first."""
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
        if preprocess is not None:
            x = fit_raw(x, (C, H, W), preprocess)
        return _prepare_raw(x, C, H, W, mean, std)
    if x.dtype.type in FLOAT_DTYPES:
        return _prepare_float(x, C, H, W)
    raise UsageError(
        f"input: unsupported dtype {x.dtype}; pass uint8 pixels (HWC, 0..255) or float32 "
        f"already-normalised model input (NCHW)" + (
            " (convert integer pixels with x.astype(np.uint8) after checking they are 0..255)"
            if np.issubdtype(x.dtype, np.integer) else ""))


def _want_raw(C: int, H: int, W: int) -> str:
    return f"uint8 images of shape (H, W, C) = {_shape((H, W, C))} or a batch (N, H, W, C)" + (
        f", or grayscale (H, W) = {_shape((H, W))} / (N, H, W)" if C == 1 else "")


def _prepare_raw(x: np.ndarray, C: int, H: int, W: int, mean, std) -> tuple[np.ndarray, bool]:
    if x.ndim == 3 and x.shape == (H, W, C):  # one image as the model takes it: nothing to check
        return normalize(x[None], mean, std), False
    want = _want_raw(C, H, W)
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


# ---------------------------------------------------------------------------------------------
# resizing raw images as training did (the manifest's ``input.raw.preprocess``)
# ---------------------------------------------------------------------------------------------
#
# One description, recorded by export in ``input.raw.preprocess`` for models trained on image
# folders: ``{"resize": "shorter_side", "size": S, "crop": "center", "interpolation":
# "bilinear"}``: scale the image so its shorter side is S (the longer one rounded, at least S),
# with PIL's bilinear filter (a triangle filter widened by the downscale factor, i.e.
# antialiased), then cut the centre S x S square. Training decodes with PIL; this is the
# runtime's numpy implementation of the same arithmetic (PIL's 22-bit fixed-point
# coefficients, horizontal pass first, rounded to uint8 between the passes), so both give the
# same pixels.

_PRECISION_BITS = 32 - 8 - 2  # PIL's Resample.c for 8-bit images


def _spec_dict(spec: Any) -> dict:
    if spec is None:
        raise ValueError("no preprocessing record")
    d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    for key, allowed in (("resize", PREPROCESS_RESIZE), ("crop", PREPROCESS_CROP),
                         ("interpolation", PREPROCESS_INTERPOLATION)):
        if d.get(key) not in allowed:
            raise ValueError(f"preprocess: {key} {d.get(key)!r} is not one of {', '.join(allowed)}")
    size = d.get("size")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"preprocess: size must be an int >= 1, got {size!r}")
    return d


def shorter_side_geometry(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    """``(resized_h, resized_w, top, left)``: the image scaled so its shorter side is ``size``
    (the other side ``round(side * size / shorter)``, at least ``size``), and the top-left
    corner of the centred ``size`` x ``size`` crop. Training uses the same function."""
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    return nh, nw, (nh - size) // 2, (nw - size) // 2


def _bilinear_coeffs(in_size: int, out_size: int, start: int, count: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """PIL's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` (bilinear filter) for output
    pixels ``start .. start + count - 1`` of an ``in_size`` -> ``out_size`` resize: the first
    input index of each output pixel's window and int64 weights ``(count, taps)``."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ksize = int(np.ceil(support)) * 2 + 1
    center = (np.arange(start, start + count, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C (int) truncation, >= 0
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize, dtype=np.int64)
    arg = (taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)
    w = np.where(np.abs(arg) < 1.0, 1.0 - np.abs(arg), 0.0)
    w[taps[None, :] >= xmax[:, None]] = 0.0
    total = np.add.accumulate(w, axis=1)[:, -1:]  # summed left to right, as PIL does
    w = np.divide(w, total, out=w, where=total != 0.0)
    k = np.floor(w * (1 << _PRECISION_BITS) + 0.5).astype(np.int64)  # weights are >= 0
    return xmin, k


def _resample_axis(x: np.ndarray, axis: int, xmin: np.ndarray, k: np.ndarray) -> np.ndarray:
    """One pass of PIL's 8-bit resampling along ``axis`` (0 rows, 1 columns) of uint8
    ``(H, W, C)`` with the window starts ``xmin`` and weights ``k`` of :func:`_bilinear_coeffs`."""
    src = np.ascontiguousarray(np.moveaxis(x, axis, 0))  # (in, other, C): contiguous rows to gather
    # int32 is exact: weights sum to at most 2**22 + taps / 2, so 255 * that + 2**21 < 2**31
    acc = np.full((len(xmin),) + src.shape[1:], 1 << (_PRECISION_BITS - 1), dtype=np.int32)
    k32 = k.astype(np.int32)
    last = src.shape[0] - 1
    tmp = np.empty(acc.shape, dtype=np.int32)
    for t in range(k.shape[1]):
        kt = k32[:, t]
        if not kt.any():
            continue
        np.multiply(src[np.minimum(xmin + t, last)], kt[:, None, None], out=tmp)  # 0 off the edge
        acc += tmp
    out = np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return np.moveaxis(out, 0, axis)


def resize_bilinear(img: np.ndarray, size: Sequence[int], *, box: Optional[Sequence[int]] = None
                    ) -> np.ndarray:
    """uint8 ``(H, W)`` / ``(H, W, C)`` resized to ``size = (h, w)`` with PIL's bilinear filter,
    in numpy (the same pixels as ``PIL.Image.resize(..., BILINEAR)``).

    ``box = (top, left, height, width)`` returns only that window of the resized image (the
    same pixels as resizing everything and cropping, without computing the rest)."""
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"resize_bilinear: expected uint8 (H, W) or (H, W, C), got {img.dtype} "
                         f"{_shape(img.shape)}")
    oh, ow = int(size[0]), int(size[1])
    top, left, ch, cw = (0, 0, oh, ow) if box is None else (int(b) for b in box)
    if oh < 1 or ow < 1 or top < 0 or left < 0 or top + ch > oh or left + cw > ow:
        raise ValueError(f"resize_bilinear: bad size {size} / box {box}")
    x = img[:, :, None] if img.ndim == 2 else img
    h, w = x.shape[:2]
    if oh != h:  # only the input rows the wanted output rows read
        ymin, ky = _bilinear_coeffs(h, oh, top, ch)
        r0, r1 = int(ymin.min()), min(h, int(ymin.max()) + ky.shape[1])
        x, ymin = x[r0:r1], ymin - r0
    else:
        x = x[top:top + ch]
    if ow != w:  # PIL: the horizontal pass first (then rounded to uint8), then the vertical one
        x = _resample_axis(x, 1, *_bilinear_coeffs(w, ow, left, cw))
    else:
        x = x[:, left:left + cw]
    if oh != h:
        x = _resample_axis(x, 0, ymin, ky)
    x = np.ascontiguousarray(x)
    return x[:, :, 0] if img.ndim == 2 else x


def fit_raw(x: np.ndarray, shape: Sequence[int], spec: Any) -> np.ndarray:
    """uint8 raw input (one image ``(h, w[, C])`` or a batch ``(N, h, w[, C])``) whose h x w is
    not the model's: each image through :func:`preprocess_image`. Anything else (model-sized,
    other dtypes or layouts) is returned unchanged for :func:`prepare_input` to check."""
    C, H, W = (int(s) for s in shape)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        return x
    if x.ndim == 2 and C == 1:
        single = True
    elif x.ndim == 3 and (x.shape[-1] == C or C == 1):
        single = x.shape[-1] == C and not (C == 1 and x.shape[1:] == (H, W))
    elif x.ndim == 4 and x.shape[-1] == C:
        single = False
    else:
        return x
    hw = x.shape[:2] if single else x.shape[1:3]
    if tuple(hw) == (H, W) or 0 in x.shape:
        return x
    if single:
        return preprocess_image(x, spec)
    return np.stack([preprocess_image(img, spec) for img in x])


def preprocess_image(img: np.ndarray, spec: Any) -> np.ndarray:
    """One uint8 ``(H, W)`` / ``(H, W, C)`` image -> ``(S, S[, C])`` as training prepared it:
    ``spec`` is the manifest's ``input.raw.preprocess`` (a ``PreprocessSpec`` or its dict).
    An image already ``S x S`` is returned as is (training leaves it alone too)."""
    d = _spec_dict(spec)
    size = int(d["size"])
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise UsageError(f"input: preprocess expects one uint8 image (H, W) or (H, W, C), got "
                         f"{img.dtype} {_shape(img.shape)}")
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return img
    if h < 1 or w < 1:
        raise UsageError(f"input: empty image {_shape(img.shape)}")
    nh, nw, top, left = shorter_side_geometry(h, w, size)
    return resize_bilinear(img, (nh, nw), box=(top, left, size, size))
