"""The calibration set a build ships beside its bundle: ``calib.npz``.

`pipeline build` writes ``<out>/<device>/calib.npz`` next to ``bundle/`` (and ``host/``): what a
device needs to recalibrate, run or benchmark the bundle without torch or the data set.
numpy only (``np.load(..., allow_pickle=False)`` reads it); written atomically.

Arrays (all optional but ``labels``; the rows are the first ones of the validation split, in
the split's order, so ``labels[:len(images)]`` are the images' labels):

=====================  =====================================================================
``images``             uint8 ``(M, H, W, C)`` validation images as the runtime takes them
                       (raw pixels, channels last), at most :data:`MAX_IMAGES` images and
                       :data:`MAX_IMAGE_BYTES` bytes
``labels``             int64 ``(N,)``, N >= M
``class_names``        str ``(num_classes,)``
``p_<skip config>``    float32 ``(S, N_p, num_classes)``: per-exit softmax of every skip
                       configuration computed by the build (N_p <= N rows, at most
                       :data:`MAX_PROB_BYTES` bytes in all)
``meta``               a JSON string: schema, model name, input shape, classes, stages, skip
                       configurations, the checkpoint sha256, data set, counts, where the
                       probabilities were computed, creation time
=====================  =====================================================================

Any ``.npz`` with ``images`` (uint8, ``(N, H, W[, C])``) and ``labels`` works as a user-made
calibration/benchmark set (``meta`` then is not checked).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from runtime.errors import FileError

__all__ = ["CALIB_NAME", "MAX_IMAGES", "MAX_IMAGE_BYTES", "MAX_PROB_BYTES", "SCHEMA",
           "CalibSetError", "CalibSet", "write_calib_set", "load_calib_set", "find_calib_set",
           "default_calib_candidates"]

CALIB_NAME = "calib.npz"
SCHEMA = 1
#: Caps of what a build ships: images (count and raw bytes) and probabilities (raw bytes).
MAX_IMAGES = 2000
MAX_IMAGE_BYTES = 32 * 2**20
MAX_PROB_BYTES = 32 * 2**20

PathLike = Union[str, "os.PathLike[str]"]


class CalibSetError(FileError):
    """A calibration set that cannot be read or does not belong to the bundle."""


def _fingerprint(manifest) -> dict[str, Any]:
    m = manifest
    return {"model": m.model.name, "num_classes": int(m.model.num_classes),
            "input_shape": [int(s) for s in m.input.shape], "stages": int(m.stages),
            "skip_configs": list(m.skip_configs), "class_names": list(m.class_names),
            "checkpoint_sha256": getattr(m.source, "checkpoint_sha256", None)}


def write_calib_set(path: PathLike, manifest, images: Optional[np.ndarray], labels: np.ndarray, *,
                    probabilities: Optional[Mapping[str, np.ndarray]] = None,
                    data: Optional[str] = None, split: str = "val",
                    probabilities_from: Optional[Mapping[str, Any]] = None,
                    max_images: int = MAX_IMAGES, max_image_bytes: int = MAX_IMAGE_BYTES,
                    max_prob_bytes: int = MAX_PROB_BYTES) -> dict[str, Any]:
    """Write ``path`` atomically (runtime.atomic) and return its ``meta``.

    ``images``: uint8 NHWC (or NHW) validation images, ``labels`` their labels (same order),
    ``probabilities``: ``{skip_config: (S, N, C)}`` as ``pipeline.evaluate.config_probabilities``
    returns them for the same rows. Images and probability rows are capped (the first ones)."""
    from runtime.atomic import atomic_writer
    from runtime.manifest import utc_now_iso

    labels = np.asarray(labels).astype(np.int64, copy=False)
    n = len(labels)
    arrays: dict[str, np.ndarray] = {}
    n_img = 0
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) != n:
            raise ValueError(f"calibration images: expected uint8 (N, H, W[, C]) with N = "
                             f"{n} labels, got {images.dtype} {tuple(images.shape)}")
        if images.ndim == 3:
            images = images[..., None]
        per = max(1, int(np.prod(images.shape[1:])))
        n_img = int(min(n, max_images, max_image_bytes // per))
        arrays["images"] = np.ascontiguousarray(images[:n_img])
    n_prob = 0
    if probabilities:
        row = sum(int(np.prod(p.shape)) // max(1, p.shape[1]) * 4 for p in probabilities.values())
        n_prob = int(min(n, max_prob_bytes // max(1, row)))
        for cfg, p in probabilities.items():
            if p.ndim != 3 or p.shape[1] != n:
                raise ValueError(f"probabilities of {cfg}: expected (S, {n}, C), got "
                                 f"{tuple(p.shape)}")
            arrays[f"p_{cfg}"] = np.ascontiguousarray(p[:, :n_prob].astype(np.float32))
    n_keep = max(n_img, n_prob)
    arrays["labels"] = labels[:n_keep]
    arrays["class_names"] = np.array([str(c) for c in manifest.class_names])
    meta = {"schema": SCHEMA, **_fingerprint(manifest), "data": data, "split": split,
            "n_labels": n_keep, "n_images": n_img, "n_probabilities": n_prob,
            "n_split": n, "caps": {"images": max_images, "image_bytes": max_image_bytes,
                                   "probability_bytes": max_prob_bytes},
            "probabilities_from": dict(probabilities_from or {}) or None,
            "created": utc_now_iso()}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with atomic_writer(path, "wb") as f:
        f.write(buf.getbuffer())
    return meta


@dataclass
class CalibSet:
    """A loaded calibration set (see the module docstring)."""
    path: Path
    labels: np.ndarray
    images: Optional[np.ndarray] = None
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    class_names: Optional[list[str]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def image_labels(self) -> np.ndarray:
        return self.labels[:0 if self.images is None else len(self.images)]

    @property
    def probability_labels(self) -> np.ndarray:
        n = next((p.shape[1] for p in self.probabilities.values()), 0)
        return self.labels[:n]

    def describe(self) -> str:
        what = []
        if self.images is not None:
            what.append(f"{len(self.images)} images")
        if self.probabilities:
            what.append(f"per-exit probabilities of {len(self.probabilities)} skip configs x "
                        f"{self.probability_labels.shape[0]} rows")
        data = self.meta.get("data")
        return f"{self.path} ({', '.join(what) or 'labels only'}" + (
            f"; {data} {self.meta.get('split', '')} split)".replace(" )", ")") if data else ")")


def load_calib_set(path: PathLike, manifest=None) -> CalibSet:
    """Read and check a calibration set; with ``manifest``, check it fits that bundle (input
    shape, classes; for a build's set also the model and checkpoint)."""
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
    except FileNotFoundError:
        raise CalibSetError(p, "no such file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise CalibSetError(p, f"not a readable .npz file ({' '.join(str(exc).split())})") \
            from None
    if not hasattr(z, "files"):
        raise CalibSetError(p, "a single .npy array, not an .npz with images and labels")
    try:
        with z:
            files = set(z.files)
            if "labels" not in files:
                raise CalibSetError(p, f"no 'labels' array (has: {', '.join(sorted(files))})")
            labels = z["labels"]
            meta: dict[str, Any] = {}
            if "meta" in files:
                try:
                    meta = json.loads(str(z["meta"]))
                except ValueError:
                    raise CalibSetError(p, "'meta' is not a JSON string") from None
                if not isinstance(meta, dict):
                    raise CalibSetError(p, "'meta' is not a JSON object")
            images = z["images"] if "images" in files else None
            probs = {k[2:]: z[k] for k in sorted(files) if k.startswith("p_")}
            names = [str(c) for c in z["class_names"]] if "class_names" in files else None
    except (OSError, ValueError, EOFError, KeyError) as exc:
        if isinstance(exc, CalibSetError):
            raise
        raise CalibSetError(p, f"corrupt .npz ({' '.join(str(exc).split())})") from None
    if meta.get("schema", SCHEMA) > SCHEMA:
        raise CalibSetError(p, f"schema {meta['schema']}: written by a newer version of the "
                               "tool: upgrade")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise CalibSetError(p, f"'labels' must be integers (N,), got {labels.dtype} "
                               f"{tuple(labels.shape)}")
    labels = labels.astype(np.int64, copy=False)
    if images is not None:
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise CalibSetError(p, f"'images' must be uint8 (N, H, W[, C]) pixels, got "
                                   f"{images.dtype} {tuple(images.shape)}")
        if images.ndim == 3:
            images = images[..., None]
        if len(images) > len(labels):
            raise CalibSetError(p, f"{len(images)} images but {len(labels)} labels")
    for cfg, pr in probs.items():
        if pr.ndim != 3 or pr.shape[1] > len(labels):
            raise CalibSetError(p, f"'p_{cfg}': expected (S, N, C) with N <= {len(labels)}, "
                                   f"got {tuple(pr.shape)}")
    if len({pr.shape for pr in probs.values()}) > 1:
        raise CalibSetError(p, "the p_<config> arrays differ in shape")
    cs = CalibSet(p, labels, images, probs, names, meta)
    if manifest is not None:
        check_fits(cs, manifest)
    return cs


def check_fits(cs: CalibSet, manifest) -> None:
    """CalibSetError unless ``cs`` fits the bundle of ``manifest``."""
    p, m = cs.path, manifest
    C, H, W = (int(s) for s in m.input.shape)
    K = int(m.model.num_classes)
    meta = cs.meta
    if meta:
        fp = _fingerprint(m)
        for key in ("model", "input_shape", "num_classes", "stages"):
            if key in meta and meta[key] != fp[key]:
                raise CalibSetError(p, f"made for another model ({key} {meta[key]!r}, the bundle "
                                       f"has {fp[key]!r}); pass the bundle's calibration set "
                                       "with --npz")
        a, b = meta.get("checkpoint_sha256"), fp["checkpoint_sha256"]
        if a and b and a != b:
            raise CalibSetError(p, f"made for checkpoint {a[:12]}..., the bundle was exported "
                                   f"from {b[:12]}...; pass the bundle's calibration set with "
                                   "--npz")
    if cs.images is not None and tuple(cs.images.shape[1:]) != (H, W, C):
        raise CalibSetError(p, f"images are {tuple(cs.images.shape[1:])} (H, W, C), the model "
                               f"takes {(H, W, C)}")
    if len(cs.labels) and (cs.labels.min() < 0 or cs.labels.max() >= K):
        raise CalibSetError(p, f"labels outside 0..{K - 1}")
    if cs.class_names is not None and len(cs.class_names) != K:
        raise CalibSetError(p, f"{len(cs.class_names)} class names, the model has {K} classes")
    for cfg, pr in cs.probabilities.items():
        if cfg not in m.skip_configs or pr.shape[0] != m.stages or pr.shape[2] != K:
            raise CalibSetError(p, f"'p_{cfg}' {tuple(pr.shape)} does not fit the bundle "
                                   f"({m.stages} exits, {K} classes, configs "
                                   f"{', '.join(m.skip_configs)})")


def default_calib_candidates(bundle_dir: PathLike) -> list[Path]:
    """Where a bundle's calibration set is looked for: ``<bundle>.calib.npz`` next to the
    bundle directory, then ``calib.npz`` next to it (what `pipeline build` writes)."""
    b = Path(bundle_dir).resolve()
    return [b.parent / f"{b.name}.{CALIB_NAME}", b.parent / CALIB_NAME]


def find_calib_set(bundle_dir: PathLike, given: Optional[PathLike] = None, manifest=None, *,
                   required: bool = True, what: str = "this command") -> Optional[CalibSet]:
    """The calibration set given (``--npz``) or found beside the bundle, checked against
    ``manifest``. ``required``: a one-line :class:`CalibSetError` when there is none."""
    if given is not None:
        return load_calib_set(given, manifest)
    cands = default_calib_candidates(bundle_dir)
    for c in cands:
        if c.is_file():
            return load_calib_set(c, manifest)
    if required:
        raise CalibSetError(bundle_dir, f"no calibration set for {what}: pass --npz FILE (the "
                                        f"build writes {CALIB_NAME} next to bundle/; looked for "
                                        f"{', '.join(str(c) for c in cands)})")
    return None
