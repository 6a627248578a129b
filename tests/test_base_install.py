"""The device side on the base install only: a clean virtual environment with numpy, onnxruntime
and click (the project's base dependencies) and the project itself, where torch, PIL and onnx
cannot be imported. A real bundle built here by `pipeline build` (digits, 20 training steps,
this machine's profile) is copied with its calibration set (calib.npz) and the monolithic ONNX,
and `pipeline predict`, `profile`, `calibrate`, `run`, `benchmark`, `inspect`, `doctor` and the
example app run there: each exits 0 and its output is checked.

The venv is made once per test session: `python -m venv`, then pip installs numpy, onnxruntime
and click at the versions of the running environment (and the build backend), then the project
from a copy of its sources with ``--no-index``: every base dependency must already be there, so
a base dependency outside the three fails the install. About 40 s for the venv (pip downloads
or reads its cache), 15 s for the build, 20 s for the commands.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "classify_folder" / "app.py"
BASE = ("numpy", "onnxruntime", "click")
ABSENT = ("torch", "PIL", "onnx", "onnxscript", "matplotlib", "tqdm", "sklearn")

pytestmark = [pytest.mark.slow]

CONFIG = """\
[build]
device = "host"
out = "{out}"
threads = 1

[train]
model = "resnet20_adn"
data = "digits"
epochs = 1
max_steps = 20
batch_size = 64
warmup_epochs = 0.1
threads = 1

[profile]
mode = "quick"

[evaluate]
limit = 100
warmup = 5
batch_threads = 1
"""


def _sh(cmd: list[str], *, timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="session")
def base_venv(tmp_path_factory) -> Path:
    """A venv with the base install only; returns its bin/ directory."""
    root = tmp_path_factory.mktemp("base-install")
    venv = root / "venv"
    r = _sh([sys.executable, "-m", "venv", str(venv)])
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    pins = [f"{d}=={importlib.metadata.version(d)}" for d in BASE]
    backend = [f"{d}=={importlib.metadata.version(d)}" for d in ("setuptools", "wheel")]
    r = _sh([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins,
             *backend], timeout=900)
    assert r.returncode == 0, f"pip install {' '.join(pins)} failed:\n{r.stdout}\n{r.stderr}"
    # the project from a copy of its sources (a build in place would write into the checkout)
    src = root / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("pipeline", "train", "export", "runtime", "devices"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    r = _sh([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             "--no-build-isolation", "--no-index", str(src)], timeout=600)
    assert r.returncode == 0, ("installing the project with only numpy, onnxruntime and click "
                               f"available failed (a base dependency too many?):\n{r.stdout}\n"
                               f"{r.stderr}")
    return venv / "bin"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A real `pipeline build` for this machine (in the full environment): its output root."""
    pytest.importorskip("sklearn")
    from pipeline.build import run_build
    from pipeline.build_config import build_config

    root = tmp_path_factory.mktemp("base-build")
    (root / "recipe.toml").write_text(CONFIG.format(out=root / "out"))
    result = run_build(build_config(root / "recipe.toml"), log=lambda _msg: None)
    return result.root


@pytest.fixture
def device(built, tmp_path) -> Path:
    """What is copied to the device: the bundle, its calibration set and the monolithic ONNX
    beside it. Returns the bundle directory."""
    dev = tmp_path / "device"
    dev.mkdir()
    bundle = Path(shutil.copytree(built / "bundle", dev / "resnet20_adn-x86-host"))
    shutil.copyfile(built / "calib.npz", dev / "calib.npz")
    shutil.copyfile(built / "monolithic.onnx", dev / "monolithic.onnx")
    return bundle


