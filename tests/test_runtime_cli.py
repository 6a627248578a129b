"""`pipeline calibrate`, `pipeline predict`, `pipeline run` on a small real bundle."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from runtime import AdaptiveModel
from runtime.bundle import Bundle
from runtime.manifest import MANIFEST_NAME, save_manifest
from test_runtime import build_bundles, latency_entries


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory) -> Path:
    return build_bundles(tmp_path_factory.mktemp("runtime-cli"))[1]


@pytest.fixture
def bundle(host_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(host_bundle, tmp_path / "b"))


def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_calibrate_writes_stopping_record_and_bundle_still_verifies(bundle):
    r = invoke("calibrate", "--bundle", bundle, "--max-drop", "5", "--rule", "max_prob",
               "--threads", "1", "--profile-runs", "3")
    assert r.exit_code == 0, r.output
    assert "calibrated max_prob" in r.output and "profiled here" in r.output
    b = Bundle.open(bundle, verify=True)
    st = b.manifest.stopping
    assert st.rule == "max_prob" and len(st.params["thresholds"]) >= 2
    assert 0.0 <= st.val_accuracy <= 1.0 and st.mean_latency_ms > 0 and st.created
    assert set(st.skip_accuracy) == set(b.manifest.skip_configs) and st.skip_config == "FFF"
    assert "skip_accuracy" not in b.manifest.annotations  # in the schema, not a second copy
    cal = b.manifest.annotations["calibration"]
    assert cal["split"] == "val" and cal["n"] > 0 and cal["skip_config"] == "FFF"
    assert len(cal["segment_ms"]) == b.manifest.stages
    m = AdaptiveModel.load(bundle, runner_options={"intra_op_threads": 1})
    assert m.rule_name == "max_prob" and m.skip_accuracy == st.skip_accuracy


def test_calibrate_uses_the_latency_table_and_mean_budget(bundle):
    b = Bundle.open(bundle)
    m = b.manifest.copy()
    m.replace_latency(latency_entries(m, "x86-host", 2.0))
    save_manifest(m, b.root / MANIFEST_NAME)
    r = invoke("calibrate", "--bundle", bundle, "--mean-budget-ms", "4.5", "--rule", "entropy",
               "--threads", "1", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["rule"] in ("entropy", "full") and out["segment_ms"] == [2.0, 2.0, 2.0]
    assert out["segment_ms_source"].startswith("latency table (estimated")
    assert out["mean_latency_ms"] <= 4.5 + 1e-9
    Bundle.open(bundle, verify=True)


def test_calibrate_needs_exactly_one_target(bundle):
    r = CliRunner().invoke(cli, ["calibrate", "--bundle", str(bundle)])
    assert r.exit_code == 2 and "exactly one of --max-drop and --mean-budget-ms" in r.output
    r = CliRunner().invoke(cli, ["calibrate", "--bundle", str(bundle), "--max-drop", "1",
                                 "--rule", "bogus", "--threads", "1", "--profile-runs", "0"])
    assert r.exit_code == 1 and "unknown stopping rule 'bogus'" in r.output


def test_predict_images_and_npy(bundle, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    png = tmp_path / "digit.png"
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(png)
    npy = tmp_path / "two.npy"
    np.save(npy, rng.integers(0, 256, (2, 28, 28, 1), dtype=np.uint8))
    r = invoke("predict", "--bundle", bundle, png, npy, "--threads", "1")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 3
    assert lines[0].startswith(f"{png}: class ") and "exit 2 (depth 3/3)" in lines[0]
    assert lines[1].startswith(f"{npy}[0]: class ") and lines[2].endswith(" ms")
    r = invoke("predict", "--bundle", bundle, png, "--json", "--budget-ms", "1000",
               "--skip-config", "TTT", "--threads", "1")
    assert r.exit_code == 0, r.output
    (p,) = json.loads(r.stdout)
    assert p["input"] == str(png) and p["skip_config"] == "TTT" and len(p["probabilities"]) == 10
    assert {"class_id", "class_name", "exit_index", "depth", "latency_ms",
            "deadline_missed"} <= set(p)
    big = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (32, 40), dtype=np.uint8)).save(big)
    r = CliRunner().invoke(cli, ["predict", "--bundle", str(bundle), str(big)])
    assert r.exit_code == 1 and "pass --resize" in r.output
    r = invoke("predict", "--bundle", bundle, big, "--resize", "--threads", "1")
    assert r.exit_code == 0 and "class" in r.stdout
    r = CliRunner().invoke(cli, ["predict", "--bundle", str(bundle), str(npy), "--rule", "nope"])
    assert r.exit_code == 1 and "unknown rule 'nope'" in r.output


def test_run_reports_accuracy_exits_and_latency(bundle):
    r = invoke("run", "--bundle", bundle, "--limit", "16", "--batch", "4", "--json",
               "--threads", "1")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n"] == 16 and rep["split"] == "test" and rep["batch"] == 4
    assert sum(rep["exit_histogram"]) == 16 and rep["exit_histogram"][-1] == 16  # uncalibrated
    assert 0.0 <= rep["accuracy"] <= 1.0 and rep["correct"] == round(rep["accuracy"] * 16)
    assert set(rep["latency_ms"]) == {"p50", "p95", "p99", "mean"}
    assert rep["latency_ms"]["p50"] <= rep["latency_ms"]["p99"]
    r = invoke("run", "--bundle", bundle, "--limit", "8", "--budget-ms", "1000", "--rule", "full",
               "--threads", "1")
    assert r.exit_code == 0, r.output
    for key in ("accuracy:", "exits: 0: 0", "latency ms: p50", "p95", "p99", "mean",
                "deadline missed: 0", "skip configs:"):
        assert key in r.stdout, key


def test_without_torch_run_and_calibrate_use_the_calibration_set(bundle, monkeypatch):
    """On a device (torch not installed) the data set cannot be loaded: `run` and `calibrate`
    read the calibration set beside the bundle, and say so in one line when there is none."""
    import pipeline.runtime_cmd as rc
    from pipeline.calib_set import write_calib_set

    monkeypatch.setattr(rc, "_torch_available", lambda: False)
    r = CliRunner().invoke(cli, ["run", "--bundle", str(bundle), "--limit", "4"])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "pass --npz FILE" in r.output
    r = CliRunner().invoke(cli, ["calibrate", "--bundle", str(bundle), "--max-drop", "1",
                                 "--data", "digits"])
    assert r.exit_code == 1 and "--data needs torch" in r.output
    rng = np.random.default_rng(0)
    m = Bundle.open(bundle).manifest
    write_calib_set(bundle.parent / f"{bundle.name}.calib.npz", m,
                    rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8),
                    rng.integers(0, 10, 12), data="random")
    r = invoke("run", "--bundle", bundle, "--json", "--threads", "1")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n"] == 12 and rep["split"] == "calib" and rep["data"].endswith("b.calib.npz")
    r = invoke("calibrate", "--bundle", bundle, "--max-drop", "50", "--threads", "1",
               "--profile-runs", "0", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["source"] == "images" and out["n"] == 12 and out["data"] == "random"
    r = CliRunner().invoke(cli, ["calibrate", "--bundle", str(bundle), "--max-drop", "1",
                                 "--use-probabilities"])
    assert r.exit_code == 1 and "no per-exit probabilities of FFF" in r.output
