"""The joint router: policy validation, the backward-induction fit, exits that do not pay, the
epsilon deadline on fixed tables (fake clock), and runtime decisions equal to the simulation."""
from __future__ import annotations

import numpy as np
import pytest

from export.routing_fit import (RoutingData, _isotonic, fit_policy, fit_router, simulate,
                                static_policy)
from runtime import AdaptiveModel, FakeClock
from runtime.errors import ConfigError
from runtime.manifest import LatencyEntry, utc_now_iso
from runtime.routing import STOP, RouterRule
from runtime.rules import make_rule
from test_runtime import THREADS, build_bundles, copy_bundle, edit_manifest


def synthetic_probs(n: int = 4000, S: int = 2, useless_first: bool = False, seed: int = 0):
    """probs[cfg] (S, n, 10) and labels: exit 0's confidence c is right with chance c (or
    uninformative and right 10% of the time); the later exits say 0.9 whatever happens and are
    right 90% (exit 1) to 95% (the last exit) of the time; the skip variant 'T' is 1 point
    worse at every exit."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    base_c = rng.uniform(0.15, 1.0, n)
    u = rng.uniform(size=(S, n))
    configs = ["".join(t) for t in np.array(np.meshgrid(*[["F", "T"]] * S)).T.reshape(-1, S)]
    probs = {}
    for cfg in configs:
        p = np.zeros((S, n, 10), dtype=np.float32)
        for k in range(S):
            worse = 0.01 * cfg[:k + 1].count("T")
            if k == 0:
                c = np.full(n, 0.5) if useless_first else base_c
                ok = u[k] < ((0.1 if useless_first else c) - worse)
            else:  # uninformative confidence, accuracy 90% at exit 1 rising to 95% at the last
                c = np.full(n, 0.9)
                ok = u[k] < 0.90 + 0.05 * (k - 1) / max(1, S - 2) - worse
            pred = np.where(ok, y, (y + 1) % 10)
            p[k] = (1 - c[:, None]) / 9
            p[k, np.arange(n), pred] = c
        probs[cfg] = p
    return probs, y


def unit_cost(first: int, last: int, variant: str) -> float:
    return float(sum(0.7 if ch == "T" else 1.0 for ch in variant))


# ---------------------------------------------------------------------------------------------
# policies and the fit
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, field", [
    ({"policies": [{"exits": [0, 2], "start": "FF", "decisions": {}}]}, "start"),
    ({"policies": [{"exits": [1, 0], "start": "F", "decisions": {}}]}, "exits"),
    ({"policies": [{"exits": [0, 1], "start": "F", "decisions": {
        "F": {"breaks": [0.5], "ranked": [["F", "stop"]]}}}]}, "ranked"),
    ({"policies": [{"exits": [0, 1], "start": "F", "decisions": {
        "F": {"breaks": [], "ranked": [["stop", "F"]]}}}]}, "ranked[0]"),
    ({"policies": [{"exits": [0, 1], "start": "F", "decisions": {
        "F": {"breaks": [], "ranked": [["FT", "stop"]]}}}]}, "ranked[0][0]"),
    ({"policies": [{"exits": [0, 1], "start": "F", "decisions": {}}], "budgets": [[2, 0], [1, 0]]},
     "budgets"),
])
def test_router_parameters_are_validated_field_by_field(params, field):
    with pytest.raises(ConfigError) as e:
        make_rule("router", params)
    assert "stopping rule 'router'" in str(e.value) and field in str(e.value)
    assert "\n" not in str(e.value)


def test_router_round_trips_and_picks_the_policy_of_a_budget():
    a = {"exits": [0, 1], "start": "F", "decisions": {
        "F": {"breaks": [0.6], "ranked": [["T", "F", "stop"], ["stop"]]}}}
    b = {"exits": [1], "start": "FF", "decisions": {}}
    rule = make_rule("router", {"policies": [a, b], "default": 1, "budgets": [[1.0, 0], [3.0, 1]]})
    assert make_rule("router", rule.params()) == rule
    assert rule.policy_for_budget(None).exits == (1,)
    assert rule.policy_for_budget(0.5).exits == (0, 1)  # below every entry: the first one
    assert rule.policy_for_budget(2.9).exits == (0, 1)
    assert rule.policy_for_budget(3.0).exits == (1,)
    p = rule.policies[0]
    assert p.ranked("F", 0.59) == ("T", "F", STOP) and p.ranked("F", 0.6) == (STOP,)
    assert p.ranked("T", 0.1) == (STOP,)  # a path the policy never reaches stops
    assert rule.used_spans() == {(0, 0, "F"), (1, 1, "T"), (1, 1, "F"), (0, 1, "FF")}


def test_stop_threshold_is_where_stopping_comes_first():
    from runtime.routing import RouterPolicy

    p = RouterPolicy([0, 1, 2], "F", {
        "F": {"breaks": [0.5, 0.7, 0.9], "ranked": [["F", "stop"], ["stop"], ["T", "stop"],
                                                    ["stop"]]},
        "FF": {"breaks": [0.4], "ranked": [["F", "stop"], ["T", "stop"]]},
        "FT": {"breaks": [], "ranked": [["stop"]]}})
    # F stops above 0.5 but goes on again in [0.7, 0.9): the threshold is where it stops for good
    assert p.stop_threshold("F") == 0.9 and p.ranked("F", 0.9) == (STOP,)
    assert p.stop_threshold("FF") is None
    assert p.stop_threshold("FT") == 0.0 and p.stop_threshold("TT") == 0.0


def test_the_router_module_imports_on_its_own():
    import subprocess
    import sys

    # importing runtime.routing before runtime.rules must work (and register the rule)
    code = "import runtime.routing as r, runtime.rules as q; assert q.RULES['router'] is r.RouterRule"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_isotonic_fit_is_non_decreasing_and_follows_the_data():
    rng = np.random.default_rng(1)
    s = rng.uniform(size=5000)
    y = (rng.uniform(size=5000) < s).astype(float)
    f = _isotonic(s, y, max_bins=24, min_bin=40)
    assert np.all(np.diff(f.values) >= -1e-12)
    grid = np.linspace(0.02, 0.98, 25)
    assert np.max(np.abs(f(grid) - grid)) < 0.12


def test_policy_stops_the_confident_and_continues_the_unsure():
    probs, y = synthetic_probs()
    data = RoutingData(probs, y)
    pol = fit_policy(data, unit_cost, [0, 1], 0.05, np.arange(data.N))
    # stopping is worth it where the chance of being right now is within lam x cost of the
    # last exit's 95% (minus the cheaper variant's point): above ~0.9 confidence
    assert pol.ranked(pol.start, 0.99)[0] == STOP
    assert pol.ranked(pol.start, 0.3)[0] != STOP
    conf = np.linspace(0.15, 1.0, 200)
    first_is_stop = np.array([pol.ranked(pol.start, c)[0] == STOP for c in conf])
    # one threshold: once stopping is first, it stays first for more confident samples
    assert not np.any(first_is_stop[:-1] & ~first_is_stop[1:])
    out = simulate(pol, data, unit_cost, np.arange(data.N))
    assert 0 < (out.exit == 0).mean() < 1
    # the policy is worth more than both static ends at its price of latency
    lam = 0.05
    for static in (static_policy("FF", 0), static_policy("FF", 1)):
        s = simulate(static, data, unit_cost, np.arange(data.N))
        assert out.accuracy - lam * out.mean_latency_ms >= s.accuracy - lam * s.mean_latency_ms


def test_fit_router_meets_the_target_held_out_and_keeps_the_exit_that_pays():
    """Exit 0's confidence tells right from wrong, exit 1's says nothing: exit 0 is kept,
    exit 1 (never worth stopping at) is dropped, within the target held out."""
    probs, y = synthetic_probs(S=3)
    fit = fit_router(probs, y, unit_cost, max_drop=1.0, exit_cost_ms=0.1)
    assert fit.drop_bound_points <= 1.0 and fit.heldout_drop_points <= 1.0
    assert fit.exits == [0, 2]
    # cheaper held out than running to the end and than keeping exit 1 as well
    fastest: dict = {}
    for s in fit.subsets:
        if s["lam"] is not None:
            e = tuple(s["exits"])
            fastest[e] = min(fastest.get(e, np.inf), s["heldout_latency_ms"])
    assert fit.heldout_latency_ms < fastest[(0, 1, 2)]
    assert fit.heldout_latency_ms < fastest[(2,)]


def test_the_default_certificate_is_cross_fitted_at_z_1645():
    """Every validation sample is scored by the policy fitted on the other fold; the bound is
    the paired drop over all of them plus 1.645 standard errors, and the shipped policy is the
    refit on all the data."""
    from export.routing_fit import DEFAULT_Z, _crossfit, paired_drop_bound

    probs, y = synthetic_probs(S=3)
    fit = fit_router(probs, y, unit_cost, max_drop=1.0, exit_cost_ms=0.1)
    data = RoutingData(probs, y)
    perm = np.random.default_rng(0).permutation(data.N)
    folds = (np.sort(perm[: data.N // 2]), np.sort(perm[data.N // 2:]))
    start = fit.rule.default_policy.start
    corr, _ = _crossfit(data, unit_cost, fit.exits, fit.lam, folds, 0.1, {"start": start})
    full = data.correct["FFF"]
    worse, better = int(np.sum((full == 1) & (corr == 0))), int(np.sum((full == 0) & (corr == 1)))
    assert DEFAULT_Z == pytest.approx(1.645)
    assert fit.drop_bound_points == pytest.approx(100 * paired_drop_bound(worse, better, data.N, DEFAULT_Z))
    assert fit.heldout_accuracy == pytest.approx(corr.mean())
    refit = fit_policy(data, unit_cost, fit.exits, fit.lam, np.arange(data.N), exit_cost_ms=0.1, start=start)
    assert refit.decisions == fit.rule.default_policy.decisions
    # a looser certificate can only be as fast or faster
    loose = fit_router(probs, y, unit_cost, max_drop=1.0, exit_cost_ms=0.1, z=0.0)
    assert loose.heldout_latency_ms <= fit.heldout_latency_ms


def test_every_start_is_a_candidate_and_one_exit_means_static_sub_networks():
    """The first span's variant is a candidate of its own: with only the last exit kept the
    candidates are the static sub-networks (TTT: 3 points worse here, cost 2.1 + the exit)."""
    probs, y = synthetic_probs(S=3)
    fit = fit_router(probs, y, unit_cost, max_drop=4.5, exit_cost_ms=0.1)
    rows = {(tuple(r["exits"]), r["start"], r["fit_fold"]): r for r in fit.subsets}
    assert {k[1] for k in rows if k[0] == (2,)} == {"FFF", "FFT", "FTF", "FTT", "TFF", "TFT",
                                                     "TTF", "TTT"}
    assert {k[1] for k in rows if k[0] == (0, 2)} == {"F", "T"}
    ttt = rows[((2,), "TTT", 0)]
    assert ttt["lam"] == 0.0 and ttt["heldout_latency_ms"] == pytest.approx(2.1 + 0.1)
    assert 2.0 < ttt["heldout_drop_points"] < 4.5
    pol = fit_policy(RoutingData(probs, y), unit_cost, [0, 2], 0.01, np.arange(len(y)),
                     start="T")
    assert pol.start == "T" and set(pol.decisions) <= {"T"}
    with pytest.raises(ValueError, match="start 'FF'"):
        fit_policy(RoutingData(probs, y), unit_cost, [0, 2], 0.01, np.arange(len(y)),
                   start="FF")


def test_the_drop_is_certified_against_a_given_reference():
    """With a reference better than the pieces' own full depth (the fp32 network of int8
    pieces), the held-out drop is measured against it: the fit spends less of the target on
    early exits, and a reference the pieces cannot come within the target of leaves full depth."""
    probs, y = synthetic_probs(S=3)
    own = fit_router(probs, y, unit_cost, max_drop=1.0, exit_cost_ms=0.1)
    full = RoutingData(probs, y).correct["FFF"]
    rng = np.random.default_rng(1)
    # right on 0.8 points more of the samples than full depth
    wrong = np.flatnonzero(full == 0)
    better = full.copy()
    better[rng.choice(wrong, size=int(0.008 * len(y)), replace=False)] = 1.0
    tight = fit_router(probs, y, unit_cost, max_drop=1.0, exit_cost_ms=0.1,
                       reference_correct=better)
    assert tight.reference_accuracy == pytest.approx(better.mean())
    assert own.reference_accuracy is None
    assert tight.drop_bound_points <= 1.0
    assert tight.heldout_latency_ms > own.heldout_latency_ms
    # 3 points better than full depth: nothing meets a 1-point target, full depth ships
    best = full.copy()
    best[rng.choice(wrong, size=int(0.03 * len(y)), replace=False)] = 1.0
    none = fit_router(probs, y, unit_cost, max_drop=1.0, exit_cost_ms=0.1,
                      reference_correct=best)
    assert none.exits == [2] and none.exit_histogram == [0, 0, len(y)]
    with pytest.raises(ValueError, match="reference_correct"):
        fit_router(probs, y, unit_cost, reference_correct=better[:-1])


def test_an_exit_that_does_not_pay_is_dropped():
    """Exit 0 is right 10% of the time whatever it says: no policy should stop there, so the
    kept exits leave it out and its cost (head, decision) is not paid."""
    probs, y = synthetic_probs(S=2, useless_first=True)
    fit = fit_router(probs, y, unit_cost, max_drop=0.5, exit_cost_ms=0.05)
    assert fit.exits == [1]
    pol = fit.rule.default_policy
    assert pol.spans == [(0, 1)] and pol.decisions == {}
    assert fit.exit_histogram == [0, len(y)]


def test_the_deadline_runs_a_span_exactly_when_its_quantile_fits():
    probs, y = synthetic_probs(S=3, n=50)
    data = RoutingData(probs, y)
    pol = static_policy("FFF", 2)  # always continue
    cost = lambda f, l, v: 1.0 * (l - f + 1)  # noqa: E731
    q99 = lambda f, l, v: 1.5 * (l - f + 1)  # noqa: E731
    idx = np.arange(data.N)
    for budget, exit_ in ((2.5, 1), (2.4999, 0), (3.5, 2), (3.4999, 1)):
        out = simulate(pol, data, cost, idx, budget_ms=budget, span_quantile=q99)
        assert set(out.exit.tolist()) == {exit_}, budget
        assert not out.missed.any()


# ---------------------------------------------------------------------------------------------
# on a real bundle: the runtime decides what the simulation decided
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return build_bundles(tmp_path_factory.mktemp("routing"))


@pytest.fixture(scope="module")
def val_images() -> np.ndarray:
    from train.data import load_dataset

    ds = load_dataset("synthetic:chans=1,size=28")
    return ds.val.images[:160].permute(0, 2, 3, 1).contiguous().numpy(), ds.val.labels[:160].numpy()


def quantile_table(manifest, p50: float, p95: float, p99: float) -> list[LatencyEntry]:
    now = utc_now_iso()
    return [LatencyEntry(device="x86-host", backend="onnxruntime", target="x86_64-cpu", batch=1,
                         piece=p.id, p50_ms=p50, p90_ms=p50, p95_ms=p95, p99_ms=p99,
                         mean_ms=p50, kind="estimated", created=now, fingerprint={"test": True})
            for p in manifest.pieces if p.kind == "stage"]


class SpanClock:
    """Wraps the real executor: every stage of a span 'takes' ``ms`` on a FakeClock."""

    def __init__(self, inner, clock: FakeClock, ms: float) -> None:
        self.inner, self.clock, self.ms = inner, clock, ms
        self.backend, self.target = inner.backend, inner.target
        self.spans: list[tuple[int, int, str]] = []

    def run_span(self, first, last, variant, tensors, prefix=None):
        out = self.inner.run_span(first, last, variant, tensors, prefix)
        self.spans.append((first, last, variant))
        self.clock.advance(self.ms * (last - first + 1))
        return out

    def run_segment(self, cfg, k, tensors):
        out = self.inner.run_segment(cfg, k, tensors)
        self.clock.advance(self.ms)
        return out

    def run_exits(self, x, cfg, upto=None):
        return self.inner.run_exits(x, cfg, upto)


def timed_model(bundles, tmp_path, stage_ms: float) -> AdaptiveModel:
    """The host bundle with a table of p50 10 / p95 12 / p99 15 ms per stage piece, on a fake
    clock where every stage of a span takes ``stage_ms``."""
    b = copy_bundle(bundles[1], tmp_path / "b")
    edit_manifest(b, lambda m: m.replace_latency(quantile_table(m, 10.0, 12.0, 15.0)))
    real = AdaptiveModel.load(b, runner_options=THREADS)
    clock = FakeClock()
    return AdaptiveModel(real.bundle, SpanClock(real.executor, clock, stage_ms),
                         choice=real.choice, clock=clock)


def always_continue(epsilon: float = 0.01) -> RouterRule:
    return RouterRule([static_policy("FFF", 2)], epsilon=epsilon)


@pytest.mark.parametrize("epsilon, budget, exit_, why", [
    (0.01, 25.0, 1, "deadline"),    # 10 elapsed + p99 15 = 25 fits; 20 + 15 does not
    (0.01, 24.9, 0, "deadline"),
    (0.01, 35.0, 2, "last_exit"),   # 20 + 15 = 35 fits
    (0.05, 22.0, 1, "deadline"),    # epsilon 5%: the p95 (12 ms) decides
    (0.05, 21.9, 0, "deadline"),
    (0.03, 23.4, 0, "deadline"),    # between p95 and p99: 12 + (15 - 12) * 0.5 = 13.5 -> 23.5
    (0.03, 23.5, 1, "deadline"),
])
def test_router_deadline_proceeds_exactly_when_the_chance_of_fitting_is_high_enough(
        bundles, tmp_path, val_images, epsilon, budget, exit_, why):
    m = timed_model(bundles, tmp_path, 10.0)
    # the check adds the time from the last span to the answer as measured (0 on this clock;
    # runtime.deadline.DEFAULT_ANSWER_MS before the first budgeted call)
    from runtime.deadline import DEFAULT_ANSWER_MS, answer_key

    assert m.latency.answer_quantile(1, 0.99) == DEFAULT_ANSWER_MS
    m.latency.online.record_many([(answer_key(1), 0.0)])
    assert m.latency.answer_quantile(1, 0.99) == 0
    p = m.predict(val_images[0][0], budget_ms=budget, rule=always_continue(epsilon))
    assert (p.exit_index, p.stopped_by, p.deadline_missed) == (exit_, why, False)


def test_router_deadline_counts_the_time_to_answer(bundles, tmp_path, val_images):
    """Answering after the last span takes 0.5 ms here: a span runs only if it fits with it."""
    from runtime.deadline import answer_key

    m = timed_model(bundles, tmp_path, 10.0)
    m.latency.online.record_many([(answer_key(1), 0.5)])
    for budget, exit_ in ((25.4, 0), (25.5, 1), (35.5, 2)):
        p = m.predict(val_images[0][0], budget_ms=budget, rule=always_continue())
        assert p.exit_index == exit_, budget


def test_router_budget_measured_online_blends_into_the_table(bundles, tmp_path, val_images):
    """The device is slower than its table (segments take 14 ms, the table's p99 says 15, p50
    10): after enough calls the online figure weighs in and the check follows it."""
    m = timed_model(bundles, tmp_path, 14.0)
    q0 = m.latency.span_quantile(1, 1, "F", 1, 0.99)
    assert q0 == pytest.approx(15.0)
    for _ in range(200):
        m.predict(val_images[0][0], rule=always_continue())
    q = m.latency.span_quantile(1, 1, "F", 1, 0.99)
    assert 14.0 < q < 15.0 and q < q0


def test_runtime_routes_like_the_simulation(bundles, val_images):
    """A router fitted on the bundle's own exit probabilities: every sample's exit and path at
    batch 1 and in one batch are what the simulation on the same probabilities says."""
    x, y = val_images
    model = AdaptiveModel.load(bundles[1], runner_options=THREADS)
    probs = {c: model.exit_probabilities(x, c) for c in model.skip_configs}
    fit = fit_router(probs, y, unit_cost, max_drop=5.0, z=0.0, lams=(0.0, 0.01, 0.03, 0.1),
                     min_bin=10)
    rule = fit.rule
    data = RoutingData(probs, y)
    for pol_i, pol in enumerate([rule.default_policy, fit_policy(data, unit_cost, [0, 1, 2], 0.03,
                                                                 np.arange(len(y)), min_bin=10)]):
        r = RouterRule([pol])
        sim = simulate(pol, data, unit_cost, np.arange(len(y)))
        one = [model.predict(img, rule=r) for img in x]
        many = model.predict(x, rule=r)
        for i, (p, q) in enumerate(zip(one, many)):
            path = sim.path[i]
            assert (p.exit_index, p.skip_config[:len(path)]) == (sim.exit[i], path), (pol_i, i)
            assert (q.exit_index, q.skip_config, q.class_id) == (p.exit_index, p.skip_config,
                                                                 p.class_id)
            assert p.class_id == probs[path + "F" * (3 - len(path))][sim.exit[i], i].argmax()
        if pol_i == 1:
            assert len({p.exit_index for p in one}) > 1  # the test routes for real


def test_inspect_shows_where_the_router_stops(bundles, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from runtime.manifest import Stopping
    from runtime.routing import RouterPolicy

    rule = RouterRule([RouterPolicy(**{"exits": [0, 1, 2], "start": "F", "decisions": {
        "F": {"breaks": [0.75], "ranked": [["F", "stop"], ["stop"]]},
        "FF": {"breaks": [], "ranked": [["F", "stop"]]}}})])
    b = copy_bundle(bundles[1], tmp_path / "b")
    edit_manifest(b, lambda m: setattr(m, "stopping", Stopping(
        rule="router", params=rule.params(), val_accuracy=0.9, mean_latency_ms=1.0,
        created=utc_now_iso())))
    r = CliRunner().invoke(cli, ["inspect", str(b)])
    assert r.exit_code == 0, r.output
    assert "default policy stops at max_prob >= F 0.750, FF never" in r.output
