"""Core dataset types and batch iteration.

``ImageDataset`` is one split (uint8 NCHW images + int64 labels), ``DatasetBundle`` the three
splits plus everything a model and a deployment need to know (normalisation, class names, shape,
default augmentation). ``iterate_batches`` walks a split in (optionally shuffled, optionally
DDP-sharded) batches of uint8 images; normalisation/augmentation happen afterwards on the batch.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.data
from torch import Tensor

from runtime.errors import PipelineError

from .augment import AugmentSpec


class DataError(PipelineError, ValueError):
    """A data set cannot be used: an unknown name or option, a corrupt or malformed file (IDX,
    CIFAR pickle, CSV, image). The message names the file. ``pipeline`` prints it as one
    ``Error:`` line. Also a ValueError, as the per-format errors it replaces were."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A dataset's files are missing; the message lists where we looked and how to get them.
    Also a FileNotFoundError."""


@dataclass(eq=False, repr=False)
class ImageDataset:
    """One split held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: Tensor | None
    labels: Tensor

    def __repr__(self) -> str:
        shape = tuple(self.images.shape) if self.images is not None else "lazy"
        return f"{type(self).__name__}(n={len(self)}, images={shape})"

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64)
        if self.images is not None:
            if self.images.dtype != torch.uint8 or self.images.dim() != 4:
                raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                                 f"{tuple(self.images.shape)}")
            if len(self.images) != len(self.labels):
                raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get_batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (B, C, H, W) and int64 labels (B,) for ``indices``."""
        assert self.images is not None
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return self.images.index_select(0, indices), self.labels.index_select(0, indices)

    def subset(self, indices: Tensor) -> ImageDataset:
        """A new split made of ``indices`` (copies the selected images)."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        assert self.images is not None
        return ImageDataset(self.images.index_select(0, indices), self.labels.index_select(0, indices))

    def sample_images(self, max_count: int = 4096) -> Tensor:
        """Up to ``max_count`` images (evenly spaced, deterministic), uint8 NCHW, for statistics."""
        n = len(self)
        idx = torch.arange(n) if n <= max_count else torch.linspace(0, n - 1, max_count).long()
        return self.get_batch(idx)[0]

    def decode_workers(self) -> int:
        """DataLoader worker processes worth using to produce this split's batches (0: in the
        calling process). In-memory splits: 0; image folders decide by their decoding cost."""
        return 0

    def all_images(self) -> Tensor:
        """Every image, uint8 NCHW (loads lazily-held datasets completely)."""
        return self.images if self.images is not None else self.get_batch(torch.arange(len(self)))[0]


@dataclass(eq=False)
class DatasetBundle:
    """Train/val/test splits and the dataset's metadata."""

    name: str
    train: ImageDataset
    val: ImageDataset
    test: ImageDataset
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int
    img_size: int
    augment: AugmentSpec
    val_fraction: float = 0.1
    split_seed: int = 0
    root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def info(self) -> dict[str, Any]:
        """JSON-able description (stored next to trained models and exports)."""
        return {
            "name": self.name,
            "class_names": list(self.class_names),
            "num_classes": self.num_classes,
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "in_chans": int(self.in_chans),
            "img_size": int(self.img_size),
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "val_fraction": float(self.val_fraction),
            "split_seed": int(self.split_seed),
            "augment": {"pad": int(self.augment.pad), "flip": bool(self.augment.flip)},
            "root": self.root,
            **self.extra,
        }


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 NCHW images, in [0, 1] pixel units (exact, via histograms)."""
    if images.numel() == 0:
        raise ValueError("cannot compute statistics of an empty split")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    xt = images.transpose(0, 1)
    hist = torch.stack([torch.bincount(xt[i].reshape(-1), minlength=256)
                        for i in range(images.shape[1])]).to(torch.float64)  # (C, 256)
    v = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(1)
    mean = (hist * v).sum(1) / count
    var = ((hist * (v - mean[:, None]) ** 2).sum(1) / count).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-3)  # a constant channel must not divide by zero
    return tuple(mean.tolist()), tuple(std.tolist())


def num_batches(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
    """Batches per epoch on one rank for ``n`` samples (matches ``iterate_batches``)."""
    if batch_size <= 0 or world_size <= 0:
        raise ValueError("batch_size and world_size must be positive")
    per_rank = n // world_size
    return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)


def epoch_indices(n: int, *, shuffle: bool, generator: torch.Generator | None = None,
                  rank: int = 0, world_size: int = 1) -> Tensor:
    """This rank's indices for one epoch.

    The (shuffled) permutation is cut to a multiple of ``world_size`` and rank ``r`` takes every
    ``world_size``-th entry from ``r``: disjoint, equal-length shards. Every rank must pass a
    generator in the same state (e.g. seeded with ``seed + epoch``) so the permutations agree.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if shuffle:
        if generator is None and world_size > 1:
            raise ValueError("shuffle with world_size > 1 needs a generator seeded alike on every rank")
        perm = torch.randperm(n, generator=generator)
    else:
        perm = torch.arange(n)
    usable = n - n % world_size
    return perm[rank:usable:world_size]


class _BatchList(torch.utils.data.Dataset):
    """Batch ``i`` of a fixed list of index tensors: what a DataLoader worker decodes."""

    def __init__(self, ds: ImageDataset, batches: list[Tensor]):
        self.ds, self.batches = ds, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.ds.get_batch(self.batches[i])


def iterate_batches(ds: ImageDataset, batch_size: int, *, shuffle: bool,
                    generator: torch.Generator | None = None, rank: int = 0, world_size: int = 1,
                    drop_last: bool = False, num_workers: int | None = None
                    ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (uint8 images NCHW, int64 labels) batches of ``ds`` for one epoch on this rank.

    With ``world_size == 1`` every index appears exactly once; with more ranks the last
    ``len(ds) % world_size`` entries of the permutation are left out so shards are equal.
    ``num_workers``: DataLoader worker processes that decode the batches (image folders), in
    order; None: ``ds.decode_workers()`` (0 for in-memory data and small image folders).
    The batches are the same either way.
    """
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    idx = epoch_indices(len(ds), shuffle=shuffle, generator=generator, rank=rank,
                        world_size=world_size)
    stop = len(idx) - len(idx) % batch_size if drop_last else len(idx)
    batches = [idx[i:i + batch_size] for i in range(0, stop, batch_size)]
    workers = ds.decode_workers() if num_workers is None else int(num_workers)
    if workers <= 0 or len(batches) <= 1:
        for b in batches:
            yield ds.get_batch(b)
        return
    loader = torch.utils.data.DataLoader(_BatchList(ds, batches), batch_size=None, shuffle=False,
                                         num_workers=min(workers, len(batches)), prefetch_factor=4)
    yield from loader

