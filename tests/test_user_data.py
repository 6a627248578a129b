"""Your own data through every build stage: `pipeline build` on a small image folder (class
sub-folders of PNG and PGM files of several sizes, some non-square), made from Fashion-MNIST
(or scikit-learn's digits where Fashion-MNIST is not installed), in every documented form of
``--data``: ``--data /path``, ``--data imagefolder --data-root /path`` and a config file's
``[train] data = "/path"``. Then the bundle: it records the preprocessing, and the runtime, the
example app and ``pipeline predict`` prepare a photo of another size exactly as training did.

Single-threaded, 1 epoch of a few steps, quick profiling, a small --eval-limit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

PIL = pytest.importorskip("PIL.Image")

from pipeline.build import STAGES, run_build  # noqa: E402
from pipeline.build_config import build_config  # noqa: E402
from pipeline.cli import cli  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402

N_PER_CLASS = 40
CLASSES = 4
SIZE = 20  # the most common shorter side: the model's input size

CONFIG = """\
[build]
device = "host"
out = "{out}"
threads = 1
archive = false

[train]
model = "resnet20_adn"
data = "{data}"
epochs = 1
max_steps = 6
batch_size = 32
warmup_epochs = 0.1
threads = 1

[export]
parity_samples = 8

[profile]
mode = "quick"

[calibrate]
limit = 40

[evaluate]
limit = 40
measure_limit = 20
warmup = 2
batch_threads = 1
"""


def _source_images() -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 28, 28) gray images and labels: Fashion-MNIST, else digits (upscaled)."""
    try:
        from train.data import load_dataset
        ds = load_dataset("fashion-mnist")
        x, y = ds.train.images[:4000, 0].numpy(), ds.train.labels[:4000].numpy()
    except FileNotFoundError:
        sk = pytest.importorskip("sklearn.datasets")
        d = sk.load_digits()
        x = np.repeat(np.repeat((d.images * 255 / 16).astype(np.uint8), 3, 1), 3, 2)
        y = d.target
    return x, y


def _write_folder(root: Path) -> Path:
    """root/<class>/<i>.png|pgm: gray and RGB, sizes around SIZE, some non-square, some larger."""
    x, y = _source_images()
    rng = np.random.default_rng(0)
    shapes = [(SIZE, SIZE), (SIZE, SIZE + 9), (SIZE + 7, SIZE), (2 * SIZE + 3, 3 * SIZE),
              (SIZE, 2 * SIZE)]
    for c in range(CLASSES):
        d = root / f"class_{c}"
        d.mkdir(parents=True)
        for i, j in enumerate(np.flatnonzero(y == c)[:N_PER_CLASS]):
            h, w = shapes[i % len(shapes)]
            im = PIL.fromarray(x[j]).resize((w, h), PIL.BILINEAR)
            if i % 3 == 0:
                im.save(d / f"{i:03d}.pgm")
            elif i % 3 == 1:
                im.convert("RGB").save(d / f"{i:03d}.png")  # a colour file: the folder is RGB
            else:
                im.save(d / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("user_data") / "photos")


def _quiet(_msg: str) -> None:
    pass


def _check_build(result) -> Path:
    assert [s.status for s in result.stages] == ["built"] * len(STAGES)
    r = result.root
    m = Bundle.open(r / "bundle", verify=True).manifest
    assert m.input.shape == [3, SIZE, SIZE]  # some files are RGB: the folder is read as RGB
    assert m.input.raw.preprocess is not None
    assert m.input.raw.preprocess.to_dict() == {"resize": "shorter_side", "size": SIZE,
                                                "crop": "center", "interpolation": "bilinear"}
    assert m.class_names == [f"class_{c}" for c in range(CLASSES)]
    report = json.loads((r / "report.json").read_text())
    assert 0 < report["results"]["data"]["n"] <= 40  # --eval-limit (the carved test split: 32)
    assert 0.0 <= report["summary"]["adaptive_accuracy"] <= 1.0
    return r


