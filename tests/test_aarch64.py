"""The runtime on aarch64, under qemu-user: Debian's arm64 python3.11 with PyPI's aarch64 numpy,
onnxruntime and click (tests/aarch64_sysroot.py) gives the same answers as this x86-64 host.

A small real bundle (tests/test_runtime.py ``build_bundles``) is run here and under qemu:
every exit of every skip configuration (``exit_probabilities``) within 1e-5, and the same
class and exit per image from ``pipeline predict`` and examples/classify_folder/app.py with a
calibrated max_prob rule that spreads the images over the exits. Timing under emulation means
nothing; only answers are compared. Skipped only on a non-x86-64 host or without
``qemu-aarch64-static``; a failed download fails the test with the command that failed.
"""
from __future__ import annotations

import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

from aarch64_sysroot import Sysroot, build_sysroot, pinned_versions, qemu_binary

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "classify_folder" / "app.py"
FASHION_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
N_IMAGES = 24  # pipeline predict and the app: one image per call
N_PROBE = 12  # exit_probabilities: every exit of every skip config (8) on these, batched
TOL = 1e-5
QEMU_TIMEOUT_S = 600

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                       reason=f"runs aarch64 under qemu from an x86-64 host; this host is "
                              f"{platform.machine()}"),
    pytest.mark.skipif(qemu_binary() is None,
                       reason="qemu-aarch64-static is not installed (Debian qemu-user-static, "
                              "installed by .ci/setup)"),
]

# Run natively and under qemu: every exit of every skip config (WHICH "all") or of the default
# one (WHICH "default") of BUNDLE on IMAGES -> OUT.npz, and a JSON line saying where it ran, which
# backend it chose and what it imported.
PROBE = """
import json, platform, sys
import numpy as np
from runtime import AdaptiveModel

bundle, images, out, which = sys.argv[1:5]
model = AdaptiveModel.load(bundle, runner_options={"intra_op_threads": 1}, warn=False)
x = np.load(images)
configs = model.skip_configs if which == "all" else [model.default_skip_config]
np.savez(out, **{cfg: model.exit_probabilities(x, skip_config=cfg) for cfg in configs})
heavy = ("torch", "onnx", "train", "export", "pipeline", "tvm", "PIL")
print(json.dumps({"machine": platform.machine(), "backend": model.backend,
                  "skip_configs": list(model.skip_configs),
                  "target": model.target, "skipped": {k: str(v) for k, v in
                                                      model.choice.skipped.items()},
                  "imported": sorted(m for m in heavy if m in sys.modules)}))
"""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def native_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_native(*args: str | Path) -> subprocess.CompletedProcess:
    """This interpreter (x86-64) in a fresh process, from the repo root."""
    return subprocess.run([sys.executable, *map(str, args)], env=native_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=QEMU_TIMEOUT_S)


def aarch64(sysroot: Sysroot) -> Callable[..., subprocess.CompletedProcess]:
    """Runs the sysroot's aarch64 python3.11 under qemu, the repo root on its path."""
    def run_aarch64(*args: str | Path) -> subprocess.CompletedProcess:
        return sysroot.run(*args, pythonpath=[ROOT], cwd=ROOT, timeout=QEMU_TIMEOUT_S)
    return run_aarch64


def checked(r: subprocess.CompletedProcess, where: str) -> str:
    assert r.returncode == 0, \
        f"{where}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def read_idx_images(path: Path, n: int) -> np.ndarray:
    """The first ``n`` images of a gzipped IDX3 file as uint8 (n, H, W)."""
    with gzip.open(path, "rb") as f:
        head = np.frombuffer(f.read(16), dtype=">u4")
        assert head[0] == 2051, f"{path}: not an IDX3 image file"
        h, w = int(head[2]), int(head[3])
        return np.frombuffer(f.read(n * h * w), dtype=np.uint8).reshape(n, h, w).copy()


def write_pgm(path: Path, img: np.ndarray) -> None:
    h, w = img.shape
    path.write_bytes(f"P5\n{w} {h}\n255\n".encode() + img.astype(np.uint8).tobytes())


