"""Latency profiler: measured tables (ONNX Runtime here), roofline estimates, manifest, plot, CLI.

Timings on the shared 2-core test machines are noisy: these tests assert structure, kinds,
provenance and monotonicity, never absolute speed. Bundles are built once per module from an
untrained resnet20_adn at 28x28 (torch/train/export are used only to BUILD the fixture).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from devices.latency import (STATS, cumulative_table, estimate_bundle,  # noqa: E402
                             p95_relative_se, segment_costs_ms, side_by_side_text, summarize,
                             write_latency)
from devices.plots import default_plot_path, plot_latency  # noqa: E402
from devices.profiler import (MeasureSettings, ProfileResult, measure_items,  # noqa: E402
                              profile_bundle, stopping_probe)
from devices.registry import list_profiles  # noqa: E402
from pipeline.profile_cmd import parse_batches  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from runtime.errors import ManifestError  # noqa: E402
from runtime.manifest import load_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL, DATA = "resnet20_adn", "synthetic:chans=1,size=28"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------ fixtures

def _make_checkpoint(path: Path) -> Path:
    """A checkpoint laid out like Trainer._state (fresh weights, eval None)."""
    from train.checkpoint import save_checkpoint
    from train.data import load_dataset
    from train.models import create_model

    data = load_dataset(DATA)
    torch.manual_seed(0)
    model = create_model(MODEL, num_classes=data.num_classes, in_chans=data.in_chans,
                         img_size=data.img_size)
    state = {"model_name": MODEL, "model_config": model.model_config(),
             "model": model.state_dict(), "ema": None, "dataset": data.info(), "eval": None,
             "config": {"data": DATA}}
    return save_checkpoint(state, path)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(portable bundle, x86-host device bundle with onnxruntime artifacts)."""
    from export.compile import compile_bundle
    from export.portable import export_checkpoint

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("profiler")
        ckpt = _make_checkpoint(root / "model.pt")
        portable = export_checkpoint(ckpt, root / "portable", parity_samples=4, progress=None)
        device = compile_bundle(portable, "x86-host", backends=["onnxruntime"],
                                out_dir=root / "host", progress=None)
    finally:
        torch.set_num_threads(before)
    return Path(portable), Path(device)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def bundle(built, tmp_path) -> Path:
    """A fresh copy of the device bundle (tests write into it)."""
    return _copy(built[1], tmp_path / "b-host")


@pytest.fixture(scope="module")
def measured(built, tmp_path_factory) -> tuple[Path, ProfileResult]:
    """A device bundle profiled once (quick) and written; shared read-only by several tests."""
    b = _copy(built[1], tmp_path_factory.mktemp("measured") / "b-host")
    result = profile_bundle(b, quick=True, progress=None)
    write_latency(b, result.entries)
    return b, result


def _foreign_arch_profile() -> str:
    from devices.host import machine_arch

    here = machine_arch()
    for p in list_profiles():
        if p.arch != here:
            return p.name
    pytest.skip("no shipped profile of another architecture")


# ------------------------------------------------------------------------ measured table

def test_measured_table_covers_every_piece_and_exit_and_grows_with_exit(measured):
    b, r = measured
    m = Bundle.open(b).manifest
    S, configs = m.stages, m.skip_configs
    used = sorted({pid for segs in m.execution.values() for seg in segs for pid in seg})
    assert (r.device, r.backend, r.target, r.kind) == ("x86-host", "onnxruntime", "x86_64-cpu",
                                                      "measured")
    assert sorted(r.pieces[1]) == used and sorted(r.cumulative[1]) == sorted(configs)
    for cfg in configs:
        cum, sums = r.cumulative[1][cfg], r.sum_of_pieces[1][cfg]
        assert len(cum) == len(sums) == S
        for k in range(S):
            s = cum[k]
            assert s.n >= r.settings.min_iters
            assert 0 < s.p50 <= s.p90 <= s.p95 <= s.p99
            assert math.isclose(r.overhead_ms(1, cfg, k), s.p50 - sums[k])
        for k in range(S - 1):
            # sum of piece medians: strictly more pieces -> strictly more time
            assert sums[k + 1] > sums[k] > 0
            # the chain is timed from one start, so every sample (hence every percentile)
            # of exit k+1 >= exit k; the 10 % slack only guards against future changes
            for st in STATS:
                assert cum[k + 1].get(st) >= 0.9 * cum[k].get(st), (cfg, k, st)
            assert cum[k + 1].p50 >= cum[k].p50
    # the same, read back from the manifest
    for cfg, rows in cumulative_table(m, "x86-host", "onnxruntime", 1).items():
        assert all(rows[k + 1]["p50"] >= rows[k]["p50"] for k in range(S - 1)), cfg


