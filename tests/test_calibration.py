"""Calibration of stopping rules (export/calibration.py): targets met on HELD-OUT data of a
synthetic early-exit problem, the risk-controlled (Learn then Test) guarantee over repeated
calibrations, the device dependence of a calibrated look-ahead rule, the p-values, and errors."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from export.calibration import (CalibrationResult, binom_cdf, binom_sf, calibrate,
                                 drop_p_value, drop_upper_bound, fit_gain_tables, hb_p_value)
from runtime.manifest import Stopping
from runtime.rules import LookAheadRule, StopContext, make_rule, rule_from_stopping
from export.simulate import simulate

SEG = [2.0, 3.0, 3.0, 4.0]          # ms per segment on "device A"


def synthetic(n: int, seed: int, *, S: int = 4, C: int = 10,
              strength=(1.0, 1.7, 2.2, 2.5), rho: float = 0.85, weak: int | None = None):
    """A realistic early-exit problem: per-sample easiness q (gamma), class noise that evolves
    slowly with depth (AR(1), so exits mostly agree), and a true-class signal that grows with
    depth with diminishing returns. Exit accuracies ~ 49 / 68 / 76 / 79 %, confidences roughly
    calibrated. ``weak`` halves one exit's signal (a non-monotone problem)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    q = rng.gamma(2.0, 1.0, n)
    z = rng.standard_normal((n, C))
    out = np.empty((S, n, C))
    for k in range(S):
        if k:
            z = rho * z + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, C))
        logits = 1.3 * z
        logits[np.arange(n), y] += strength[k] * q * (0.5 if k == weak else 1.0)
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        out[k] = e / e.sum(axis=1, keepdims=True)
    return out, y


@pytest.fixture(scope="module")
def cal():
    return synthetic(6000, seed=1)


@pytest.fixture(scope="module")
def test_set():
    return synthetic(40000, seed=2)


def held_out(result: CalibrationResult, probs, labels, seg=SEG):
    """(accuracy drop in points vs full depth, mean latency) of the result's rule on new data."""
    sim = simulate(make_rule(result.rule_name, result.params), probs, labels, StopContext(seg))
    full = float((probs[-1].argmax(axis=1) == labels).mean())
    return 100 * (full - sim.accuracy), sim.mean_latency_ms


# ------------------------------------------------------------------------------------------------
# point-estimate targets, checked on held-out data
# ------------------------------------------------------------------------------------------------

RULE_NAMES = ["max_prob", "entropy", "patience", "lookahead"]


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_max_drop_met_on_held_out_data(rule_name, cal, test_set):
    max_drop = 1.0
    res = calibrate(rule_name, *cal, SEG, max_drop=max_drop)
    assert res.rule_name == rule_name
    drop, lat = held_out(res, *test_set)
    assert drop <= max_drop + 0.5, (drop, lat)          # 0.5-point slack for sampling noise
    assert lat < 0.85 * sum(SEG)                         # and it does exit early
    # the reported metrics are the returned rule's on the calibration data
    sim = simulate(res.rule(), *cal, StopContext(SEG))
    assert res.val_accuracy == pytest.approx(sim.accuracy)
    assert res.mean_latency_ms == pytest.approx(sim.mean_latency_ms)
    assert res.exit_histogram == sim.exit_histogram and res.mean_exit == pytest.approx(
        sim.mean_exit)
    assert res.full_depth_accuracy == pytest.approx((cal[0][-1].argmax(1) == cal[1]).mean())
    assert res.target["max_drop"] == max_drop and res.details["method"] == "cross-fit"
    json.dumps(res.to_dict(), allow_nan=False)           # everything JSON-able


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_mean_budget_met_on_held_out_data(rule_name, cal, test_set):
    budget = 6.5
    res = calibrate(rule_name, *cal, SEG, mean_budget_ms=budget)
    drop, lat = held_out(res, *test_set)
    assert lat <= budget * 1.03, (drop, lat)
    assert res.mean_latency_ms <= budget + 1e-9
    assert lat > 0.8 * budget                            # uses the budget, not far below it
    assert res.details["target_met"] is True


def test_tighter_targets_cost_latency(cal):
    lats = [calibrate("lookahead", *cal, SEG, max_drop=d).mean_latency_ms for d in (0.0, 1.0, 4.0)]
    assert lats[0] >= lats[1] >= lats[2] and lats[0] > lats[2]


