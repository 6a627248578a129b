"""`pipeline build` end to end on a tiny model: resnet20_adn on scikit-learn's 8x8 digits, 20
training steps, for this machine (x86-host, measured) and for a Jetson Orin Nano (estimated, with
a host bundle for the measured numbers); caching, dry runs, interruption, errors.

Everything runs single-threaded (the machine has 2 shared cores) and in quick profiling mode.
"""
from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("sklearn")

from pipeline.build import STAGES, run_build  # noqa: E402
from pipeline.build_config import BuildConfig, build_config, load_build_file  # noqa: E402
from pipeline.cli import cli  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402

CONFIG = """\
[build]
device = "{device}"
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
limit = 200
warmup = 5
batch_threads = 1
"""

REPORT_KEYS = {"schema", "created", "device", "model", "data", "summary", "acceptance", "bundle",
               "calibration", "finish_on_device", "stages", "plots", "config", "results"}
SUMMARY_KEYS = {"full_depth_accuracy", "adaptive_accuracy", "accuracy_drop_points",
                "mean_latency_ms", "p99_latency_ms", "monolithic_mean_latency_ms",
                "speedup_vs_monolithic", "full_depth_ratio_vs_monolithic", "macs_fraction",
                "budget_ms", "budget_p99_latency_ms", "exit_histogram"}


def _write_config(path: Path, device: str, out: Path) -> Path:
    path.write_text(CONFIG.format(device=device, out=out))
    return path


def _quiet(_msg: str) -> None:
    pass


def _check_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    w, h = struct.unpack(">II", data[16:24])
    assert w > 100 and h > 100
    assert zlib.crc32(data[12:29]) == struct.unpack(">I", data[29:33])[0]
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def host_build(root):
    cfg_path = _write_config(root / "host.toml", "host", root / "out")
    result = run_build(build_config(cfg_path), log=_quiet)
    return cfg_path, result


@pytest.fixture(scope="module")
def jetson_build(root, host_build):
    cfg_path = _write_config(root / "jetson.toml", "jetson", root / "out")
    ckpt = host_build[1].root / "train" / "model.pt"
    cfg = build_config(cfg_path, {"build.checkpoint": str(ckpt)})
    return cfg_path, run_build(cfg, log=_quiet)


