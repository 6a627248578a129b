"""One preprocessing for image folders, in training and on the device.

Training (``train.data.imagefolder``) decodes with PIL and prepares every image with the
runtime's numpy code (``runtime.preprocess.preprocess_image``: shorter side to S, PIL's bilinear
filter, centre crop); export records it as ``input.raw.preprocess``; the runtime's readers,
``prepare_input``, ``pipeline predict`` and the example app apply it to images of other sizes.
Checked here: the training pipeline's pixels and the runtime's agree bit for bit (PNG, PGM, JPEG,
gray and colour, non-square, up and down); the numpy resize is within 1 gray level of PIL's own
``Image.resize(BILINEAR)`` (identical on one axis); the manifest validates the record.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from runtime.errors import ManifestError
from runtime.images import load_image, resize_image
from runtime.manifest import Manifest, PreprocessSpec
from runtime.preprocess import (fit_raw, prepare_input, preprocess_image, resize_bilinear,
                                shorter_side_geometry)

Image = pytest.importorskip("PIL.Image")

SPEC = {"resize": "shorter_side", "size": 24, "crop": "center", "interpolation": "bilinear"}


def _photo(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    """A smooth image with some noise and edges (what resizing differences show up on)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 80 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 20, (h, w))
    base[h // 3:h // 2, :] = 250
    img = np.clip(base, 0, 255).astype(np.uint8)
    if c == 1:
        return img
    return np.stack([img, np.roll(img, 3, 1), 255 - img], axis=-1)


def _pil_reference(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    nh, nw, top, left = shorter_side_geometry(h, w, size)
    if (h, w) == (size, size):
        return img
    im = Image.fromarray(img).resize((nw, nh), Image.BILINEAR)
    return np.asarray(im.crop((left, top, left + size, top + size)))


# ---------------------------------------------------------------------------------------------
# training pipeline vs runtime: the same file, the same pixels
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_training_and_runtime_see_the_same_pixels(tmp_path, mode):
    from train.data import load_dataset

    shapes = [(24, 24), (24, 37), (61, 24), (90, 130), (13, 17), (300, 200), (24, 25)]
    files = []
    for c, ext in enumerate([".png", ".pgm" if mode == "L" else ".ppm", ".jpg"]):
        d = tmp_path / f"c{c}"
        d.mkdir()
        for i, (h, w) in enumerate(shapes):
            img = _photo(h, w, 3, seed=10 * c + i)
            p = d / f"{i}{ext}"
            Image.fromarray(img).convert(mode).save(p)
            files.append(p)
    ds = load_dataset(str(tmp_path), val_fraction=0.0, img_size=24)
    assert ds.info()["preprocess"] == SPEC
    split = ds.train
    import torch
    imgs, _ = split.get_batch(torch.arange(len(split)))
    assert ds.in_chans == (1 if mode == "L" else 3)
    shape = (ds.in_chans, 24, 24)
    checked = 0
    for k, path in enumerate(split.paths):
        trained = imgs[k].permute(1, 2, 0).numpy()
        on_device = load_image(path, shape, preprocess=PreprocessSpec(size=24))
        on_device = on_device if on_device.ndim == 3 else on_device[..., None]
        assert np.array_equal(trained, on_device), path  # bit for bit
        checked += 1
    assert checked == len(split) > 0


def test_training_transform_equals_runtime_on_every_size():
    """Through the functions themselves: the decode of training vs the runtime, many sizes."""
    import tempfile
    from pathlib import Path

    from train.data.imagefolder import load_image as train_load

    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as d:
        for i in range(40):
            h, w = (int(v) for v in rng.integers(5, 160, 2))
            c = 1 if i % 2 else 3
            p = Path(d) / f"{i}.png"
            Image.fromarray(_photo(h, w, c, seed=i)).save(p)
            mode = "L" if c == 1 else "RGB"
            a = train_load(str(p), 24, mode)
            b = load_image(p, (c, 24, 24), preprocess=SPEC)
            assert np.array_equal(a, b), (h, w, c)
            if c == 3:  # a colour file for a gray model: PIL's convert("L") vs the runtime's luma
                assert np.array_equal(train_load(str(p), 24, "L"),
                                      load_image(p, (1, 24, 24), preprocess=SPEC)), (h, w)


# ---------------------------------------------------------------------------------------------
# the numpy resize vs PIL's
# ---------------------------------------------------------------------------------------------

def test_numpy_bilinear_within_one_gray_level_of_pil():
    rng = np.random.default_rng(0)
    worst, differing, total = 0, 0, 0
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 200, 2))
        oh, ow = (int(v) for v in rng.integers(1, 120, 2))
        img = _photo(h, w, 3, seed=int(rng.integers(1 << 30)))
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BILINEAR)).astype(int)
        d = np.abs(ref - resize_bilinear(img, (oh, ow)))
        worst, differing, total = max(worst, int(d.max())), differing + int((d > 0).sum()), total + d.size
    assert worst <= 1
    assert differing / total < 0.15


@pytest.mark.parametrize("axis", [0, 1])
def test_numpy_bilinear_one_axis_is_pil_exactly(axis):
    rng = np.random.default_rng(axis)
    for _ in range(100):
        h, w = (int(v) for v in rng.integers(1, 300, 2))
        n = int(rng.integers(1, 200))
        oh, ow = (n, w) if axis == 0 else (h, n)
        img = _photo(h, w, 1, seed=int(rng.integers(1 << 30)))
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BILINEAR))
        assert np.array_equal(ref, resize_bilinear(img, (oh, ow)))