def _env(bin_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PIPELINE_DEBUG")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _pipeline(bin_dir: Path, *args, cwd: Path, expect: int = 0) -> subprocess.CompletedProcess:
    r = _sh([str(bin_dir / "pipeline"), *[str(a) for a in args]], timeout=300, cwd=cwd,
            env=_env(bin_dir))
    assert r.returncode == expect, (f"pipeline {' '.join(map(str, args))}: exit "
                                    f"{r.returncode}\n{r.stdout}\n{r.stderr}")
    assert "Traceback" not in r.stderr, r.stderr
    return r


def test_base_install_has_no_torch_pil_or_onnx(base_venv):
    py = str(base_venv / "python")
    r = _sh([py, "-c", "import torch"], env=_env(base_venv), cwd=base_venv)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr
    code = ("import importlib.util as u, importlib.metadata as md, json, pipeline, runtime\n"
            f"print(json.dumps([[m for m in {ABSENT!r} if u.find_spec(m)], pipeline.__file__, "
            "md.requires('adaptive-depth-pipeline')]))")
    r = _sh([py, "-c", code], env=_env(base_venv), cwd=base_venv)
    assert r.returncode == 0, r.stderr
    present, where, requires = json.loads(r.stdout)
    assert present == []
    assert str(base_venv.parent) in where  # the installed copy, not this checkout
    base = sorted(re.split(r"[<>=;\[ ]", q)[0] for q in requires if "extra ==" not in q
                  and "python_version" not in q)
    assert base == ["click", "numpy", "onnxruntime"]
    build = sorted(re.split(r"[<>=;\[ ]", q)[0] for q in requires if 'extra == "build"' in q)
    assert build == ["matplotlib", "onnx", "onnxscript", "pillow", "torch", "tqdm"]


def test_build_side_commands_say_what_to_install(base_venv, tmp_path):
    r = _pipeline(base_venv, "train", "--model", "resnet20_adn", "--data", "digits",
                  "--out", tmp_path / "run", cwd=tmp_path, expect=1)
    assert r.stderr.strip().splitlines() == [
        "Error: No module named 'torch': this command needs the build side of the project: "
        "pip install 'adaptive-depth-pipeline[build]'"]


def test_doctor_and_inspect(base_venv, device):
    r = _pipeline(base_venv, "doctor", device, cwd=device.parent)
    out = r.stdout
    assert re.search(r"^  \* onnxruntime +x86_64-cpu +usable$", out, re.M), out
    assert "PIL no" in out and "integrity: ok" in out
    assert "latency table: measured (x86-host, onnxruntime, batch 1)" in out
    assert f"calibration set: {device.parent / 'calib.npz'}" in out
    assert "OK: the runtime will use onnxruntime (x86_64-cpu)" in out
    d = json.loads(_pipeline(base_venv, "doctor", device, "--json", cwd=device.parent).stdout)
    assert d["ok"] and d["machine"]["torch"] is False and d["machine"]["pillow"] is False
    assert d["machine"]["packages"]["onnxruntime"] == importlib.metadata.version("onnxruntime")

    r = _pipeline(base_venv, "inspect", device, cwd=device.parent)
    out = r.stdout
    for key in ("model: resnet20_adn (", "stages: 3; skip configs (8)", "pieces (",
                "onnxruntime/x86_64-cpu", "stopping rule: ", "validation accuracy",
                "latency tables (cumulative p50 ms to each exit of",
                "integrity: ok", f"calibration set: {device.parent / 'calib.npz'} ("):
        assert key in out, key
    d = json.loads(_pipeline(base_venv, "inspect", device, "--json", cwd=device.parent).stdout)
    # the build's calibration: max_prob, or its full-depth fallback on this tiny model
    assert d["stopping"]["rule"] in ("router", "max_prob", "full") and d["latency"][0]["kind"] == "measured"
    assert len(d["latency"][0]["cumulative_p50_ms"]) == 3


def _pgm(path: Path, img: np.ndarray) -> Path:
    h, w = img.shape
    path.write_bytes(f"P5\n{w} {h}\n255\n".encode() + img.tobytes())
    return path


def test_predict_pgm_and_npy_without_pil(base_venv, device, tmp_path):
    z = np.load(device.parent / "calib.npz")
    images, labels = z["images"], z["labels"]
    a = _pgm(tmp_path / "a.pgm", images[0, ..., 0])
    npy = tmp_path / "b.npy"
    np.save(npy, images[1:3])
    r = _pipeline(base_venv, "predict", "--bundle", device, a, npy, "--threads", "1",
                  cwd=tmp_path)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3
    pattern = re.compile(r"^\S+: class \d+ \(.+\) p=[01]\.\d{3}  exit [0-2] \(depth [1-3]/3\)  "
                         r"config [FT]{3}  \d+\.\d{3} ms( +DEADLINE MISSED)?$")
    for ln in lines:
        assert pattern.match(ln), ln
    assert lines[0].startswith(f"{a}: ") and lines[2].startswith(f"{npy}[1]: ")
    preds = json.loads(_pipeline(base_venv, "predict", "--bundle", device, a, "--json",
                                 "--threads", "1", cwd=tmp_path).stdout)
    assert preds[0]["class_id"] in range(10) and len(preds[0]["probabilities"]) == 10
    assert labels.shape[0] >= len(images)
    png = tmp_path / "c.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    r = _pipeline(base_venv, "predict", "--bundle", device, png, cwd=tmp_path, expect=1)
    assert r.stderr.strip() == (f"Error: {png}: reading .png files needs PIL (pip install "
                                "pillow); without it: .pgm, .ppm, .pnm, .npy")


def test_profile(base_venv, device):
    r = _pipeline(base_venv, "profile", "--bundle", device, "--quick", "--batch", "1",
                  cwd=device.parent)
    assert "MEASURED latency" in r.stdout
    assert re.search(r"wrote \d+ measured latency entries \(x86-host/onnxruntime, batch 1\)",
                     r.stdout), r.stdout
    assert "no plot" in r.stderr  # matplotlib is a build extra


def test_calibrate_from_the_calibration_set(base_venv, device):
    r = _pipeline(base_venv, "calibrate", "--bundle", device, "--max-drop", "1", "--threads", "1",
                  cwd=device.parent)
    assert re.search(r"^calibrated (max_prob|full) on digits calibration set \(\d+ images\) with "
                     r"onnxruntime \(x86_64-cpu\)$", r.stdout, re.M), r.stdout
    assert "segment costs:" in r.stdout and "[latency table (measured" in r.stdout
    assert f"wrote {device / 'manifest.json'} (stopping record; bundle verified)" in r.stdout
    d = json.loads(_pipeline(base_venv, "calibrate", "--bundle", device, "--mean-budget-ms",
                             "100", "--use-probabilities", "--json", "--threads", "1",
                             cwd=device.parent).stdout)
    assert d["source"] == "probabilities" and d["n"] > 0
    assert d["calibration_set"] == str(device.parent / "calib.npz")
    rep = json.loads(_pipeline(base_venv, "run", "--bundle", device, "--limit", "20", "--json",
                               "--threads", "1", cwd=device.parent).stdout)
    assert rep["n"] == 20 and rep["split"] == "calib" and 0 <= rep["accuracy"] <= 1


def test_router_calibrates_on_the_base_install(base_venv, device, tmp_path):
    """The joint router is fitted on a device with numpy only (no onnx: the spans of dropped
    exits then run as chains of the stage pieces), and the bundle predicts with it."""
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(device, b)
    r = _pipeline(base_venv, "calibrate", "--bundle", b, "--rule", "router", "--max-drop", "2",
                  "--use-probabilities", "--npz", device.parent / "calib.npz", "--json",
                  cwd=device.parent)
    rep = json.loads(r.stdout)
    assert rep["rule"] == "router" and rep["merged_pieces"] == [] and rep["exits_kept"][-1] == 2
    assert json.loads((b / "manifest.json").read_text())["stopping"]["rule"] == "router"
    r = _pipeline(base_venv, "benchmark", "--bundle", b, "--npz", device.parent / "calib.npz",
                  "--limit", "20", "--threads", "1", "--json", cwd=device.parent)
    assert json.loads(r.stdout)["rows"][0]["n"] == 20


def test_benchmark(base_venv, device):
    r = _pipeline(base_venv, "benchmark", "--bundle", device, "--limit", "100", "--threads", "1",
                  "--json", "--min-accuracy", "0", cwd=device.parent)
    rep = json.loads(r.stdout)
    assert [row["name"] for row in rep["rows"]] == ["adaptive onnxruntime", "adaptive onnx",
                                                    "monolithic"]
    assert rep["baseline"] == "monolithic ONNX session (monolithic.onnx)" and rep["passed"]
    for row in rep["rows"]:
        assert row["n"] == 100 and 0 <= row["accuracy"] <= 1 and row["images_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] and 1 <= row["mean_depth"] <= 3
    mono = rep["rows"][-1]
    assert mono["mean_depth"] == 3 and mono["speedup"] == pytest.approx(1.0)
    # text, with a deadline, and a floor that cannot be met: the table, then exit 1, one line
    r = _pipeline(base_venv, "benchmark", "--bundle", device, "--limit", "30", "--threads", "1",
                  "--budget-ms", "50", "--max-ms", "0", cwd=device.parent, expect=1)
    assert re.search(r"^\*  adaptive onnxruntime +x86_64-cpu +\d+\.\d\d% ", r.stdout, re.M), \
        r.stdout
    assert "FAIL onnxruntime (x86_64-cpu) mean_ms" in r.stdout
    assert re.fullmatch(r"Error: benchmark below the floor: onnxruntime \(x86_64-cpu\) mean_ms "
                        r"\S+ \(needs <= 0\)", r.stderr.strip()), r.stderr


def test_example_app_on_pgm_files(base_venv, device, tmp_path):
    z = np.load(device.parent / "calib.npz")
    folder = tmp_path / "images"
    folder.mkdir()
    names = [_pgm(folder / f"{i:03d}.pgm", z["images"][i, ..., 0]).name for i in range(5)]
    wrapper = ("import json, runpy, sys\n"
               "sys.argv = sys.argv[1:]\n"
               "code = 0\n"
               "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
               "except SystemExit as exc:\n    code = exc.code or 0\n"
               "print('IMPORTED ' + json.dumps(sorted(m for m in ('torch', 'PIL', 'onnx', "
               "'train', 'export', 'pipeline') if m in sys.modules)))\n"
               "sys.exit(code)\n")
    r = _sh([str(base_venv / "python"), "-c", wrapper, str(APP), "--bundle", str(device),
             "--images", str(folder), "--budget-ms", "50", "--threads", "1"],
            cwd=tmp_path, env=_env(base_venv), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "IMPORTED []"
    assert re.match(r"# resnet20_adn: 3 exits, backend onnxruntime \(x86_64-cpu\), rule "
                    r"(router|max_prob|full), budget 50 ms; 5 images", lines[0]), lines[0]
    per_image = [ln for ln in lines if not ln.startswith(("#", "IMPORTED"))]
    assert [ln.split(":")[0] for ln in per_image] == names
    assert any(ln.startswith("# summary: 5 images classified") for ln in lines)