def split_threshold(values: np.ndarray, q: float) -> float:
    """A threshold near the ``q`` quantile of ``values``, halfway across the widest nearby gap
    (no value within rounding distance of it, so both machines split the same way)."""
    v = np.sort(values)
    i = min(max(int(q * len(v)), 1), len(v) - 1)
    js = range(max(i - 3, 1), min(i + 4, len(v)))
    j = max(js, key=lambda j: v[j] - v[j - 1])
    assert v[j] - v[j - 1] > 1e-3, f"no clear gap near the {q} quantile: {v}"
    return float((v[j] + v[j - 1]) / 2)


def max_diffs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Per skip config, max |a - b| of every exit."""
    assert sorted(a) == sorted(b)
    return {cfg: [float(np.abs(a[cfg][k] - b[cfg][k]).max()) for k in range(len(a[cfg]))]
            for cfg in sorted(a)}


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sysroot() -> Sysroot:
    """The cached aarch64 sysroot (built here on first use: about a minute)."""
    return build_sysroot(log=lambda msg: print(msg, flush=True))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """The portable bundle and the x86-host onnxruntime one compiled from it."""
    from test_runtime import build_bundles

    portable, host = build_bundles(tmp_path_factory.mktemp("aarch64"))
    return {"portable": portable, "host": host}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """uint8 (N, 28, 28): Fashion-MNIST test images (the synthetic data set's without it)."""
    if FASHION_TEST.is_file():
        return read_idx_images(FASHION_TEST, N_IMAGES)
    from train.data import load_dataset

    ds = load_dataset("synthetic:chans=1,size=28")
    return ds.test.images[:N_IMAGES, 0].numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, images) -> Path:
    """Every image as ``img_NN.npy`` and ``img_NN.pgm``."""
    d = tmp_path_factory.mktemp("aarch64-images")
    for i, img in enumerate(images):
        np.save(d / f"img_{i:02d}.npy", img)
        write_pgm(d / f"img_{i:02d}.pgm", img)
    return d


@pytest.fixture(scope="module")
def calibrated(bundles, images, tmp_path_factory) -> Path:
    """The portable bundle with a max_prob rule whose thresholds spread the images over the
    exits (no image near a threshold)."""
    from runtime import AdaptiveModel
    from runtime.manifest import Stopping
    from test_runtime import edit_manifest

    b = Path(shutil.copytree(bundles["portable"], tmp_path_factory.mktemp("cal") / "b"))
    m = AdaptiveModel.load(b, runner_options={"intra_op_threads": 1})
    top = m.exit_probabilities(images, skip_config=m.default_skip_config).max(axis=2)
    thresholds, left = [], np.ones(len(images), bool)
    for k, q in zip(range(m.stages - 1), (0.7, 0.5)):
        thresholds.append(split_threshold(top[k][left], q))
        left &= top[k] < thresholds[-1]
    edit_manifest(b, lambda man: setattr(man, "stopping", Stopping(
        rule="max_prob", params={"thresholds": thresholds})))
    return b


