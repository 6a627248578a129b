"""Datasets for training early-exit networks on CPU: loaders, splits, augmentation, batching.

Everything is held as uint8 NCHW tensors (image folders decode lazily); batches are normalised
and augmented as whole tensors (``normalize_batch``, ``augment_batch``).
"""
from .augment import AugmentSpec, augment_batch, normalize_batch
from .cifar import CIFARFormatError
from .idx import IDXFormatError, read_idx
from .imagefolder import ImageFolderDataset
from .loader import (DataError, DataNotFoundError, DatasetBundle, ImageDataset, channel_stats, epoch_indices,
                     iterate_batches, num_batches)
from .registry import DATASETS, FASHION_MNIST_CLASSES, load_dataset
from .splits import index_digest, stratified_split

__all__ = [
    "AugmentSpec", "augment_batch", "normalize_batch", "CIFARFormatError", "IDXFormatError",
    "read_idx", "ImageFolderDataset", "DataError", "DataNotFoundError", "DatasetBundle", "ImageDataset",
    "channel_stats", "epoch_indices", "iterate_batches", "num_batches", "DATASETS",
    "FASHION_MNIST_CLASSES", "load_dataset", "index_digest", "stratified_split",
]
