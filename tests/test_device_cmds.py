"""Device-side commands on a small real bundle: `pipeline benchmark`, `inspect`, `doctor`, the
calibration set (`pipeline/calib_set.py`) and `calibrate`/`run`/`predict` from it, and
`runtime.images` (PGM/PPM/.npy without PIL)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.calib_set import (CALIB_NAME, CalibSetError, default_calib_candidates,
                                find_calib_set, load_calib_set, write_calib_set)
from pipeline.cli import cli
from runtime.bundle import Bundle
from test_runtime import DATA_SPEC, bundles, jetson_like  # noqa: F401 - fixtures

THREADS = ("--threads", "1")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def calib(bundles, tmp_path_factory) -> Path:  # noqa: F811
    """The bundle's calibration set (validation images, labels, per-exit probabilities), as the
    build writes it, and the monolithic ONNX beside it."""
    from pipeline.evaluate import config_probabilities, export_monolithic
    from pipeline.runtime_cmd import split_arrays
    from runtime.model import AdaptiveModel
    from train.data import load_dataset

    root = tmp_path_factory.mktemp("calib")
    x, y = split_arrays(load_dataset(DATA_SPEC).val)
    model = AdaptiveModel.load(bundles[1], runner_options={"intra_op_threads": 1})
    probs = config_probabilities(model, x)
    write_calib_set(root / CALIB_NAME, model.manifest, x, y, probabilities=probs, data=DATA_SPEC,
                    probabilities_from={"backend": model.backend, "target": model.target})
    export_monolithic(bundles[1].parent / "model.pt", root / "monolithic.onnx", parity_samples=4)
    return root


@pytest.fixture
def bundle(bundles, calib, tmp_path) -> Path:  # noqa: F811
    """A copy of the host bundle with calib.npz beside it (and no monolithic ONNX)."""
    b = Path(shutil.copytree(bundles[1], tmp_path / "b"))
    shutil.copyfile(calib / CALIB_NAME, tmp_path / CALIB_NAME)
    return b


# ---------------------------------------------------------------------------------------------
# the calibration set
# ---------------------------------------------------------------------------------------------

def test_calib_set_contents_caps_and_checks(bundles, calib, tmp_path):  # noqa: F811
    m = Bundle.open(bundles[1]).manifest
    cs = load_calib_set(calib / CALIB_NAME, m)
    n = len(cs.labels)
    assert cs.images.dtype == np.uint8 and cs.images.shape == (n, 28, 28, 1)
    assert sorted(cs.probabilities) == sorted(m.skip_configs)
    assert cs.probabilities["FFF"].shape == (3, n, 10) and cs.class_names == m.class_names
    assert cs.meta["model"] == "resnet20_adn" and cs.meta["n_images"] == n
    assert cs.meta["checkpoint_sha256"] == m.source.checkpoint_sha256
    # caps: images by count and bytes, probabilities by bytes; labels cover the longer prefix
    x, y = cs.images, cs.labels
    meta = write_calib_set(tmp_path / "small.npz", m, x, y, probabilities=cs.probabilities,
                           max_images=7,
                           max_prob_bytes=8 * 3 * 10 * 4 * 12)
    small = load_calib_set(tmp_path / "small.npz", m)
    assert (meta["n_images"], meta["n_probabilities"], meta["n_labels"]) == (7, 12, 12)
    assert len(small.images) == 7 and len(small.labels) == 12
    assert np.array_equal(small.image_labels, y[:7])
    meta = write_calib_set(tmp_path / "bytes.npz", m, x, y, max_image_bytes=28 * 28 * 5)
    assert meta["n_images"] == 5 and meta["n_probabilities"] == 0
    # it must fit the bundle: another checkpoint / shape is refused in one line
    other = m.copy()
    other.source.checkpoint_sha256 = "0" * 64
    with pytest.raises(CalibSetError, match="made for checkpoint .* pass the bundle's "
                                            "calibration set with --npz"):
        load_calib_set(calib / CALIB_NAME, other)
    np.savez(tmp_path / "user.npz", images=np.zeros((2, 32, 32, 3), np.uint8), labels=[0, 1])
    with pytest.raises(CalibSetError, match=r"images are \(32, 32, 3\) \(H, W, C\), the model "
                                            r"takes \(28, 28, 1\)"):
        load_calib_set(tmp_path / "user.npz", m)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibSetError, match="bad.npz: not a readable .npz"):
        load_calib_set(tmp_path / "bad.npz")
    # where it is looked for: <bundle>.calib.npz, then calib.npz beside the bundle
    b = tmp_path / "deploy" / "mybundle"
    assert default_calib_candidates(b) == [tmp_path / "deploy" / "mybundle.calib.npz",
                                           tmp_path / "deploy" / "calib.npz"]
    with pytest.raises(CalibSetError, match="no calibration set for calibrate: pass --npz"):
        find_calib_set(b, what="calibrate")
    assert find_calib_set(b, required=False) is None


# ---------------------------------------------------------------------------------------------
# inspect, doctor
# ---------------------------------------------------------------------------------------------

def test_inspect_shows_pieces_rule_latency_and_calibration_set(bundle):
    r = invoke("inspect", bundle)
    assert r.exit_code == 0, r.output
    out = r.stdout
    for key in ("model: resnet20_adn (", "10 classes: class0, class1", "input: x float32 NCHW",
                "stages: 3; skip configs (8)", "FFF* ", "pieces (6):", "stage0.full",
                "onnxruntime/x86_64-cpu", "onnx/portable", "stopping rule: none",
                "latency tables: none", "integrity: ok (13 files",
                f"calibration set: {bundle.parent / CALIB_NAME} ("):
        assert key in out, key
    r = invoke("inspect", bundle, "--json")
    d = json.loads(r.stdout)
    assert d["model"]["name"] == "resnet20_adn" and d["stages"] == 3
    assert {p["id"] for p in d["pieces"]} >= {"stage0.full", "stage2.skip"}
    art = d["pieces"][0]["artifacts"][0]
    assert set(art) >= {"backend", "target", "size_bytes", "file"} and art["size_bytes"] > 0
    assert d["integrity"]["ok"] and d["calibration_set"]["images"] > 0


def test_inspect_after_calibrate_and_profile_shows_rule_and_tables(bundle):
    from test_runtime import edit_manifest, latency_entries

    edit_manifest(bundle, lambda m: m.replace_latency(latency_entries(m, "x86-host", 2.0)))
    r = invoke("calibrate", "--bundle", bundle, "--max-drop", "5", *THREADS)
    assert r.exit_code == 0, r.output
    assert f"calibration set ({len(load_calib_set(bundle.parent / CALIB_NAME).images)} images)" \
        in r.stdout
    r = invoke("inspect", bundle)
    assert r.exit_code == 0, r.output
    assert "stopping rule: max_prob {\"thresholds\"" in r.stdout
    assert "latency tables (cumulative p50 ms to each exit of" in r.stdout
    row = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("x86-host"))
    assert row.split()[1:5] == ["onnxruntime", "x86_64-cpu", "1", "estimated"]
    assert len(row.split()) == 5 + 3  # one cumulative figure per exit


def test_doctor_says_which_backends_run_here(bundle, jetson_like):  # noqa: F811
    r = invoke("doctor", bundle)
    assert r.exit_code == 0, r.output
    assert "* onnxruntime" in r.stdout and "integrity: ok" in r.stdout
    assert "OK: the runtime will use onnxruntime (x86_64-cpu)" in r.stdout
    r = invoke("doctor", jetson_like, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    by = {s["backend"]: s for s in d["backends"]}
    assert not by["tensorrt"]["usable"] and by["tensorrt"]["reason"]
    assert not by["tvm"]["usable"] and "aarch64" in by["tvm"]["reason"]
    assert by["onnxruntime"]["usable"] and by["onnxruntime"]["selected"] and d["ok"]
    assert d["machine"]["arch"] and "numpy" in d["machine"]["packages"]
    # a damaged artifact: exit 1, one line naming the file
    victim = next(p for p in (jetson_like / "onnx").iterdir())
    victim.write_bytes(victim.read_bytes()[:-1])
    r = CliRunner().invoke(cli, ["doctor", str(jetson_like)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith("Error: the bundle is damaged: ")
    assert victim.name in r.output.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

def test_benchmark_rows_per_backend_with_monolithic_and_floors(bundle, calib):
    r = invoke("benchmark", "--bundle", bundle, "--limit", "12", "--warmup", "2", *THREADS,
               "--monolithic", calib / "monolithic.onnx", "--json", "--budget-ms", "1000")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    names = [row["name"] for row in rep["rows"]]
    assert names == ["adaptive onnxruntime", "adaptive onnx", "monolithic"]
    assert rep["baseline"].startswith("monolithic ONNX session") and rep["passed"]
    for row in rep["rows"]:
        assert row["n"] == 12 and 0 <= row["accuracy"] <= 1
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["mean_ms"] > 0
        assert row["images_per_s"] > 0 and 1 <= row["mean_depth"] <= 3
        assert row["deadline_missed"] == 0 and row["speedup"] > 0
    assert rep["rows"][-1]["speedup"] == pytest.approx(1.0)
    assert [row["selected"] for row in rep["rows"]] == [True, False, False]
    # the segmented model at full depth (uncalibrated) agrees with the monolithic session
    assert rep["rows"][0]["accuracy"] == rep["rows"][2]["accuracy"]
    # text, without a monolithic model: the baseline is the runtime's backend at full depth
    r = invoke("benchmark", "--bundle", bundle, "--limit", "8", "--warmup", "0", *THREADS,
               "--backend", "onnxruntime", "--batch", "4", "--min-accuracy", "0",
               "--max-ms", "10000")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert "baseline: onnxruntime at full depth (FFF)" in lines[0] and "batch 4" in lines[0]
    assert lines[1].split()[:3] == ["row", "target", "accuracy"]
    assert lines[2].startswith("*  adaptive onnxruntime") and lines[2].endswith("x")
    assert "PASS onnxruntime (x86_64-cpu) accuracy" in r.stdout
    assert "PASS onnxruntime (x86_64-cpu) mean_ms" in r.stdout
    # a floor not met: the report, then a non-zero exit with one line
    r = CliRunner().invoke(cli, ["benchmark", "--bundle", str(bundle), "--limit", "4",
                                 "--warmup", "0", *THREADS, "--min-accuracy", "1.0",
                                 "--max-ms", "0"])
    assert r.exit_code == 1, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: benchmark below the floor: onnxruntime (x86_64-cpu)")
    assert last.endswith("(and 1 more)") and "FAIL onnxruntime" in r.output


def test_benchmark_without_a_calibration_set_is_one_line(bundles, tmp_path):  # noqa: F811
    b = Path(shutil.copytree(bundles[1], tmp_path / "lonely"))
    r = CliRunner().invoke(cli, ["benchmark", "--bundle", str(b)])
    assert r.exit_code == 1
    assert r.output.startswith("Error: ") and "pass --npz FILE" in r.output
    assert len(r.output.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# calibrate / run / predict from the calibration set and image files
# ---------------------------------------------------------------------------------------------

def test_calibrate_from_the_calibration_set_images_and_probabilities(bundle):
    cs = load_calib_set(bundle.parent / CALIB_NAME)
    r = invoke("calibrate", "--bundle", bundle, "--max-drop", "5", "--profile-runs", "2",
               *THREADS, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["source"] == "images" and out["n"] == len(cs.images)
    assert out["calibration_set"] == str(bundle.parent / CALIB_NAME)
    cal = Bundle.open(bundle).manifest.annotations["calibration"]
    assert cal["source"] == "images" and cal["data"] == DATA_SPEC
    r = invoke("calibrate", "--bundle", bundle, "--max-drop", "5", "--profile-runs", "2",
               *THREADS, "--use-probabilities", "--json", "--limit", "20")
    assert r.exit_code == 0, r.output
    probs_out = json.loads(r.stdout)
    assert probs_out["source"] == "probabilities" and probs_out["n"] == 20
    assert probs_out["probabilities_from"]["backend"] == "onnxruntime"
    r = CliRunner().invoke(cli, ["calibrate", "--bundle", str(bundle), "--max-drop", "1",
                                 "--data", DATA_SPEC, "--use-probabilities"])
    assert r.exit_code == 2 and "not both" in r.output


def test_calibrate_probabilities_match_the_images(bundle):
    """The build's per-exit probabilities are what the artifacts compute here."""
    a = json.loads(invoke("calibrate", "--bundle", bundle, "--max-drop", "5", "--profile-runs",
                          "0", *THREADS, "--json").stdout)
    b = json.loads(invoke("calibrate", "--bundle", bundle, "--max-drop", "5", "--profile-runs",
                          "0", *THREADS, "--json", "--use-probabilities").stdout)
    assert a["skip_accuracy"] == pytest.approx(b["skip_accuracy"])
    assert a["params"] == b["params"] or a["exit_histogram"] == b["exit_histogram"]


