"""examples/classify_folder/app.py: classify real Fashion-MNIST test images written as PNG files,
in a fresh interpreter that must never import torch (nor train/, export/, pipeline/).

The bundle: ``$CLASSIFY_FOLDER_BUNDLE`` when set (e.g. ``build/x86-host/bundle``), else a small
one built here: resnet20_adn (untrained: the test is about the app, not the accuracy) exported
with Fashion-MNIST validation images as parity inputs and compiled for this machine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "classify_folder" / "app.py"
FASHION_MNIST = Path(os.environ.get("DATASETS_ROOT", "/usr/share/datasets")) / "fashion-mnist"
N_IMAGES = 6

pytestmark = pytest.mark.skipif(not FASHION_MNIST.is_dir() and not Path(
    "/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST is not installed")

# Runs the app in this interpreter's clean child and reports which heavy modules got imported.
WRAPPER = """
import json, runpy, sys
sys.argv = [sys.argv[1]] + sys.argv[2:]
code = 0
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exc:
    code = exc.code or 0
banned = ("torch", "train", "export", "pipeline", "tvm", "onnx")
print("IMPORTED " + json.dumps(sorted(m for m in banned if m in sys.modules)))
sys.exit(code)
"""


@pytest.fixture(scope="module")
def fashion():
    import torch

    from train.data import load_dataset

    ds = load_dataset("fashion-mnist")
    return ds, torch


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, fashion) -> Path:
    given = os.environ.get("CLASSIFY_FOLDER_BUNDLE")
    if given:
        return Path(given)
    ds, torch = fashion
    from devices import load_profile
    from export.compile import compile_bundle
    from export.portable import export_model, normalize
    from pipeline.build import profile_with_threads
    from train.models import create_model

    root = tmp_path_factory.mktemp("app-bundle")
    torch.manual_seed(0)
    model = create_model("resnet20_adn", num_classes=10, in_chans=1, img_size=28).eval()
    images, _ = ds.val.get_batch(torch.arange(16))
    portable = export_model(model, root / "portable", parity_inputs=normalize(images, ds.mean, ds.std),
                            mean=ds.mean, std=ds.std, class_names=ds.class_names,
                            model_name="resnet20_adn", progress=None)
    host = profile_with_threads(load_profile("x86-host"), 1)
    return compile_bundle(portable, host, backends=["onnxruntime"], out_dir=root / "bundle",
                          progress=None)


@pytest.fixture(scope="module")
def images(tmp_path_factory, fashion) -> tuple[Path, list[str]]:
    from PIL import Image

    ds, torch = fashion
    folder = tmp_path_factory.mktemp("images")
    x, y = ds.test.get_batch(torch.arange(N_IMAGES))
    names = []
    for i in range(N_IMAGES):
        name = f"{i:03d}_{ds.class_names[int(y[i])].replace('/', '-').replace(' ', '_')}.png"
        Image.fromarray(x[i, 0].numpy(), mode="L").save(folder / name)
        names.append(name)
    return folder, names


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-c", WRAPPER, str(APP), *args], capture_output=True,
                          text=True, env=env, cwd=APP.parent, timeout=120)


def test_app_classifies_a_folder_under_a_budget_without_torch(bundle, images):
    folder, names = images
    res = _run("--bundle", str(bundle), "--images", str(folder), "--budget-ms", "2",
               "--threads", "1")
    assert res.returncode == 0, res.stderr + res.stdout
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "IMPORTED []", lines[-1]  # no torch, train, export, pipeline, tvm, onnx
    assert lines[0].startswith("# resnet20_adn: 3 exits, backend onnxruntime")
    assert "budget 2 ms" in lines[0]
    per_image = [ln for ln in lines if not ln.startswith(("#", "IMPORTED"))]
    assert [ln.split(":")[0] for ln in per_image] == names
    pattern = re.compile(r"^\S+\.png: .+ \(class \d, p=[01]\.\d{3}\)  exit [0-2] \(depth [1-3]/3\)  "
                         r"\d+\.\d{3} ms(  DEADLINE MISSED)?$")
    for ln in per_image:
        assert pattern.match(ln), ln
    summary = [ln for ln in lines if ln.startswith("# summary:")]
    assert len(summary) == 1 and f"{N_IMAGES} images classified" in summary[0]
    assert "within the 2 ms budget" in summary[0]
    assert any(ln.startswith("# classes: ") for ln in lines)


def test_app_json_lines(bundle, images):
    folder, names = images
    res = _run("--bundle", str(bundle), "--images", str(folder), "--json", "--threads", "1")
    assert res.returncode == 0, res.stderr
    records = [json.loads(ln) for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert [r["image"] for r in records] == names
    assert all(0 <= r["exit_index"] <= 2 and r["latency_ms"] > 0 for r in records)


def test_app_errors_are_one_line(tmp_path, bundle):
    res = _run("--bundle", str(tmp_path / "missing"), "--images", str(tmp_path))
    assert res.returncode == 2 and res.stderr.startswith("error: cannot load")
    res = _run("--bundle", str(bundle), "--images", str(tmp_path))
    assert res.returncode == 2 and res.stderr.strip() == f"error: no images in {tmp_path}"


def test_app_reads_images_with_runtime_images(tmp_path):
    """The app's reader is runtime.images: PGM (binary and ASCII, comments, maxval) and .npy
    without PIL; the same pixels as PIL where both read a file."""
    sys.path.insert(0, str(APP.parent))
    try:
        import app
    finally:
        sys.path.pop(0)
    from runtime.images import read_netpbm

    img = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    (tmp_path / "a.pgm").write_bytes(b"P5\n# a comment\n28 28\n255\n" + img.tobytes())
    assert np.array_equal(read_netpbm(tmp_path / "a.pgm"), img)
    assert np.array_equal(app.read_image(tmp_path / "a.pgm", 1, (28, 28), False), img)
    ascii_ = "P2\n3 2\n15\n0 15 3\n6 9 12\n"
    (tmp_path / "b.pgm").write_text(ascii_)
    got = read_netpbm(tmp_path / "b.pgm")
    assert got.tolist() == [[0, 255, 51], [102, 153, 204]]
    np.save(tmp_path / "c.npy", img[..., None])
    assert np.array_equal(app.read_image(tmp_path / "c.npy", 1, (28, 28), False), img)
    assert [p.name for p in app.list_images(tmp_path)] == ["a.pgm", "b.pgm", "c.npy"]
    with pytest.raises(ValueError, match="b.pgm: image is 3x2 .*pass --resize"):
        app.read_image(tmp_path / "b.pgm", 1, (28, 28), False)
    assert app.read_image(tmp_path / "b.pgm", 1, (28, 28), True).shape == (28, 28)