def test_shared_threshold_option_and_per_exit_is_not_worse(cal, test_set):
    shared = calibrate("max_prob", *cal, SEG, max_drop=1.0, options={"shared": True})
    assert isinstance(shared.params["thresholds"], float)
    per_exit = calibrate("max_prob", *cal, SEG, max_drop=1.0)
    assert isinstance(per_exit.params["thresholds"], list)
    d_s, l_s = held_out(shared, *test_set)
    d_p, l_p = held_out(per_exit, *test_set)
    assert d_s <= 1.5 and d_p <= 1.5
    assert l_p <= l_s + 0.2


def test_one_step_lookahead_option_and_weak_exit(test_set):
    """With a weak middle exit the one-step rule stops in front of it; the multi-step default
    looks past it (docs/stopping.md: why the default compares with every deeper exit)."""
    probs, labels = synthetic(6000, seed=5, weak=1)
    t_probs, t_labels = synthetic(20000, seed=6, weak=1)
    multi = calibrate("lookahead", probs, labels, SEG, max_drop=1.0)
    one = calibrate("lookahead", probs, labels, SEG, max_drop=1.0, options={"horizon": 1})
    assert isinstance(multi.params["gain"][0][0], list)           # per-horizon layout
    d_m, l_m = held_out(multi, t_probs, t_labels)
    assert d_m <= 1.5 and l_m < 0.9 * sum(SEG)
    # the one-step rule sees only the loss of going to the weak exit 1, so it cannot exit
    # early without a big drop: it falls back to full depth, much slower at the same target
    d_1, l_1 = held_out(one, t_probs, t_labels)
    assert d_1 <= 1.5 and l_1 > l_m + 0.5
    # on a monotone problem the one-step layout is used and is as good as the multi-step one
    one = calibrate("lookahead", *synthetic(6000, seed=1), SEG, max_drop=1.0,
                    options={"horizon": 1})
    assert one.rule_name == "lookahead" and isinstance(one.params["gain"][0][0], float)
    assert held_out(one, *test_set)[0] <= 1.5


def test_calibrated_lookahead_stops_differently_on_another_device(cal):
    res = calibrate("lookahead", *cal, SEG, max_drop=1.0)
    rule = res.rule()
    slow_tail = [2.0, 9.0, 9.0, 12.0]   # same model, a device where deep segments are slower
    h_a = simulate(rule, *cal, StopContext(SEG)).exit_histogram
    h_b = simulate(rule, *cal, StopContext(slow_tail)).exit_histogram
    assert h_a != h_b
    mean_a = np.dot(h_a, np.arange(4)) / sum(h_a)
    mean_b = np.dot(h_b, np.arange(4)) / sum(h_b)
    assert mean_b < mean_a


def test_full_rule_and_fallback(cal):
    res = calibrate("full", *cal, SEG, max_drop=1.0)
    assert res.rule_name == "full" and res.params == {}
    assert res.mean_latency_ms == pytest.approx(sum(SEG))
    assert res.val_accuracy == pytest.approx(res.full_depth_accuracy)
    # a rule that cannot exit early at no loss falls back to full depth
    probs, labels = cal
    bad = probs.copy()
    bad[:3] = probs[:3][:, :, ::-1]          # early exits confidently predict a wrong class
    res = calibrate("max_prob", bad, labels, SEG, max_drop=0.0)
    assert res.rule_name == "full" and res.details["fallback"]


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule_name", RULE_NAMES + ["full"])
def test_result_round_trips_through_make_rule_and_manifest(rule_name, cal):
    probs, labels = cal[0][:, :2000], cal[1][:2000]
    res = calibrate(rule_name, probs, labels, SEG, mean_budget_ms=7.0)
    params = json.loads(json.dumps(res.params, allow_nan=False))
    rule = make_rule(res.rule_name, params)
    assert rule == res.rule()
    sim = simulate(rule, probs, labels, StopContext(SEG))
    assert sim.accuracy == pytest.approx(res.val_accuracy)
    assert sim.mean_latency_ms == pytest.approx(res.mean_latency_ms)
    stopping = res.to_stopping()
    assert isinstance(stopping, Stopping) and stopping.calibrated
    assert stopping.val_accuracy == pytest.approx(res.val_accuracy)
    assert rule_from_stopping(stopping) == rule