def test_run_on_the_calibration_set(bundle):
    r = invoke("run", "--bundle", bundle, "--npz", bundle.parent / CALIB_NAME, "--limit", "10",
               "--json", *THREADS)
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n"] == 10 and rep["split"] == "calib" and sum(rep["exit_histogram"]) == 10


def test_predict_netpbm_and_npy_and_pil_formats(bundle, tmp_path, monkeypatch):
    cs = load_calib_set(bundle.parent / CALIB_NAME)
    img = cs.images[0, ..., 0]
    pgm = tmp_path / "a.pgm"
    pgm.write_bytes(b"P5\n# from the calibration set\n28 28\n255\n" + img.tobytes())
    ppm = tmp_path / "b.ppm"
    ppm.write_bytes(b"P6 28 28 255\n" + np.repeat(img[..., None], 3, axis=-1).tobytes())
    npy = tmp_path / "c.npy"
    np.save(npy, cs.images[:1])
    r = invoke("predict", "--bundle", bundle, pgm, ppm, npy, "--json", *THREADS)
    assert r.exit_code == 0, r.output
    preds = json.loads(r.stdout)
    assert [p["input"] for p in preds] == [str(pgm), str(ppm), f"{npy}[0]"]
    # the same pixels (gray PPM -> luma = the gray value), the same answer
    assert len({p["class_id"] for p in preds}) == 1
    assert preds[0]["probabilities"] == preds[1]["probabilities"] == preds[2]["probabilities"]
    # PNG needs PIL: without it, one line saying so
    import runtime.images as ri

    png = tmp_path / "d.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    monkeypatch.setattr(ri, "have_pil", lambda: False)
    r = CliRunner().invoke(cli, ["predict", "--bundle", str(bundle), str(png)])
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {png}: reading .png files needs PIL (pip install "
                                "pillow); without it: .pgm, .ppm, .pnm, .npy")
    # a wrong size: one line, and --resize works without PIL (nearest neighbour)
    big = tmp_path / "big.pgm"
    big.write_bytes(b"P5 40 30 255\n" + bytes(range(256)) * 4 + bytes(176))
    r = CliRunner().invoke(cli, ["predict", "--bundle", str(bundle), str(big)])
    assert r.exit_code == 1 and "image is 40x30 (WxH), the model expects 28x28" in r.output
    r = invoke("predict", "--bundle", bundle, big, "--resize", *THREADS)
    assert r.exit_code == 0 and r.stdout.startswith(f"{big}: class ")