def test_measured_entries_have_fingerprints_and_the_bundle_still_verifies(measured, built):
    b, r = measured
    bundle = Bundle.open(b, verify=True)  # checksums unaffected: only manifest.json changed
    m = bundle.manifest
    assert bundle.unlisted_files() == []
    load_manifest(b / "manifest.json").validate()
    group = m.latency_group("x86-host", "onnxruntime", 1)
    S = m.stages
    assert len(group) == len(r.pieces[1]) + len(m.skip_configs) * S == len(r.entries)
    assert m.latency_kind("x86-host", "onnxruntime", 1) == "measured"
    for e in group:
        assert e.kind == "measured" and e.target == "x86_64-cpu"
        fp = e.fingerprint
        for key in ("arch", "cpu_model", "cpu_cores", "numpy", "onnxruntime", "python"):
            assert key in fp, key
        meas = fp["measurement"]
        assert meas["samples"] >= 30 and meas["quick"] is True
        if e.piece is not None:
            assert meas["artifact_sha256"] == m.piece(e.piece).find_artifacts(
                "onnxruntime")[0].sha256
        else:
            assert "sum_of_piece_p50_ms" in meas and "overhead_p50_ms" in meas
    # the artifacts are byte-identical to the freshly compiled bundle
    orig = Bundle.open(built[1]).manifest
    assert [a.sha256 for a in m.artifact_files()] == [a.sha256 for a in orig.artifact_files()]
    text = r.to_text()
    assert "MEASURED latency" in text and "overhead" in text and "stage0.full" in text


def test_portable_bundle_is_measured_with_onnxruntime_as_target_portable(built, tmp_path):
    b = _copy(built[0], tmp_path / "portable")
    r = profile_bundle(b, quick=True, batches=(2,), progress=None)
    assert (r.device, r.backend, r.target) == ("x86-host", "onnxruntime", "portable")
    assert any("portable ONNX" in n for n in r.notes)
    write_latency(b, r.entries)
    m = Bundle.open(b, verify=True).manifest
    assert m.latency_kind("x86-host", "onnxruntime", 2) == "measured"
    assert {e.batch for e in m.latency} == {2}


# --------------------------------------------------------------- estimates vs measurements

def test_estimates_grow_with_exit_and_only_the_matching_device_is_replaced(bundle):
    S = Bundle.open(bundle).manifest.stages
    jetson = estimate_bundle(bundle, "jetson-orin-nano", backend="tensorrt", batches=(1, 4))
    host_est = estimate_bundle(bundle, "x86-host", backend="onnxruntime")
    for e in jetson + host_est:
        assert e.kind == "estimated"
        assert e.p50_ms == e.p90_ms == e.p95_ms == e.p99_ms == e.mean_ms > 0
    assert {e.target for e in jetson} == {"roofline"}  # the bundle has no jetson artifacts
    assert {e.target for e in host_est} == {"x86_64-cpu"}  # compiled for this very profile
    m0 = Bundle.open(bundle).manifest
    for batch in (1, 4):
        g = [e for e in jetson if e.batch == batch]
        cum = {(e.skip_config, e.exit): e.p50_ms for e in g if e.exit is not None}
        for cfg in m0.skip_configs:
            assert all(cum[cfg, k + 1] > cum[cfg, k] for k in range(S - 1)), cfg
        pieces = {e.piece: e for e in g if e.piece is not None}
        assert pieces["stage0.full"].fingerprint["precision"] == "fp16"
        assert pieces["stage0.full"].fingerprint["macs"] == m0.piece("stage0.full").macs
    # batch 4 costs more than batch 1 (compute scales with the batch)
    e1 = {(e.piece, e.exit, e.skip_config): e.p50_ms for e in jetson if e.batch == 1}
    e4 = {(e.piece, e.exit, e.skip_config): e.p50_ms for e in jetson if e.batch == 4}
    assert all(e4[k] > e1[k] for k in e1)

    write_latency(bundle, jetson + host_est)
    m = Bundle.open(bundle, verify=True).manifest
    assert m.latency_kind("x86-host", "onnxruntime", 1) == "estimated"
    before_jetson = [e.to_dict() for e in m.latency if e.device == "jetson-orin-nano"]

    r = profile_bundle(bundle, quick=True, progress=None)
    assert r.device == "x86-host"
    write_latency(bundle, r.entries)
    m = Bundle.open(bundle, verify=True).manifest
    # the host's estimate was replaced wholesale by measurements...
    assert m.latency_kind("x86-host", "onnxruntime", 1) == "measured"
    assert all(e.kind == "measured" for e in m.latency_group("x86-host", "onnxruntime", 1))
    # ...and the jetson estimates are untouched
    assert [e.to_dict() for e in m.latency if e.device == "jetson-orin-nano"] == before_jetson
    assert m.latency_kind("jetson-orin-nano", "tensorrt", 1) == "estimated"
    text = side_by_side_text(m, [("x86-host", "onnxruntime", 1),
                                 ("jetson-orin-nano", "tensorrt", 1)])
    assert "MEASURED" in text and "ESTIMATED" in text