def test_data_path_on_the_command_line(folder, tmp_path):
    """`pipeline build --data /path` (the form that stopped at calibrate)."""
    cfg = tmp_path / "b.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out", data="fashion-mnist"))
    res = CliRunner().invoke(cli, ["build", "--config", str(cfg), "--data", str(folder)])
    assert res.exit_code == 0, res.output
    r = _check_build_dir(tmp_path / "out")
    # the bundle prepares a photo of another size as training did: runtime, predict, app
    _check_deployed_preprocessing(r / "bundle", folder, tmp_path)


def _check_build_dir(out: Path) -> Path:
    (r,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    m = Bundle.open(r / "bundle", verify=True).manifest
    assert m.input.raw.preprocess is not None and m.input.raw.preprocess.size == SIZE
    assert m.input.shape == [3, SIZE, SIZE]
    report = json.loads((r / "report.json").read_text())
    assert 0 < report["results"]["data"]["n"] <= 40  # --eval-limit (the carved test split: 32)
    return r


def test_imagefolder_with_data_root(folder, tmp_path):
    """`--data imagefolder --data-root /path` (through run_build, as the CLI calls it)."""
    cfg = tmp_path / "b.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out", data="imagefolder"))
    _check_build(run_build(build_config(cfg, {"train.data_root": str(folder)}), log=_quiet))


def test_data_path_in_the_config_file(folder, tmp_path):
    """`[train] data = "/path"`."""
    cfg = tmp_path / "b.toml"
    cfg.write_text(CONFIG.format(out=tmp_path / "out", data=folder))
    _check_build(run_build(build_config(cfg), log=_quiet))


def _check_deployed_preprocessing(bundle: Path, folder: Path, tmp: Path) -> None:
    import importlib.util

    from runtime import AdaptiveModel
    from runtime.images import load_image
    from train.data.imagefolder import load_image as train_load

    spec = importlib.util.spec_from_file_location(
        "classify_folder_app", Path(__file__).resolve().parents[1] / "examples" / "classify_folder" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    model = AdaptiveModel.load(bundle, warn=False)
    pre = model.manifest.input.raw.preprocess
    photo = next(p for p in sorted(folder.rglob("*.png")) if PIL.open(p).size == (3 * SIZE, 2 * SIZE + 3))
    seen_in_training = train_load(str(photo), SIZE, "RGB")
    on_device = load_image(photo, model.input_shape, preprocess=pre)
    assert np.array_equal(seen_in_training, on_device)
    # predict: the file, and the raw pixels of another size, give the training-sized result
    p_file = model.predict(on_device, rule="full")
    raw = np.asarray(PIL.open(photo).convert("RGB"))
    assert raw.shape[:2] != (SIZE, SIZE)
    from runtime.preprocess import prepare_input
    x, _ = prepare_input(raw, model.input_shape, model.manifest.input.mean, model.manifest.input.std,
                         preprocess=pre)
    x0, _ = prepare_input(on_device, model.input_shape, model.manifest.input.mean,
                          model.manifest.input.std)
    assert np.array_equal(x, x0)
    # AdaptiveModel.predict takes the raw photo too (the bundle's record), same answer
    p_raw = model.predict(raw, rule="full")
    assert p_raw.class_id == p_file.class_id
    np.testing.assert_array_equal(p_raw.probabilities, p_file.probabilities)
    # pipeline predict (no --resize needed: the bundle says how) and the example app
    res = CliRunner().invoke(cli, ["predict", "--bundle", str(bundle), str(photo), "--rule", "full",
                                   "--json", "--threads", "1"])
    assert res.exit_code == 0, res.output
    (out,) = json.loads(res.output[res.output.index("["):])
    assert out["class_id"] == p_file.class_id
    assert np.array_equal(app.read_image(photo, 3, (SIZE, SIZE), False, pre), on_device)
