"""Image folders (``root/<class>/*.png`` or ``root/{train,val,test}/<class>/*``), loaded lazily.

Images are decoded with PIL in ``get_batch``, converted to RGB or L, then prepared by the
runtime's own numpy code (:func:`runtime.preprocess.preprocess_image`): the shorter side resized
to ``img_size`` (PIL's bilinear filter, antialiased), the centre square cropped. Export records
that as the manifest's ``input.raw.preprocess`` (:func:`preprocess_record`), so the device
prepares a photo of any size exactly as training did.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from runtime.preprocess import preprocess_image

from .loader import DataError, DataNotFoundError, ImageDataset

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                  ".pgm", ".pbm")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
SPLIT_DIRS = ("train", "val", "test")
#: Pixels to decode per pass over a split above which batches are decoded in DataLoader
#: workers (about half a second of PIL decoding and resizing on one core).
DECODE_WORK_FOR_WORKERS = 50_000_000


@dataclass(eq=False, repr=False)
class ImageFolderDataset(ImageDataset):
    """A split whose images stay on disk (``images`` is None)."""

    paths: list[str]
    img_size: int
    mode: str  # "RGB" or "L"
    source_pixels: int = 0  # typical pixels per file (probed): what decoding costs

    def decode_workers(self) -> int:
        """Worker processes for decoding: none for small folders or small images (the suite's
        runs; starting workers costs more than it saves), else up to 4 (one core left free).
        ``ADAPTIVE_DEPTH_DATA_WORKERS`` overrides it."""
        env = os.environ.get("ADAPTIVE_DEPTH_DATA_WORKERS")
        if env is not None and env.strip():
            try:
                return max(0, int(env))
            except ValueError:
                raise DataError(f"ADAPTIVE_DEPTH_DATA_WORKERS={env!r}: expected an integer") from None
        if len(self) * max(self.source_pixels, self.img_size ** 2) < DECODE_WORK_FOR_WORKERS:
            return 0
        return max(0, min(4, (os.cpu_count() or 1) - 1))

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        c = 3 if self.mode == "RGB" else 1
        out = np.empty((len(indices), self.img_size, self.img_size, c), dtype=np.uint8)
        for j, i in enumerate(indices.tolist()):
            out[j] = load_image(self.paths[i], self.img_size, self.mode).reshape(out.shape[1:])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), self.labels[indices]

    def subset(self, indices: Tensor) -> ImageFolderDataset:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return ImageFolderDataset(None, self.labels[indices], [self.paths[i] for i in indices.tolist()],
                                  self.img_size, self.mode, self.source_pixels)


def preprocess_record(img_size: int) -> dict:
    """The preprocessing image folders get, as export records it (``input.raw.preprocess``)."""
    return {"resize": "shorter_side", "size": int(img_size), "crop": "center",
            "interpolation": "bilinear"}


def load_image(path: str, img_size: int, mode: str) -> np.ndarray:
    """Decode one image to uint8 (img_size, img_size[, 3]): PIL decodes and converts to
    ``mode``; :func:`runtime.preprocess.preprocess_image` resizes and crops (the runtime's
    code, so the device sees the same pixels)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    return preprocess_image(arr, preprocess_record(img_size))


def scan_class_folders(root: Path, class_names: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of ``root/<class>/**/<image>``, classes sorted by name."""
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if class_names is None:
        class_names = found
    elif unknown := sorted(set(found) - set(class_names)):
        raise DataError(f"{root}: class folders {unknown} are not in the train split")
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        cdir = root / name
        if not cdir.is_dir():
            continue
        for dirpath, dirnames, files in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    return paths, labels, class_names


def probe_images(paths: list[str], max_probe: int = 32) -> tuple[str, int]:
    """(mode "RGB"/"L", natural square size) from the headers of a few evenly spaced images."""
    mode, side, _pixels = probe_folder(paths, max_probe)
    return mode, side


def probe_folder(paths: list[str], max_probe: int = 32) -> tuple[str, int, int]:
    """(mode, natural square size, median pixels per image) from a few images' headers."""
    from PIL import Image

    picks = np.unique(np.linspace(0, len(paths) - 1, min(max_probe, len(paths))).astype(int))
    modes, sides, pixels = set(), Counter(), []
    for i in picks:
        with Image.open(paths[i]) as im:
            modes.add(im.mode)
            sides[min(im.size)] += 1
            pixels.append(im.size[0] * im.size[1])
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    return mode, sides.most_common(1)[0][0], int(np.median(pixels))


def find_split_dirs(root: Path) -> dict[str, Path]:
    """``{'train': ..., 'val': ..., 'test': ...}`` sub-folders present (empty for a flat layout)."""
    if not (root / "train").is_dir():
        return {}
    return {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}


def check_root(root: str | os.PathLike | None) -> Path:
    if root is None:
        raise DataNotFoundError("imagefolder: pass root=<folder> holding <class>/ sub-folders of "
                                "images (or train/ [val/] [test/] folders of them)")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataNotFoundError(f"imagefolder: folder not found.\nLooked in:\n  - {p}\nExpected "
                                f"{p}/<class>/<image> or {p}/train/<class>/<image> "
                                f"(optionally also val/ and test/).")
    return p