def test_runtime_images_reader_agrees_with_pil(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from runtime.images import ImageError, load_image, read_image, read_netpbm, resize_image

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.ppm")
    Image.fromarray(rgb).save(tmp_path / "a.png")
    assert np.array_equal(read_netpbm(tmp_path / "a.ppm"), rgb)
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    with Image.open(tmp_path / "a.png") as im:
        gray = np.asarray(im.convert("L"))
    assert np.array_equal(load_image(tmp_path / "a.ppm", (1, 9, 13)), gray)  # PIL's luma
    assert load_image(tmp_path / "a.ppm", (3, 9, 13)).shape == (9, 13, 3)
    # 16-bit PGM: scaled to 0..255
    v = np.array([[0, 1023], [512, 256]], dtype=">u2")
    (tmp_path / "w.pgm").write_bytes(b"P5 2 2 1023\n" + v.tobytes())
    assert read_netpbm(tmp_path / "w.pgm").tolist() == [[0, 255], [128, 64]]
    # nearest-neighbour resize in numpy: upscaling by 2 repeats every pixel
    small = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(resize_image(small, (6, 8), method="nearest"),
                          small.repeat(2, axis=0).repeat(2, axis=1))
    for data, match in [(b"P5 4 4 255\nxyz", "truncated raster"), (b"P7 1 1 255\n",
                                                                   "not a PGM/PPM file"),
                        (b"P2 2 1 255\n1 300", "pixel values outside 0..255")]:
        (tmp_path / "x.pgm").write_bytes(data)
        with pytest.raises(ImageError, match=f"x.pgm: {match}"):
            read_netpbm(tmp_path / "x.pgm")


def test_a_bundle_archive_loads_through_the_safe_unpacker(bundles, tmp_path, monkeypatch):  # noqa: F811
    """`AdaptiveModel.load` and `--bundle` take the build's .tar.gz: unpacked once, safely,
    into a cache keyed by the archive's sha256; a changed archive is never served stale."""
    from export.archive import pack_bundle
    from runtime.model import AdaptiveModel

    monkeypatch.setenv("ADAPTIVE_DEPTH_CACHE", str(tmp_path / "cache"))
    arc = pack_bundle(bundles[1], tmp_path / "b.tar.gz")
    x = np.zeros((28, 28), dtype=np.uint8)
    want = AdaptiveModel.load(bundles[1], runner_options={"intra_op_threads": 1}).predict(x)
    got = AdaptiveModel.load(arc, runner_options={"intra_op_threads": 1})
    assert got.bundle.root.parent == tmp_path / "cache"
    np.testing.assert_array_equal(got.predict(x).probabilities, want.probabilities)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    AdaptiveModel.load(arc)  # the second load reuses the unpacked directory
    assert len(list((tmp_path / "cache").iterdir())) == 1
    r = invoke("inspect", arc)
    assert r.exit_code == 0 and "pieces" in r.output.lower(), r.output
    r = invoke("predict", "--bundle", arc, *THREADS, "--json", _pgm(tmp_path / "a.pgm", x))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)[0]["class_id"] == want.class_id
    # not an archive: one line
    bad = tmp_path / "notes.txt"
    bad.write_text("x")
    r = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert r.exit_code == 2 and "expected a bundle directory or a .tar.gz" in r.output


def _pgm(path: Path, img: np.ndarray) -> Path:
    h, w = img.shape
    path.write_bytes(b"P5 %d %d 255\n" % (w, h) + img.tobytes())
    return path