def probe(run, bundle: Path, images_npy: Path, out: Path, which: str = "all"
          ) -> tuple[dict, dict[str, np.ndarray]]:
    """Run PROBE with ``run``: (its JSON line, {skip config: (S, N, C) probabilities})."""
    script = out.with_suffix(".py")
    script.write_text(PROBE)
    info = json.loads(checked(run(script, bundle, images_npy, out, which), run.__name__)
                      .strip().splitlines()[-1])
    with np.load(out) as z:
        return info, {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------

def test_sysroot_runs_aarch64_python_with_the_same_library_versions(sysroot):
    code = ("import json, platform, numpy, onnxruntime, click; from importlib.metadata import "
            "version; print(json.dumps([platform.machine()] + [version(n) for n in "
            "('numpy', 'onnxruntime', 'click')]))")
    machine, *versions = json.loads(checked(aarch64(sysroot)("-c", code), "qemu"))
    assert machine == "aarch64"
    assert versions == list(pinned_versions(("numpy", "onnxruntime", "click")).values())


def test_every_exit_of_every_skip_config_matches_x86(sysroot, bundles, images, tmp_path):
    """The portable bundle: the same ONNX run by onnxruntime on both machines."""
    np.save(tmp_path / "x.npy", images[:N_PROBE])
    x86_info, x86 = probe(run_native, bundles["portable"], tmp_path / "x.npy", tmp_path / "x86.npz")
    arm_info, arm = probe(aarch64(sysroot), bundles["portable"], tmp_path / "x.npy",
                          tmp_path / "arm.npz")
    assert x86_info["machine"] == "x86_64" and arm_info["machine"] == "aarch64"
    assert arm_info["imported"] == [], f"the runtime imported {arm_info['imported']} on aarch64"
    assert arm_info["backend"] == "onnx", arm_info
    assert sorted(x86) == sorted(arm) == sorted(x86_info["skip_configs"]) and len(x86) > 1
    diffs = max_diffs(x86, arm)
    print(f"\nmax |x86 - aarch64| per skip config, per exit: {json.dumps(diffs)}")
    worst = {cfg: max(d) for cfg, d in diffs.items()}
    assert max(worst.values()) <= TOL, worst


def test_x86_host_bundle_falls_back_to_portable_onnx_on_aarch64(sysroot, bundles, images,
                                                                tmp_path):
    """The x86-host bundle's optimised onnxruntime artifacts are skipped on aarch64 (another
    architecture); its portable ONNX answers as the x86-optimised artifacts do here."""
    np.save(tmp_path / "x.npy", images[:N_PROBE])
    x86_info, x86 = probe(run_native, bundles["host"], tmp_path / "x.npy", tmp_path / "x86.npz",
                          "default")
    arm_info, arm = probe(aarch64(sysroot), bundles["host"], tmp_path / "x.npy",
                          tmp_path / "arm.npz", "default")
    assert (x86_info["backend"], x86_info["target"]) == ("onnxruntime", "x86_64-cpu"), x86_info
    assert arm_info["backend"] == "onnx" and "aarch64" in arm_info["skipped"]["onnxruntime"], \
        arm_info
    diffs = max_diffs(x86, arm)
    print(f"\nx86-host bundle, max |x86 optimised - aarch64 portable| per exit: {diffs}")
    assert max(max(d) for d in diffs.values()) <= TOL, diffs


def predict_json(run, bundle: Path, files: Sequence[Path]) -> list[dict]:
    out = checked(run("-m", "pipeline", "predict", "--bundle", bundle, "--json", "--threads", "1",
                      *files), f"pipeline predict ({run.__name__})")
    return json.loads(out)


def test_pipeline_predict_matches_x86(sysroot, calibrated, image_dir):
    """Even images as .npy, odd ones as PGM (read without PIL: the sysroot has none)."""
    files = [image_dir / f"img_{i:02d}.{'pgm' if i % 2 else 'npy'}" for i in range(N_IMAGES)]
    x86 = predict_json(run_native, calibrated, files)
    arm = predict_json(aarch64(sysroot), calibrated, files)
    assert len(x86) == len(arm) == len(files)
    assert len({p["exit_index"] for p in x86}) >= 2, "the rule should spread images over exits"
    for a, b in zip(x86, arm):
        assert (a["input"], a["class_id"], a["exit_index"], a["skip_config"]) == \
               (b["input"], b["class_id"], b["exit_index"], b["skip_config"])
        # --json rounds probabilities to 6 decimals
        assert np.abs(np.subtract(a["probabilities"], b["probabilities"])).max() <= TOL + 1e-6


def app_json(run, bundle: Path, folder: Path) -> list[dict]:
    out = checked(run(APP, "--bundle", bundle, "--images", folder, "--json", "--threads", "1"),
                  f"classify_folder app ({run.__name__})")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_example_app_matches_x86(sysroot, calibrated, image_dir, tmp_path):
    """The app on a folder of PGM files (read with numpy alone on aarch64: no PIL there)."""
    folder = tmp_path / "pgm"
    folder.mkdir()
    for p in image_dir.glob("*.pgm"):
        shutil.copy(p, folder / p.name)
    x86 = app_json(run_native, calibrated, folder)
    arm = app_json(aarch64(sysroot), calibrated, folder)
    assert len(x86) == len(arm) == len(list(folder.iterdir()))
    assert len({p["exit_index"] for p in x86}) >= 2, "the rule should spread images over exits"
    for a, b in zip(x86, arm):
        assert (a["image"], a["class_id"], a["exit_index"], a["skip_config"]) == \
               (b["image"], b["class_id"], b["exit_index"], b["skip_config"])
        assert abs(a["confidence"] - b["confidence"]) <= TOL