def test_kinds_are_never_mixed_and_estimates_do_not_replace_measurements(measured, tmp_path):
    b = _copy(measured[0], tmp_path / "b")
    path = b / "manifest.json"
    before = path.read_bytes()
    est = estimate_bundle(b, "x86-host", backend="onnxruntime")
    with pytest.raises(ManifestError, match="already measured"):
        write_latency(b, est)
    mixed = est[:3] + [e for e in measured[1].entries][:3]
    with pytest.raises(ManifestError, match="mix 'measured' and 'estimated'"):
        write_latency(b, mixed)
    assert path.read_bytes() == before  # nothing written on refusal
    write_latency(b, est, allow_downgrade=True)  # explicit downgrade is possible
    assert Bundle.open(b).manifest.latency_kind("x86-host", "onnxruntime", 1) == "estimated"


def test_refuses_measured_tables_for_another_architecture_or_stale_artifacts(measured, tmp_path):
    import dataclasses

    b = _copy(measured[0], tmp_path / "b")
    before = (b / "manifest.json").read_bytes()
    foreign = _foreign_arch_profile()
    with pytest.raises(ValueError, match="refusing to record MEASURED latency") as ei:
        profile_bundle(b, device=foreign, quick=True, progress=None)
    assert foreign in str(ei.value)
    relabeled = [dataclasses.replace(e, device=foreign) for e in measured[1].entries]
    with pytest.raises(ValueError, match="measured on a"):
        write_latency(b, relabeled)
    stale = []
    for e in measured[1].entries:
        if e.piece == "stage0.full":
            fp = json.loads(json.dumps(e.fingerprint))
            fp["measurement"]["artifact_sha256"] = "0" * 64
            e = dataclasses.replace(e, fingerprint=fp)
        stale.append(e)
    with pytest.raises(ValueError, match="changed since it was measured"):
        write_latency(b, stale)
    assert (b / "manifest.json").read_bytes() == before


