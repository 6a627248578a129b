"""Tests for train.data: loaders, splits, augmentation, batching (fast, < 30 s)."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import (AugmentSpec, CIFARFormatError, DataNotFoundError, IDXFormatError,
                        ImageDataset, augment_batch, index_digest, iterate_batches, load_dataset,
                        normalize_batch, num_batches, read_idx, stratified_split)
from train.data.registry import FASHION_MNIST_CLASSES

FMNIST = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- helpers

def write_idx(path: Path, arr: np.ndarray, gz: bool = False, magic: bytes | None = None) -> Path:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = (magic or bytes([0, 0, 0x08, arr.ndim])) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_mnist_dir(root: Path, n_train: int = 60, n_test: int = 20, size: int = 6, gz: bool = False,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    xtr = rng.integers(0, 256, (n_train, size, size), dtype=np.uint8)
    ytr = np.arange(n_train, dtype=np.uint8) % 10
    write_idx(root / "train-images-idx3-ubyte", xtr, gz)
    write_idx(root / "train-labels-idx1-ubyte", ytr, gz)
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, size, size), dtype=np.uint8), gz)
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test, dtype=np.uint8) % 10, gz)
    return xtr, ytr


def write_fake_cifar10(parent: Path, n: int = 20) -> Path:
    """A cifar-10-batches-py folder in the official format (python-2 style bytes keys)."""
    d = parent / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, f in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        obj = {b"batch_label": f"batch {i}".encode(), b"labels": [int(v) for v in np.arange(n) % 10],
               b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
               b"filenames": [f"img{j}.png".encode() for j in range(n)]}
        (d / f).write_bytes(pickle.dumps(obj, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    (d / "batches.meta").write_bytes(pickle.dumps(
        {b"label_names": names, b"num_cases_per_batch": n, b"num_vis": 3072}, protocol=2))
    return d


# ---------------------------------------------------------------- real Fashion-MNIST

@pytest.fixture(scope="module")
def fmnist():
    if not (FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST not installed (sudo apt-get install dataset-fashion-mnist)")
    return load_dataset("fashion-mnist")


def test_fashion_mnist_real(fmnist):
    b = fmnist
    assert (len(b.train), len(b.val), len(b.test)) == (54000, 6000, 10000)
    assert b.class_names == FASHION_MNIST_CLASSES and b.class_names[0] == "T-shirt/top"
    assert b.in_chans == 1 and b.img_size == 28
    assert b.train.images.dtype == torch.uint8 and b.train.images.shape == (54000, 1, 28, 28)
    assert b.train.labels.dtype == torch.int64
    assert abs(b.mean[0] - 0.286) < 0.01 and abs(b.std[0] - 0.353) < 0.01
    assert torch.bincount(b.val.labels).tolist() == [600] * 10  # stratified
    assert b.augment == AugmentSpec(pad=0, flip=True)  # flip only: the short CPU recipe underfits with crops
    info = json.loads(json.dumps(b.info()))
    assert info["sizes"] == {"train": 54000, "val": 6000, "test": 10000}
    assert info["val_fraction"] == 0.1 and info["split_seed"] == 0
    # golden digest: the calibration split must never move between versions/platforms
    assert info["val_digest"] == "8782dcc31724e96b"


def test_fashion_mnist_batches_and_augment(fmnist):
    x, y = fmnist.train.get_batch(torch.arange(256))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.uint8 and y.shape == (256,)
    a = augment_batch(x, fmnist.augment, torch.Generator().manual_seed(0))
    z = normalize_batch(a, fmnist.mean, fmnist.std)
    assert z.dtype == torch.float32 and abs(float(z.mean())) < 0.5


# ---------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [False, True])
def test_idx_raw_and_gz(tmp_path, gz):
    xtr, ytr = write_mnist_dir(tmp_path, gz=gz)
    b = load_dataset("mnist", tmp_path, val_fraction=0.2)
    assert (len(b.train), len(b.val), len(b.test)) == (48, 12, 20)
    assert b.class_names == [str(i) for i in range(10)] and b.img_size == 6
    all_x = torch.cat([b.train.images, b.val.images])
    assert sorted(map(bytes, all_x.numpy().reshape(60, -1))) == sorted(map(bytes, xtr.reshape(60, -1)))
    assert read_idx(next(tmp_path.glob("train-labels*"))).tolist() == ytr.tolist()


def test_idx_torchvision_layout_and_resize(tmp_path):
    write_mnist_dir(tmp_path / "MNIST" / "raw")
    b = load_dataset("mnist", tmp_path, img_size=12)
    assert b.train.images.shape[1:] == (1, 12, 12) and b.test.images.shape[1:] == (1, 12, 12)


def test_idx_bad_magic_names_file(tmp_path):
    write_mnist_dir(tmp_path)
    bad = write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 6, 6)), magic=b"\x12\x34\x08\x03")
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte") as e:
        load_dataset("mnist", tmp_path)
    assert "magic" in str(e.value) and str(bad) in str(e.value)


def test_idx_truncated_and_wrong_ndim(tmp_path):
    p = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((4, 6, 6)))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(IDXFormatError, match="x-idx3-ubyte"):
        read_idx(p)
    q = write_idx(tmp_path / "y-idx1-ubyte", np.zeros(4))
    with pytest.raises(IDXFormatError, match="y-idx1-ubyte"):
        read_idx(q, expect_ndim=3)


def test_missing_dir_raises_data_not_found(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("fashion-mnist", str(missing))
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert str(missing) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "github.com/zalandoresearch/fashion-mnist" in msg
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", str(missing))
    with pytest.raises(DataNotFoundError, match="nowhere"):
        load_dataset("imagefolder", str(missing))


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet-42")


# ---------------------------------------------------------------- splits

def test_split_reproducible_disjoint_stratified():
    labels = torch.arange(1000) % 7
    tr, va = stratified_split(labels, 0.15, seed=3)
    tr2, va2 = stratified_split(labels, 0.15, seed=3)
    _, va3 = stratified_split(labels, 0.15, seed=4)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, va3)
    assert len(va) == 150 and len(tr) + len(va) == 1000
    assert len(set(tr.tolist()) & set(va.tolist())) == 0
    assert sorted(tr.tolist() + va.tolist()) == list(range(1000))
    counts = torch.bincount(labels[va])
    assert int(counts.max() - counts.min()) <= 1
    assert index_digest(va) == index_digest(va.flip(0))


def test_split_through_load_dataset(tmp_path):
    write_mnist_dir(tmp_path, n_train=100)
    a = load_dataset("mnist", tmp_path, split_seed=1)
    b = load_dataset("mnist", tmp_path, split_seed=1)
    c = load_dataset("mnist", tmp_path, split_seed=2)
    assert torch.equal(a.val.images, b.val.images) and a.info()["val_digest"] == b.info()["val_digest"]
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)  # test = official files, seed-independent
    tr = {bytes(r) for r in a.train.images.numpy().reshape(len(a.train), -1)}
    va = {bytes(r) for r in a.val.images.numpy().reshape(len(a.val), -1)}
    assert not tr & va


# ---------------------------------------------------------------- CIFAR

def test_cifar10_pickle_folder(tmp_path):
    d = write_fake_cifar10(tmp_path)
    for root in (tmp_path, d):  # the folder or its parent
        b = load_dataset("cifar10", str(root))
        assert (len(b.train), len(b.val), len(b.test)) == (90, 10, 20)
        assert b.class_names[:2] == ["airplane", "automobile"] and b.in_chans == 3
        assert b.train.images.shape[1:] == (3, 32, 32) and b.augment == AugmentSpec(4, True)
    raw = pickle.loads((d / "test_batch").read_bytes(), encoding="bytes")[b"data"]
    assert np.array_equal(b.test.images[0, 0].numpy().ravel(), raw[0, :1024])  # R plane first


def test_cifar_refuses_code_in_pickle(tmp_path):
    d = write_fake_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(CIFARFormatError, match="test_batch"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar100_pickle_folder(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for f, n in (("train", 50), ("test", 10)):
        (d / f).write_bytes(pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                          b"fine_labels": [i % 5 for i in range(n)],
                                          b"coarse_labels": [0] * n}, protocol=2))
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": [b"apple", b"bee", b"cat", b"dog", b"egg"],
                                           b"coarse_label_names": [b"x"]}, protocol=2))
    b = load_dataset("cifar100", str(tmp_path))
    assert b.class_names == ["apple", "bee", "cat", "dog", "egg"]
    assert (len(b.train), len(b.val), len(b.test)) == (45, 5, 10)


# ---------------------------------------------------------------- image folders

def _save_images(d: Path, n: int, mode: str, size: tuple[int, int], seed: int) -> None:
    from PIL import Image
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(d / f"{i}.png")


def test_imagefolder_flat(tmp_path):
    for k, cls in enumerate(["dog", "cat", "bird"]):
        _save_images(tmp_path / cls, 10, "RGB", (14, 10), seed=k)
    b = load_dataset(str(tmp_path), img_size=8)  # a path works as the name
    assert b.class_names == ["bird", "cat", "dog"] and b.in_chans == 3 and b.img_size == 8
    assert b.train.images is None
    assert len(b.train) + len(b.val) + len(b.test) == 30 and len(b.test) == 6
    x, y = b.train.get_batch(torch.arange(len(b.train)))
    assert x.shape == (len(b.train), 3, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert b.info()["test_source"] == "carved"
    xs, ys = next(iterate_batches(b.val, 4, shuffle=False))
    assert xs.shape[1:] == (3, 8, 8)


def test_imagefolder_split_dirs_gray(tmp_path):
    for cls in ("a", "b"):
        _save_images(tmp_path / "train" / cls, 10, "L", (12, 12), seed=1)
        _save_images(tmp_path / "test" / cls, 3, "L", (12, 12), seed=2)
    b = load_dataset("imagefolder", str(tmp_path), val_fraction=0.2)
    assert b.in_chans == 1 and b.img_size == 12
    assert (len(b.train), len(b.val), len(b.test)) == (16, 4, 6)
    assert b.info()["test_source"] == "folder" and b.info()["val_source"] == "carved"
    assert b.test.get_batch(torch.tensor([0, 5]))[0].shape == (2, 1, 12, 12)


def test_imagefolder_records_its_preprocessing(tmp_path):
    for k, cls in enumerate(["a", "b"]):
        _save_images(tmp_path / cls, 6, "RGB", (30, 20), seed=k)
    b = load_dataset(str(tmp_path), img_size=16)
    assert b.info()["preprocess"] == {"resize": "shorter_side", "size": 16, "crop": "center",
                                      "interpolation": "bilinear"}
    assert "preprocess" not in load_dataset("digits").info()  # model-sized images: no record


def test_imagefolder_batches_decode_in_workers_alike(tmp_path, monkeypatch):
    for k, cls in enumerate(["a", "b", "c"]):
        _save_images(tmp_path / cls, 12, "L", (17, 23), seed=k)
    b = load_dataset(str(tmp_path), img_size=12, val_fraction=0.0)
    ds = b.train
    assert ds.decode_workers() == 0  # a small folder: decoded in this process (fast runs)
    assert ds.source_pixels == 17 * 23 and ds.subset(torch.arange(3)).source_pixels == 17 * 23
    serial = list(iterate_batches(ds, 5, shuffle=True, generator=torch.Generator().manual_seed(3)))
    pooled = list(iterate_batches(ds, 5, shuffle=True, generator=torch.Generator().manual_seed(3),
                                  num_workers=2))
    assert len(serial) == len(pooled) == 6
    for (x0, y0), (x1, y1) in zip(serial, pooled):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    big = ds.subset(torch.arange(len(ds)))
    big.source_pixels = 4000 * 3000  # 12 MP photos: decoding is the bottleneck
    assert big.decode_workers() == max(0, min(4, (os.cpu_count() or 1) - 1))
    monkeypatch.setenv("ADAPTIVE_DEPTH_DATA_WORKERS", "0")
    assert big.decode_workers() == 0
    assert ds.decode_workers() == 0 and load_dataset("digits").train.decode_workers() == 0


# ---------------------------------------------------------------- augmentation

def test_augment_shape_dtype_determinism():
    x = torch.randint(0, 256, (64, 3, 10, 10), dtype=torch.uint8)
    spec = AugmentSpec(pad=2, flip=True)
    a = augment_batch(x, spec, torch.Generator().manual_seed(5))
    b = augment_batch(x, spec, torch.Generator().manual_seed(5))
    c = augment_batch(x, spec, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    f = augment_batch(x.float(), spec, torch.Generator().manual_seed(5))
    assert f.dtype == torch.float32 and torch.equal(f, a.float())
    assert augment_batch(x, AugmentSpec(), torch.Generator()) is x


def test_flip_actually_flips():
    x = torch.arange(32 * 5 * 7, dtype=torch.float32).reshape(32, 1, 5, 7)
    a = augment_batch(x, AugmentSpec(flip=True), torch.Generator().manual_seed(0))
    same = (a == x).flatten(1).all(1)
    flipped = (a == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and same.any() and flipped.any()


def test_crop_offsets_vary_per_sample():
    n, h, w, p = 64, 8, 8, 3
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x = (1 + yy * w + xx).to(torch.uint8).expand(n, 1, h, w).contiguous()  # unique, non-zero
    a = augment_batch(x, AugmentSpec(pad=p), torch.Generator().manual_seed(1))
    offsets = set()
    for i in range(n):
        nz = a[i, 0].nonzero()
        r, c = int(nz[:, 0].min()), int(nz[:, 1].min())
        v = int(a[i, 0, r, c]) - 1  # original pixel now at (r, c)
        dy, dx = r - v // w, c - v % w
        assert -p <= dy <= p and -p <= dx <= p
        # the kept window matches a shifted copy of the original, zeros elsewhere
        shifted = torch.zeros(h + 2 * p, w + 2 * p, dtype=torch.uint8)
        shifted[p + dy:p + dy + h, p + dx:p + dx + w] = x[i, 0]
        assert torch.equal(a[i, 0], shifted[p:p + h, p:p + w])
        offsets.add((dy, dx))
    assert len(offsets) > 10


def test_normalize_batch():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    z = normalize_batch(x, mean, std)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert z.dtype == torch.float32 and torch.allclose(z, ref, atol=1e-5)
    zc = normalize_batch(x, mean, std, channels_last=True)
    assert zc.is_contiguous(memory_format=torch.channels_last) and torch.allclose(zc, ref, atol=1e-5)
    xf = x.float()
    normalize_batch(xf, mean, std)
    assert torch.equal(xf, x.float())  # input untouched


# ---------------------------------------------------------------- batching

def _toy(n: int) -> ImageDataset:
    return ImageDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).clone(), torch.arange(n))


@pytest.mark.parametrize("shuffle", [False, True])
def test_iterate_covers_each_index_once(shuffle):
    ds = _toy(103)
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_batches(ds, 10, shuffle=shuffle, generator=g))
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103))
    assert len(batches) == num_batches(103, 10) == 11
    assert all(x.dtype == torch.uint8 and torch.equal(x.view(-1).long(), y) for x, y in batches)
    dl = list(iterate_batches(ds, 10, shuffle=shuffle, generator=g, drop_last=True))
    assert len(dl) == num_batches(103, 10, drop_last=True) == 10 and all(len(y) == 10 for _, y in dl)


def test_iterate_ddp_disjoint_shards():
    ds = _toy(101)
    shards = []
    for rank in range(2):
        g = torch.Generator().manual_seed(7)  # same seed on every rank
        ys = [y for _, y in iterate_batches(ds, 8, shuffle=True, generator=g, rank=rank, world_size=2)]
        assert len(ys) == num_batches(101, 8, world_size=2)
        shards.append(torch.cat(ys).tolist())
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0]) & set(shards[1])
    with pytest.raises(ValueError):
        next(iterate_batches(ds, 8, shuffle=True, rank=0, world_size=2))


# ---------------------------------------------------------------- builtin + synthetic

def test_mnist5k_and_digits():
    m = load_dataset("mnist5k")
    assert len(m.train) + len(m.val) + len(m.test) == 5000 and m.img_size == 28
    assert m.class_names == [str(i) for i in range(10)] and m.train.images.dtype == torch.uint8
    assert int(m.train.images.max()) > 200
    d = load_dataset("digits", val_fraction=0.2)
    assert len(d.train) + len(d.val) + len(d.test) == 1797 and d.train.images.shape[1:] == (1, 8, 8)
    assert int(d.train.images.max()) == 255 and 0.1 < d.mean[0] < 0.5
    d2 = load_dataset("digits", val_fraction=0.2, split_seed=1)
    assert torch.equal(d.test.labels, d2.test.labels)  # carved test split ignores split_seed
    assert not torch.equal(d.val.labels, d2.val.labels) or not torch.equal(d.val.images, d2.val.images)


def test_synthetic_learnable_and_configurable():
    b = load_dataset("synthetic:classes=4,chans=3,seed=1", img_size=16, synthetic_size=200)
    assert b.in_chans == 3 and b.img_size == 16 and b.num_classes == 4
    assert len(b.train) + len(b.val) == 200
    xtr, ytr = b.train.images.float().flatten(1), b.train.labels
    cent = torch.stack([xtr[ytr == k].mean(0) for k in range(4)])
    pred = torch.cdist(b.test.images.float().flatten(1), cent).argmin(1)
    assert (pred == b.test.labels).float().mean() > 0.9
    again = load_dataset("synthetic:classes=4,chans=3,seed=1", img_size=16, synthetic_size=200)
    assert torch.equal(again.train.images, b.train.images)