def test_host_build_writes_bundle_report_and_plots(host_build):
    cfg_path, result = host_build
    r = result.root
    assert r.name == "x86-host" and result.device == "x86-host"
    assert [s.status for s in result.stages] == ["built"] * len(STAGES)
    b = Bundle.open(r / "bundle", verify=True)
    m = b.manifest
    assert m.device == "x86-host"
    assert m.latency and {e.kind for e in m.latency} == {"measured"}
    assert m.stopping.rule is not None  # calibrated (possibly the full-depth fallback)
    assert m.annotations["calibration"]["by"] == "pipeline build"
    assert set(m.stopping.skip_accuracy) == set(m.skip_configs)
    assert m.stopping.skip_config == m.annotations["calibration"]["skip_config"]
    assert m.deployment.profile == "x86-host" and m.deployment.backend_order
    # norm statistics per skip path (the default): one piece per path, and the monolithic
    # network is the FF..F path's
    assert m.per_path and m.execution["TFT"] == [["stage0.skip"], ["stage1.full.T"],
                                                 ["stage2.skip.TF"]]
    assert len([p for p in m.pieces if p.kind == "stage"]) == 14
    from pipeline.evaluate import MonolithicSession
    from runtime.model import AdaptiveModel

    rt = AdaptiveModel.load(r / "bundle", warn=False)
    x = np.random.default_rng(0).standard_normal((4, *m.input.shape)).astype(np.float32)
    mono = MonolithicSession.like(rt, r / "monolithic.onnx").logits(x)
    assert np.abs(mono - rt.executor.run_exits(x, "FFF")[-1]).max() < 1e-4
    assert np.abs(mono - rt.executor.run_exits(x, "TTF")[-1]).max() > 1e-3
    assert not (r / "host").exists()  # this machine: the bundle itself is measured
    archives = list(r.glob("*.tar.gz"))
    assert [a.name for a in archives] == ["resnet20_adn-x86-host.tar.gz"]

    report = json.loads((r / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert SUMMARY_KEYS <= set(report["summary"])
    s = report["summary"]
    assert 0.0 <= s["adaptive_accuracy"] <= 1.0 and s["mean_latency_ms"] > 0
    assert s["monolithic_mean_latency_ms"] > 0 and 0 < s["macs_fraction"] <= 1.2
    assert report["device"] == {**report["device"], "name": "x86-host", "is_host": True}
    measured = report["results"]["measured"]
    assert measured["n"] == 200 and set(measured["variants"]) == {
        "monolithic", "full_depth", "adaptive", "budget"}
    assert report["results"]["data"]["n"] == 200  # --eval-limit / [evaluate].limit
    names = {c["name"] for c in report["acceptance"]}
    assert names == {"adaptive_speedup", "full_depth_overhead", "budget_tail", "budget_sweep"}
    assert all(isinstance(c["passed"], bool) for c in report["acceptance"])
    # every static sub-network: 2 + 4 + 8 prefixes for 3 stages
    assert len(report["results"]["static"]) == 14
    curves = report["results"]["rule_curves"]
    assert {(p["rule"], p["max_drop"]) for p in curves} == {
        (r_, d) for r_ in ("max_prob", "entropy", "patience", "lookahead") for d in (0.25, 0.5, 1.0)}
    assert len(report["results"]["budgets"]) >= 1
    assert report["finish_on_device"] == []

    md = (r / "report.md").read_text()
    for needle in ("## Key numbers (MEASURED", "## Acceptance", "monolithic ONNX Runtime session",
                   "Static sub-networks", "plots/tradeoff.png"):
        assert needle in md
    assert md.count("**PASS**") + md.count("**FAIL**") == 4
    assert set(report["plots"]) == {"plots/tradeoff.png", "plots/exits.png",
                                    "plots/latency-host.png", "plots/pareto.png",
                                    "plots/budget-sweep.png", "plots/cdf.png"}
    for p in report["plots"]:
        _check_png(r / p)

    # the effective config round-trips
    eff = build_config(r / "build.toml")
    assert isinstance(eff, BuildConfig)
    assert eff.to_dict() == json.loads(json.dumps(report["config"]))
    assert eff.build.device == "x86-host"  # the alias "host" is recorded by its profile name
    assert load_build_file(r / "build.toml")["train"]["max_steps"] == 20
    state = json.loads((r / ".build-state.json").read_text())
    assert set(state["stages"]) == set(STAGES)


def test_jetson_build_ships_device_bundle_and_measures_a_host_bundle(jetson_build):
    _cfg, result = jetson_build
    r = result.root
    assert r.name == "jetson-orin-nano"
    assert result.stages[0].status == "external"  # --checkpoint
    m = Bundle.open(r / "bundle", verify=True).manifest
    assert m.device == "jetson-orin-nano"
    backends = {b for b, _t in m.available_targets()}
    assert {"tensorrt", "onnxruntime", "onnx"} <= backends and "tvm" not in backends
    assert {e.kind for e in m.latency} == {"estimated"}
    assert m.annotations["calibration"]["segment_ms_source"].startswith(
        "latency table (estimated, device jetson-orin-nano, tensorrt)")
    host = Bundle.open(r / "host", verify=True).manifest
    assert host.device == "x86-host" and {e.kind for e in host.latency} == {"measured"}

    from runtime.archive import unpack_bundle

    arc = r / "resnet20_adn-jetson-orin-nano.tar.gz"
    out = unpack_bundle(arc, r.parent / "unpacked")
    assert Bundle.open(out, verify=True).manifest.device == "jetson-orin-nano"

    report = json.loads((r / "report.json").read_text())
    assert report["device"]["is_host"] is False
    est = report["results"]["device_estimate"]
    assert est["kind"] == "estimated" and "tensorrt" in est["backends"]
    steps = "\n".join(report["finish_on_device"])
    assert "scp -r" in steps and "pipeline engines --bundle" in steps
    assert "pipeline profile --bundle" in steps
    md = (r / "report.md").read_text()
    assert "ESTIMATED" in md and "## Finish on the device" in md and "same predictions" in md
    assert "plots/latency-jetson-orin-nano.png" in report["plots"]
    for p in report["plots"]:
        _check_png(r / p)


def test_int8_build_certifies_the_router_against_the_fp32_network(root, host_build):
    """An int8 build (the host build's checkpoint): the router's drop is certified against
    the fp32 monolithic network on the validation split, and the report's drop is against
    the better of full depth and the monolithic session."""
    import numpy as np

    from pipeline.evaluate import MonolithicSession
    from pipeline.runtime_cmd import dataset_for_bundle, split_arrays
    from runtime import AdaptiveModel

    cfg_path = _write_config(root / "int8.toml", "host", root / "out-int8")
    ckpt = host_build[1].root / "train" / "model.pt"
    cfg = build_config(cfg_path, {"build.checkpoint": str(ckpt), "build.precision": "int8"})
    r = run_build(cfg, log=_quiet).root
    m = Bundle.open(r / "bundle").manifest
    assert m.annotations["compile"]["precision"] == "int8"
    model = AdaptiveModel.load(r / "bundle", warn=False)
    _, ds = dataset_for_bundle(m, "digits", None)
    x, y = split_arrays(ds.val, None)
    fp32 = MonolithicSession.like(model, r / "monolithic.onnx").correct(x, y)
    router = m.annotations["calibration"]["router"]
    assert router["reference_accuracy"] == pytest.approx(float(np.mean(fp32)))
    s = json.loads((r / "report.json").read_text())["summary"]
    worst = max(s["full_depth_accuracy"], s["monolithic_accuracy"])
    assert s["accuracy_drop_points"] == pytest.approx(100 * (worst - s["adaptive_accuracy"]))
    assert s["drop_reference"] in ("full depth", "monolithic session")
    # the fp32 build's router has no separate reference
    fp = Bundle.open(host_build[1].root / "bundle").manifest
    assert fp.annotations["calibration"]["router"]["reference_accuracy"] is None


def test_second_build_reuses_every_stage(host_build):
    cfg_path, first = host_build
    again = run_build(build_config(cfg_path), log=_quiet)
    assert [s.status for s in again.stages] == ["reused"] * len(STAGES)
    assert again.report["summary"] == first.report["summary"]


def test_dry_run_prints_the_plan_and_writes_nothing(host_build, root):
    cfg_path, result = host_build
    runner = CliRunner()
    res = runner.invoke(cli, ["build", "--config", str(cfg_path), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "nothing written (--dry-run)" in res.output
    assert all(f"{name:<10} reuse" in res.output for name in STAGES)

    # a changed calibration target: the stages before it are reused, the rest rebuilt
    res = runner.invoke(cli, ["build", "--config", str(cfg_path), "--max-drop", "1", "--dry-run"])
    assert res.exit_code == 0, res.output
    for name in ("train", "export", "compile", "profile"):
        assert f"{name:<10} reuse" in res.output
    assert "calibrate  build     inputs changed" in res.output
    for name in ("package", "evaluate", "report"):
        assert f"{name:<10} build" in res.output

    fresh = root / "never-written"
    res = runner.invoke(cli, ["build", "--config", str(cfg_path), "--out", str(fresh), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "train      build     no previous build" in res.output
    assert not fresh.exists()
    state = json.loads((result.root / ".build-state.json").read_text())
    assert state["stages"]["calibrate"]["input_hash"]  # untouched by the dry runs


def test_bad_device_is_one_clear_line(root):
    res = CliRunner().invoke(cli, ["build", "--device", "no-such-board", "--out", str(root / "x"),
                                   "--dry-run"])
    assert res.exit_code != 0
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "no-such-board" in lines[0]
    assert "Traceback" not in res.output


def test_yaml_config_equals_toml(root):
    yaml = pytest.importorskip("yaml")
    toml_path = _write_config(root / "same.toml", "jetson", root / "out")
    data = load_build_file(toml_path)
    (root / "same.yaml").write_text(yaml.safe_dump(data))
    a, b = build_config(toml_path), build_config(root / "same.yaml")
    assert a == b and a.build.device == "jetson" and a.evaluate.limit == 200
    assert build_config(toml_path, {"evaluate.limit": 7}).evaluate.limit == 7  # options win
    # the TOML writer round-trips every field
    full = build_config(toml_path, {"calibrate.risk_delta": 0.1, "build.backends": ["onnxruntime"]})
    (root / "rt.toml").write_text(full.to_toml("header\n\nline"))
    assert build_config(root / "rt.toml") == full


def test_bad_config_key_is_one_clear_line(root):
    bad = root / "bad.toml"
    bad.write_text("[calibrate]\nmax_dorp = 1.0\n")
    res = CliRunner().invoke(cli, ["build", "--config", str(bad), "--dry-run"])
    assert res.exit_code != 0
    assert res.output.startswith("Error: ") and "max_dorp" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_interrupted_build_leaves_the_old_bundle_and_the_next_build_completes(host_build, root):
    cfg_path, first = host_build
    copy_root = root / "copy"
    shutil.copytree(first.root.parent, copy_root / "out")
    cfg = build_config(cfg_path, {"build.out": str(copy_root / "out"), "calibrate.max_drop": 1.0})
    r = copy_root / "out" / "x86-host"
    before = (r / "bundle" / "manifest.json").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        run_build(cfg, log=_quiet, fail_after="calibrate")
    # the shipped bundle is the previous complete one
    assert (r / "bundle" / "manifest.json").read_bytes() == before
    Bundle.open(r / "bundle", verify=True)
    # what a SIGKILL in the middle of an atomic directory write leaves behind
    stale = r / ".bundle.tmp-0123456789ab"
    (stale / "onnx").mkdir(parents=True)
    (stale / "onnx" / "half.onnx").write_bytes(b"\0" * 10)
    result = run_build(cfg, log=_quiet)
    status = {s.name: s.status for s in result.stages}
    assert status == {"train": "reused", "export": "reused", "compile": "reused",
                      "profile": "reused", "calibrate": "built", "package": "built",
                      "evaluate": "built", "report": "built"}
    assert not stale.exists()
    m = Bundle.open(r / "bundle", verify=True).manifest
    assert m.annotations["calibration"]["max_drop"] == 1.0
    again = run_build(cfg, log=_quiet)
    assert {s.status for s in again.stages} == {"reused"}


@pytest.mark.slow
def test_benchmark_suite_runs_on_a_build(host_build, tmp_path, pipeline_env):
    """`bench/run_all.py --quick` on a real build: every section runs (so a crash there fails
    the suite) and the JSON has a ratio for each. Rough numbers: only that it runs is checked."""
    import subprocess
    import sys

    root = host_build[1].root
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/run_all.py", "--quick", "--build-dir", str(root),
                        "--limit", "40", "--train-steps", "2", "--tvm-pieces", "1",
                        "--threads", "1", "--train-threads", "1", "--json-out", str(out)],
                       cwd=Path(__file__).resolve().parents[1], env=pipeline_env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    results = json.loads(out.read_text())
    assert results, r.stdout[-2000:]


def test_router_bound_on_a_build(host_build):
    """bench/router_bound.py on a real build: per first-stage variant, the cheapest policy
    within the test drop, and cheaper (or equal) when more drop is allowed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "router_bound.py"
    spec = importlib.util.spec_from_file_location("router_bound", path)
    rb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rb)
    root = host_build[1].root
    tight = rb.bound(root, 0.5, 6)
    loose = rb.bound(root, 100.0, 6)
    assert set(loose["starts"]) == {"F", "T"}
    for start, b in loose["starts"].items():
        assert b is not None and b["cost_fraction"] > 0 and b["test_drop_points"] <= 100.0
        t = tight["starts"][start]
        if t is not None:
            assert t["test_drop_points"] <= 0.5 and b["cost_fraction"] <= t["cost_fraction"]


def test_builds_for_several_devices_share_one_training(root, tmp_path):
    """`pipeline build --device host,raspberry-pi-5`: the second device reuses the first's
    training (cached under OUT/.train-cache by training config and data), and a later build for
    a third device with the same training does too."""
    cfg_path = _write_config(tmp_path / "multi.toml", "host", tmp_path / "out")
    r = CliRunner().invoke(cli, ["build", "--config", str(cfg_path), "--device",
                                 "host,raspberry-pi-5", "--backends", "onnxruntime"])
    assert r.exit_code == 0, r.output
    assert "=== device 2 of 2: raspberry-pi-5 ===" in r.output
    assert r.output.count("reusing the training of") == 1
    caches = list((tmp_path / "out" / ".train-cache").iterdir())
    assert len(caches) == 1 and (caches[0] / "model.pt").is_file()
    host_ckpt = tmp_path / "out" / "x86-host" / "train" / "model.pt"
    pi_ckpt = tmp_path / "out" / "raspberry-pi-5" / "train" / "model.pt"
    assert host_ckpt.read_bytes() == pi_ckpt.read_bytes()
    pi = Bundle.open(tmp_path / "out" / "raspberry-pi-5" / "bundle", verify=True).manifest
    assert pi.device == "raspberry-pi-5" and pi.deployment.target("onnxruntime", "aarch64-cpu")
    # another device later, another training config: trained anew, cached beside the first
    cfg2 = build_config(cfg_path, {"build.device": "jetson", "build.backends": ["onnxruntime"],
                                   "train.max_steps": 10})
    res = run_build(cfg2, log=_quiet)
    assert res.stages[0].status == "built"
    assert len(list((tmp_path / "out" / ".train-cache").iterdir())) == 2