def test_preprocess_matches_pil_resize_then_crop():
    for (h, w) in [(480, 640), (640, 480), (24, 24), (10, 50), (1000, 24), (23, 24)]:
        img = _photo(h, w, 3)
        out = preprocess_image(img, SPEC)
        assert out.shape == (24, 24, 3)
        assert np.abs(out.astype(int) - _pil_reference(img, 24)).max() <= 1


def test_box_equals_full_resize_then_crop():
    img = _photo(77, 130, 3)
    full = resize_bilinear(img, (31, 52))
    assert np.array_equal(resize_bilinear(img, (31, 52), box=(3, 10, 20, 24)), full[3:23, 10:34])


def test_geometry():
    assert shorter_side_geometry(480, 640, 224) == (224, 299, 0, 37)
    assert shorter_side_geometry(640, 480, 224) == (299, 224, 37, 0)
    assert shorter_side_geometry(24, 24, 24) == (24, 24, 0, 0)


def test_resize_image_needs_no_pil_and_is_bilinear():
    img = _photo(40, 60, 1)
    out = resize_image(img, (20, 30))
    assert np.array_equal(out, resize_bilinear(img, (20, 30)))
    assert resize_image(img, (20, 30), method="nearest").shape == (20, 30)


# ---------------------------------------------------------------------------------------------
# prepare_input / fit_raw
# ---------------------------------------------------------------------------------------------

def test_prepare_input_applies_the_record_to_other_sizes_only():
    mean, std = [0.5] * 3, [0.25] * 3
    photo = _photo(50, 80, 3)
    x, batched = prepare_input(photo, (3, 24, 24), mean, std, preprocess=SPEC)
    x0, _ = prepare_input(preprocess_image(photo, SPEC), (3, 24, 24), mean, std)
    assert not batched and np.array_equal(x, x0)
    xb, batched = prepare_input(np.stack([photo, photo]), (3, 24, 24), mean, std, preprocess=SPEC)
    assert batched and xb.shape == (2, 3, 24, 24) and np.array_equal(xb[1:], x0)
    sized = _photo(24, 24, 3)
    assert fit_raw(sized, (3, 24, 24), SPEC) is sized  # model-sized: untouched, no copy
    gray = _photo(30, 24, 1)
    assert fit_raw(gray, (1, 24, 24), SPEC).shape == (24, 24)
    assert fit_raw(np.stack([gray] * 3), (1, 24, 24), SPEC).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="wrong image size"):  # no record: still refused
        prepare_input(photo, (3, 24, 24), mean, std)
    with pytest.raises(ValueError, match="preprocess: crop"):
        preprocess_image(photo, {**SPEC, "crop": "top"})


# ---------------------------------------------------------------------------------------------
# the manifest record
# ---------------------------------------------------------------------------------------------

def _manifest_dict() -> dict:
    from test_manifest import valid_dict

    d = valid_dict()
    d["input"]["raw"]["preprocess"] = {**SPEC, "size": 8}
    return d


def test_manifest_records_and_validates_preprocess():
    d = _manifest_dict()
    m = Manifest.from_dict(d)
    assert m.input.raw.preprocess == PreprocessSpec(size=8)
    assert m.to_dict() == d
    plain = copy.deepcopy(d)
    del plain["input"]["raw"]["preprocess"]
    m0 = Manifest.from_dict(plain)
    assert m0.input.raw.preprocess is None and "preprocess" not in m0.to_dict()["input"]["raw"]
    for key, value, expected in [
            ("resize", "stretch", "input.raw.preprocess.resize"),
            ("crop", "random", "input.raw.preprocess.crop"),
            ("interpolation", "nearest", "input.raw.preprocess.interpolation"),
            ("size", 0, "input.raw.preprocess.size"),
            ("size", 9, "input.raw.preprocess.size: 9 makes 9x9 images"),
            ("extra", 1, "input.raw.preprocess")]:
        bad = copy.deepcopy(d)
        bad["input"]["raw"]["preprocess"][key] = value
        with pytest.raises(ManifestError, match=expected.replace(".", r"\.")):
            Manifest.from_dict(bad)
    bad = copy.deepcopy(d)
    del bad["input"]["raw"]["preprocess"]["crop"]
    with pytest.raises(ManifestError, match="crop"):
        Manifest.from_dict(bad)


def test_export_records_the_folder_preprocessing():
    from export.portable import preprocess_record, raw_input_spec

    assert preprocess_record({"name": "imagefolder", "img_size": 32}) == {**SPEC, "size": 32}
    assert preprocess_record({"name": "fashion-mnist", "img_size": 28}) is None
    assert preprocess_record({"name": "imagefolder", "preprocess": SPEC}) == SPEC
    raw = raw_input_spec(SPEC, (3, 24, 24))
    assert raw.preprocess == PreprocessSpec(size=24) and "shorter side" in raw.note
    assert raw_input_spec(None, (3, 24, 24)).preprocess is None
    with pytest.raises(ValueError):
        raw_input_spec(SPEC, (3, 32, 32))
