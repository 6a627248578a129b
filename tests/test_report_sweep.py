"""The measured budget sweep, the latency CDF and the report's Pareto / sweep / CDF plots, on a real
tiny build (resnet20_adn on scikit-learn's 8x8 digits, 20 training steps, this machine, quick
profiling): pipeline/evaluate.py (sweep_budgets, measure_budget_sweep, best_static_fits,
budget_sweep, latency_cdf), pipeline/report.py (sweep table, acceptance line) and
pipeline/report_plots.py (plot_pareto, plot_budget_sweep, plot_latency_cdf).

No expected numbers: the checks are on structure and on what must hold for any measurement.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")

from pipeline import evaluate as ev  # noqa: E402
from pipeline.build import run_build  # noqa: E402
from pipeline.build_config import build_config  # noqa: E402
from pipeline.report import sweep_verdicts  # noqa: E402
from pipeline.report_plots import plot_budget_sweep, plot_latency_cdf, plot_pareto  # noqa: E402
from runtime.latency import cumulative_table  # noqa: E402
from runtime.model import AdaptiveModel  # noqa: E402

CONFIG = """\
[build]
device = "host"
out = "{out}"
threads = 1
archive = false

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
limit = 120
measure_limit = 60
warmup = 3
batch_threads = 1
"""

SWEEP_ROW_KEYS = {"budget_ms", "n", "accuracy", "miss_rate", "misses", "deadline_flagged",
                  "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "mean_depth",
                  "exit_histogram", "skip_configs"}


def _check_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    w, h = struct.unpack(">II", data[16:24])
    assert w > 100 and h > 100
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    cfg_path = root / "host.toml"
    cfg_path.write_text(CONFIG.format(out=root / "out"))
    return run_build(build_config(cfg_path), log=lambda _m: None)


@pytest.fixture(scope="module")
def results(build) -> dict:
    return json.loads((build.root / "work" / "evaluate" / "results.json").read_text())


@pytest.fixture(scope="module")
def model(build) -> AdaptiveModel:
    return AdaptiveModel.load(build.root / "bundle", warn=False)


@pytest.fixture(scope="module")
def table(model) -> dict:
    return cumulative_table(model.manifest, model.latency_device, model.table.backend, 1)


@pytest.fixture(scope="module")
def test_images(model):
    from pipeline.runtime_cmd import dataset_for_bundle, split_arrays

    _name, ds = dataset_for_bundle(model.manifest, "digits", None)
    return split_arrays(ds.test, 20)


def test_sweep_budgets_span_first_exit_p50_to_full_depth_p99(table):
    budgets = ev.sweep_budgets(table, count=8)
    S = max(len(c) for c in table)
    lo = min(rows[0]["p50"] for rows in table.values())
    hi = table["F" * S][-1]["p99"]
    assert len(budgets) == 8
    assert all(a < b for a, b in zip(budgets, budgets[1:]))
    assert budgets[0] == pytest.approx(lo, rel=1e-3)
    if hi > lo:
        assert budgets[-1] == pytest.approx(hi, rel=1e-3)
        ratios = [b / a for a, b in zip(budgets, budgets[1:])]  # geometric: equal ratios
        assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=5e-3)
    with pytest.raises(ValueError):
        ev.sweep_budgets(table, count=1)


def test_measure_budget_sweep_on_a_real_model(model, table, test_images, build):
    x, y = test_images
    budgets = ev.sweep_budgets(table, count=8)
    mono = ev.MonolithicSession.like(model, build.root / "monolithic.onnx")
    msgs: list[str] = []
    rows = ev.measure_budget_sweep(model, x, y, list(reversed(budgets)), warmup=2,
                                   progress=msgs.append, mono=mono)
    assert msgs
    assert [r["budget_ms"] for r in rows] == budgets  # sorted, one row per budget
    S = model.stages
    for r in rows:
        assert SWEEP_ROW_KEYS <= set(r)
        assert r["n"] == len(y) == 20
        assert 0.0 <= r["miss_rate"] <= 1.0 and 0.0 <= r["accuracy"] <= 1.0
        assert r["misses"] == round(r["miss_rate"] * r["n"])
        assert 0 <= r["deadline_flagged"] <= r["n"]
        assert 1.0 <= r["mean_depth"] <= S
        assert sum(r["exit_histogram"]) == r["n"] and len(r["exit_histogram"]) == S
        assert sum(r["skip_configs"].values()) == r["n"]
        assert r["p50_ms"] <= r["p99_ms"] <= r["max_ms"] and r["mean_ms"] > 0
        # a call over the budget is over it: the miss count agrees with the tail
        assert (r["misses"] > 0) == (r["max_ms"] > r["budget_ms"])
        assert 0.0 <= r["monolithic_accuracy"] <= 1.0 and r["monolithic_mean_ms"] > 0
        assert r["latency_ratio_vs_monolithic"] == pytest.approx(
            r["mean_ms"] / r["monolithic_mean_ms"])
    # every row measured the same monolithic run
    assert len({r["monolithic_mean_ms"] for r in rows}) == 1
    # without the monolithic session, no monolithic keys
    plain = ev.measure_budget_sweep(model, x[:5], y[:5], budgets[:2], warmup=0)
    assert len(plain) == 2 and "monolithic_mean_ms" not in plain[0]


def test_best_static_fits_is_the_most_accurate_that_fits(results, table):
    static = results["static"]
    for b in ev.sweep_budgets(table, count=8):
        best = ev.best_static_fits(static, b)
        fits = [p for p in static if p["p99_latency_ms"] <= b]
        if not fits:
            assert best is None
            continue
        assert best["p99_latency_ms"] <= b
        assert best["accuracy"] == max(p["accuracy"] for p in fits)


def test_build_results_hold_the_sweep_and_the_cdf(results):
    sweep = results["budget_sweep"]
    assert sweep["kind"] == "measured" and sweep["spacing"] == "geometric"
    assert sweep["n"] == 60  # measure_limit
    assert sweep["with_monolithic"] and "MEASURED end to end" in sweep["static_latency"]
    pts = sweep["points"]
    assert len(pts) == len(sweep["budgets_ms"]) >= 2
    assert [p["budget_ms"] for p in pts] == sorted(sweep["budgets_ms"])
    for p in pts:
        assert 0.0 <= p["miss_rate"] <= 1.0 and p["n"] == 60
        best = p["best_static"]
        assert best is None or 0 < best["measured_p99_ms"] <= p["budget_ms"]
    assert results["budgets"]  # the simulated budgets are still there
    meas = results["measured"]
    cdf = meas["cdf"]
    q = cdf["percentiles"]
    assert q[0] == 0.0 and q[-1] == 100.0 and q == sorted(q) and 99.9 in q
    assert set(cdf["ms"]) == set(meas["variants"])
    for name, ms in cdf["ms"].items():
        v = meas["variants"][name]
        assert len(ms) == len(q)
        assert all(a <= b for a, b in zip(ms, ms[1:]))
        assert ms[-1] == pytest.approx(v["max_ms"], abs=1e-3)
        assert ms[q.index(50.0)] == pytest.approx(v["p50_ms"], abs=1e-3)


def test_report_has_the_sweep_table_plots_and_acceptance_line(build, results):
    report = json.loads((build.root / "report.json").read_text())
    md = (build.root / "report.md").read_text()
    for name in ("pareto.png", "budget-sweep.png", "cdf.png"):
        assert f"plots/{name}" in report["plots"]
        assert f"](plots/{name})" in md
        _check_png(build.root / "plots" / name)
    assert "## Budget sweep (MEASURED" in md
    for p in results["budget_sweep"]["points"]:
        assert f"| {p['budget_ms']:g} |" in md
    checks = {c["name"]: c for c in report["acceptance"]}
    assert {"adaptive_speedup", "full_depth_overhead", "budget_tail", "budget_sweep"} <= set(checks)
    c = checks["budget_sweep"]
    verdicts = c["value"]["budgets"]
    assert len(verdicts) == len(results["budget_sweep"]["points"])
    feasible = [v for v in verdicts if v["feasible"]]
    assert c["passed"] == (bool(feasible) and all(v["passed"] for v in feasible))
    assert ("PASS" if c["passed"] else "FAIL") + "** " + c["target"] in md


def test_sweep_verdicts_follow_the_targets(results):
    sweep = results["budget_sweep"]
    for v, p in zip(sweep_verdicts(sweep), sweep["points"]):
        assert v["miss_ok"] == (p["miss_rate"] <= 0.01)
        if p["best_static"] is None:
            assert v["passed"] is None and not v["feasible"]
        else:
            gap = 100 * (p["accuracy"] - p["best_static"]["accuracy"])
            assert v["accuracy_ok"] == (gap >= -0.3 - 1e-9)
            assert v["passed"] == (v["miss_ok"] and v["accuracy_ok"])
    # stricter targets never pass more budgets
    strict = sweep_verdicts(sweep, {"sweep_max_miss_rate": 0.0, "sweep_static_margin_points": 0.0})
    assert sum(bool(v["passed"]) for v in strict) <= sum(
        bool(v["passed"]) for v in sweep_verdicts(sweep))


def test_plot_functions_write_pngs_from_build_results(results, tmp_path):
    for fn, name in ((plot_pareto, "pareto.png"), (plot_budget_sweep, "sweep.png"),
                     (plot_latency_cdf, "cdf.png")):
        out = fn(results, tmp_path / name, title="t")
        assert Path(out).stat().st_size > 1000
        _check_png(out)
    with pytest.raises(ValueError):
        plot_budget_sweep({}, tmp_path / "none.png")
    with pytest.raises(ValueError):
        plot_latency_cdf({"measured": {}}, tmp_path / "none.png")


def test_latency_cdf_is_exact_at_its_percentiles():
    rng = np.random.default_rng(0)
    ms = rng.gamma(2.0, 0.1, size=500)
    cdf = ev.latency_cdf(ms)
    assert len(cdf) == len(ev.CDF_PERCENTILES)
    for q, v in zip(ev.CDF_PERCENTILES, cdf):
        assert v == pytest.approx(float(np.percentile(ms, q)), abs=6e-4)
    assert ev.latency_cdf([]) == [] and not math.isnan(cdf[0])