# ------------------------------------------------------------------------------------------------
# risk control (Learn then Test)
# ------------------------------------------------------------------------------------------------

def test_risk_controlled_guarantee_holds_over_repeated_calibrations(test_set):
    """>= 1 - delta of independent calibrations meet max_drop on the population (here a large
    independent sample), and each reports its confidence statement."""
    delta, max_drop, trials = 0.1, 1.0, 50
    t_probs, t_labels = test_set
    met, lats = 0, []
    for trial in range(trials):
        probs, labels = synthetic(3000, seed=1000 + trial)
        res = calibrate("lookahead", probs, labels, SEG, max_drop=max_drop, risk_delta=delta,
                        seed=trial)
        d = res.details
        assert d["method"] == "learn-then-test" and d["confidence"] == pytest.approx(0.9)
        assert "0.9" in d["statement"] and d["certified"]
        assert d["drop_ucb_points"] <= max_drop + 1e-6 or res.rule_name == "full"
        drop, lat = held_out(res, t_probs, t_labels)
        met += drop <= max_drop
        lats.append(lat)
    assert met >= (1 - delta) * trials
    assert np.mean(lats) < 0.95 * sum(SEG)          # and it is not trivially full depth


def test_risk_controlled_max_prob_and_budget(cal, test_set):
    res = calibrate("max_prob", *cal, SEG, max_drop=1.0, risk_delta=0.05)
    assert res.details["certified"] and res.details["tested"] >= 1
    drop, _ = held_out(res, *test_set)
    assert drop <= 1.0
    # budget: with probability >= 0.95 the mean latency is <= the budget
    res = calibrate("lookahead", *cal, SEG, mean_budget_ms=7.0, risk_delta=0.05)
    assert res.details["certified"]
    _, lat = held_out(res, *test_set)
    assert lat <= 7.0 and lat > 5.5


def test_binomial_tails_match_exact_sums():
    for n, p in [(1, 0.3), (7, 0.5), (40, 0.02), (200, 0.9), (1000, 0.004)]:
        pmf = [math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(n + 1)]
        for x in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            assert binom_cdf(x, n, p) == pytest.approx(sum(pmf[:x + 1]), rel=1e-9, abs=1e-300)
            assert binom_sf(x, n, p) == pytest.approx(sum(pmf[x:]), rel=1e-9, abs=1e-300)
    assert binom_cdf(-1, 5, 0.5) == 0.0 and binom_sf(0, 5, 0.5) == 1.0