def test_segment_costs_from_measured_and_estimated_tables(measured, tmp_path):
    b, r = measured
    m = Bundle.open(b).manifest
    for cfg in m.skip_configs:
        costs = segment_costs_ms(m, "x86-host", "onnxruntime", cfg)
        assert len(costs) == m.stages and all(c >= 0 for c in costs)
        assert math.isclose(sum(costs), r.cumulative[1][cfg][-1].p50, rel_tol=1e-9)
        p95 = segment_costs_ms(m, "x86-host", "onnxruntime", cfg, stat="p95")
        assert math.isclose(sum(p95), r.cumulative[1][cfg][-1].p95, rel_tol=1e-9)
    est = estimate_bundle(b, "jetson-orin-nano", backend="tensorrt")
    m2 = m.copy()
    m2.replace_latency(est)
    piece = {e.piece: e.p50_ms for e in est if e.piece is not None}
    for cfg in m2.skip_configs:
        want = [sum(piece[p] for p in seg) for seg in m2.execution[cfg]]
        got = segment_costs_ms(m2, "jetson-orin-nano", "tensorrt", cfg)
        assert np.allclose(got, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(LookupError, match="no latency table"):
        segment_costs_ms(m, "jetson-orin-nano", "onnxruntime", "FFF")
    with pytest.raises(ValueError):
        segment_costs_ms(m, "x86-host", "onnxruntime", "FFF", stat="p42")
    with pytest.raises(ValueError):
        segment_costs_ms(m, "x86-host", "onnxruntime", "XYZ")


# ------------------------------------------------------------------------------------ plot

def test_plot_is_a_png_outside_the_bundle(measured, tmp_path):
    import matplotlib.image

    b, _ = measured
    m = Bundle.open(b).manifest
    default = default_plot_path(b)
    assert default.parent == b.resolve().parent and default.name == "b-host.latency.png"
    out = plot_latency(m, tmp_path / "latency.png", [("x86-host", "onnxruntime", 1)])
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    img = matplotlib.image.imread(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left no temp file
    assert Bundle.open(b).unlisted_files() == []


# ------------------------------------------------------------------------------------- CLI

def test_cli_measures_prints_a_table_writes_manifest_and_plot(bundle):
    from pipeline.cli import cli

    res = CliRunner().invoke(cli, ["profile", "--bundle", str(bundle), "--quick",
                                   "--batch", "1,2"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "MEASURED latency" in out and "batch 2" in out
    assert "config  exit" in out and "stage2.skip" in out and "wrote 60 measured" in out
    m = Bundle.open(bundle, verify=True).manifest
    assert {(e.device, e.backend, e.batch, e.kind) for e in m.latency} == {
        ("x86-host", "onnxruntime", 1, "measured"), ("x86-host", "onnxruntime", 2, "measured")}
    png = default_plot_path(bundle)
    assert png.read_bytes().startswith(PNG_MAGIC) and f"plot: {png}" in out
    assert Bundle.open(bundle).unlisted_files() == []


def test_cli_estimate_only_then_compare(bundle):
    from pipeline.cli import cli

    runner = CliRunner()
    res = runner.invoke(cli, ["profile", "-b", str(bundle), "--estimate-only", "--device",
                              "jetson", "--backend", "tensorrt", "--no-plot"])
    assert res.exit_code == 0, res.output
    assert "ESTIMATED (roofline) latency" in res.output and "estimate ms" in res.output
    m = Bundle.open(bundle, verify=True).manifest
    assert m.latency_kind("jetson-orin-nano", "tensorrt", 1) == "estimated"
    assert not default_plot_path(bundle).exists()
    res = runner.invoke(cli, ["profile", "-b", str(bundle), "--quick", "--no-plot"])
    assert res.exit_code == 0, res.output
    assert "next to the bundle's other latency tables" in res.output
    assert "ESTIMATED" in res.output and "MEASURED" in res.output
    # estimating over the measured host table is refused in one line
    res = runner.invoke(cli, ["profile", "-b", str(bundle), "--estimate-only", "--device",
                              "host", "--no-plot"])
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "already measured" in lines[0]


@pytest.mark.parametrize("args, expect", [
    (["--bundle", "{missing}"], "bundle directory not found"),
    (["--bundle", "{bundle}", "--device", "no-such-device"], "unknown device profile"),
    (["--bundle", "{bundle}", "--device", "{foreign}"], "refusing to record MEASURED"),
    (["--bundle", "{portable}", "--estimate-only"], "pass --device"),
    (["--bundle", "{bundle}", "--backend", "tensorrt"], "no artifacts for tensorrt"),
])
def test_cli_bad_input_is_one_clear_line(built, tmp_path, args, expect):
    from pipeline.cli import cli

    subst = {"missing": str(tmp_path / "nope"), "bundle": str(built[1]),
             "portable": str(built[0]), "foreign": "{foreign}"}
    if "{foreign}" in args:
        subst["foreign"] = _foreign_arch_profile()
    argv = ["profile", *(a.format(**subst) for a in args), "--quick", "--no-plot"]
    if "--estimate-only" in argv:
        argv.remove("--quick")
    before = (built[1] / "manifest.json").read_bytes()
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    assert lines[0].startswith("Error:") and expect in lines[0]
    assert (built[1] / "manifest.json").read_bytes() == before


def test_cli_usage_errors():
    from pipeline.profile_cmd import profile

    res = CliRunner().invoke(profile, ["--bundle", "x", "--batch", "0"])
    assert res.exit_code == 2 and "--batch" in res.output
    assert parse_batches("1, 8,32,8") == [1, 8, 32]
    with pytest.raises(ValueError):
        parse_batches("1,x")


# ------------------------------------------------------------------ statistics and loop

def test_summary_statistics_match_numpy_and_p95_error_shrinks_with_samples():
    rng = np.random.default_rng(0)
    xs = rng.lognormal(0.0, 0.5, 1000)
    s = summarize(xs.tolist())
    assert s.n == 1000
    for name, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
        assert math.isclose(getattr(s, name), float(np.percentile(xs, q)), rel_tol=1e-12)
    assert math.isclose(s.mean, float(xs.mean()), rel_tol=1e-12)
    small = p95_relative_se(sorted(xs[:100].tolist()))
    large = p95_relative_se(sorted(xs.tolist()))
    assert 0 < large < small
    assert p95_relative_se([1.0] * 50) == 0.0 and p95_relative_se([1.0]) == math.inf
    with pytest.raises(ValueError):
        summarize([])


def test_measure_loop_warms_up_and_stops_when_stable():
    calls = {"a": 0, "b": 0}

    def const(name, values):
        def call():
            calls[name] += 1
            return values
        return call

    settings = MeasureSettings(warmup_s=0.0, warmup_calls=7, min_iters=20, max_iters=1000,
                               target_rse=0.01, max_seconds=5.0, block=5)
    out = measure_items([("a", const("a", (1.0,))), ("b", const("b", (1.0, 2.0, 3.0)))],
                        settings)
    for name in ("a", "b"):
        stats, info = out[name]
        assert info["warmup_calls"] == 7 and info["converged"] is True
        assert info["samples"] == 20 and calls[name] == 27  # constant: stable at min_iters
    assert [s.p50 for s in out["b"][0]] == [1.0, 2.0, 3.0]
    noisy = iter(np.random.default_rng(1).exponential(1.0, 10_000))
    capped = MeasureSettings(warmup_s=0.0, warmup_calls=0, min_iters=10, max_iters=50,
                             target_rse=1e-9, max_seconds=5.0, block=10)
    stats, info = measure_items([("n", lambda: (next(noisy),))], capped)["n"]
    assert info["samples"] == 50 and info["converged"] is False
    with pytest.raises(ValueError):
        MeasureSettings(min_iters=0)


def test_stopping_probe():
    logits = np.array([[10.0, 0.0, 0.0], [0.0, 0.1, 0.0]], dtype=np.float32)
    assert stopping_probe(logits[:1]) is True and stopping_probe(logits) is False


# ------------------------------------------------------------------------ import hygiene

def test_profiler_modules_never_import_torch_train_export_or_matplotlib():
    code = textwrap.dedent("""
        import sys
        import devices.profiler, devices.latency, devices.plots, pipeline.profile_cmd
        bad = sorted(m for m in sys.modules if m.split(".")[0] in
                     ("torch", "tvm", "train", "export", "tensorrt", "onnx", "matplotlib"))
        print(bad)
        sys.exit(1 if bad else 0)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_timing_keeps_the_existing_heap_out_of_the_cyclic_gc():
    """measure_items and run_interleaved time with the objects that existed before frozen
    (gc.freeze) and leave the collector as they found it, also after an error."""
    import gc

    from devices.profiler import frozen_heap, measure_items
    from pipeline.evaluate import run_interleaved

    heap = [{"i": i} for i in range(50_000)]
    assert gc.get_freeze_count() == 0
    seen: list[int] = []

    def call():
        seen.append(gc.get_freeze_count())
        return (0.001,)

    from devices.profiler import MeasureSettings
    measure_items([("a", call)], MeasureSettings(warmup_s=0.0, warmup_calls=1, min_iters=3,
                                                max_iters=3, max_seconds=1.0, block=1))
    assert min(seen) >= len(heap) and gc.get_freeze_count() == 0
    seen.clear()
    run_interleaved([lambda img: seen.append(gc.get_freeze_count()) or 0],
                    np.zeros((3, 2, 2, 1), dtype=np.uint8))
    assert len(seen) == 3 and min(seen) >= len(heap) and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with frozen_heap():
            raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0
    with frozen_heap():  # nested (bench/run_all around run_interleaved): still frozen after
        with frozen_heap():
            pass
        assert gc.get_freeze_count() >= len(heap)
    assert gc.get_freeze_count() == 0