def test_drop_p_value_is_valid_at_the_boundary():
    """Under H0 (drop = q+ - q- just above eps) P(p <= a) <= a, by simulation."""
    rng = np.random.default_rng(0)
    n, eps = 1500, 0.01
    for q_plus, q_minus in [(0.02, 0.01), (0.03, 0.0199), (0.0101, 0.0)]:
        ps = []
        for _ in range(300):
            u = rng.random(n)
            worse = int(np.sum(u < q_plus))
            better = int(np.sum((u >= q_plus) & (u < q_plus + q_minus)))
            ps.append(drop_p_value(worse, better, n, eps))
        ps = np.array(ps)
        for a in (0.05, 0.1, 0.2):
            assert np.mean(ps <= a) <= a + 0.04
    # monotone in eps, and the upper confidence bound is where it crosses delta
    vals = [drop_p_value(30, 12, 1000, e) for e in np.linspace(0.0, 0.05, 11)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    ucb = drop_upper_bound(30, 12, 1000, 0.1)
    # split Clopper-Pearson: U+(0.05) of 30/1000 is 0.0405, L-(0.05) of 12/1000 is 0.0069
    assert ucb == pytest.approx(0.0405 - 0.0069, abs=5e-4)
    assert drop_p_value(30, 12, 1000, ucb + 1e-6) <= 0.1 < drop_p_value(30, 12, 1000, ucb - 1e-3)
    assert drop_p_value(0, 0, 100, 1.0) == 0.0 and drop_p_value(5, 0, 0, 0.1) == 1.0


def test_hoeffding_bentkus_p_value():
    # no loss at all in 100 samples vs t = 0.1: exp(-100 * log(1/0.9)) = 0.9**100
    assert hb_p_value(0.0, 100, 0.1) == pytest.approx(0.9 ** 100)
    assert hb_p_value(0.5, 100, 0.1) == 1.0
    assert hb_p_value(0.2, 100, 1.0) == 0.0
    assert hb_p_value(0.05, 1000, 0.1) < 1e-6 < hb_p_value(0.09, 1000, 0.1)


def test_gain_tables_are_monotone_and_shrunk():
    probs, labels = synthetic(4000, seed=9)
    from runtime.exits import top_prob
    correct = probs.argmax(2) == labels
    edges, gain = fit_gain_tables(top_prob(probs), correct, n_bins=8, horizon=None)
    assert len(edges) == 3 and len(gain) == 3
    for k in range(3):
        assert edges[k][0] == 0.0 and edges[k][-1] == 1.0
        for h, row in enumerate(gain[k]):
            if k + h + 1 > 3:
                assert row is None
                continue
            assert len(row) == len(edges[k]) - 1
            assert all(a >= b - 1e-12 for a, b in zip(row, row[1:]))  # non-increasing
            # bin-count weighted mean equals the overall mean gain (PAVA + prior keep it)
            d = correct[k + h + 1].astype(float) - correct[k]
            b = np.clip(np.searchsorted(edges[k], top_prob(probs[k]), "right") - 1, 0,
                        len(row) - 1)
            assert np.average(row, weights=np.bincount(b, minlength=len(row)) + 10.0) == \
                pytest.approx(d.mean(), abs=1e-9)
    rule = LookAheadRule(edges, gain, lam=0.01)
    assert rule.horizon == 3


# ------------------------------------------------------------------------------------------------
# bad inputs
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    return synthetic(400, seed=3)


@pytest.mark.parametrize("kwargs,needle", [
    ({}, "exactly one target"),
    ({"max_drop": 1.0, "mean_budget_ms": 5.0}, "exactly one target"),
    ({"max_drop": -0.5}, "max_drop"),
    ({"max_drop": float("nan")}, "max_drop"),
    ({"max_drop": 150}, "max_drop"),
    ({"mean_budget_ms": 0.0}, "mean_budget_ms"),
    ({"mean_budget_ms": -3.0}, "mean_budget_ms"),
    ({"mean_budget_ms": 1.0}, "below the cost of the first exit"),
    ({"max_drop": 1.0, "risk_delta": 0.0}, "risk_delta"),
    ({"max_drop": 1.0, "risk_delta": 1.5}, "risk_delta"),
    ({"max_drop": 1.0, "fit_fraction": 1.0}, "fit_fraction"),
    ({"max_drop": 1.0, "fit_fraction": 0.0001}, "fit_fraction"),
    ({"max_drop": 1.0, "options": {"bogus": 1}}, "options['bogus']"),
])
def test_bad_targets(small, kwargs, needle):
    with pytest.raises(ValueError) as e:
        calibrate("lookahead", *small, SEG, **kwargs)
    assert needle in str(e.value)


def test_bad_data(small):
    probs, labels = small
    with pytest.raises(ValueError, match="unknown stopping rule"):
        calibrate("nope", probs, labels, SEG, max_drop=1)
    with pytest.raises(ValueError, match=r"labels: expected shape \(400,\)"):
        calibrate("max_prob", probs, labels[:-1], SEG, max_drop=1)
    with pytest.raises(ValueError, match="segment_ms"):
        calibrate("max_prob", probs, labels, SEG[:-1], max_drop=1)
    nan = probs.copy()
    nan[1, 3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        calibrate("max_prob", nan, labels, SEG, max_drop=1)
    with pytest.raises(ValueError, match="softmax"):
        calibrate("max_prob", np.log(probs + 1e-12), labels, SEG, max_drop=1)
    with pytest.raises(ValueError, match="shape"):
        calibrate("max_prob", probs[0], labels, SEG, max_drop=1)
    with pytest.raises(ValueError, match="class indices"):
        calibrate("max_prob", probs, labels + 10, SEG, max_drop=1)
    with pytest.raises(ValueError, match="NaN"):
        calibrate("max_prob", probs, labels.astype(float) * np.nan, SEG, max_drop=1)
    with pytest.raises(ValueError, match="segment_ms"):
        calibrate("max_prob", probs, labels, [1.0, float("nan"), 1.0, 1.0], max_drop=1)
