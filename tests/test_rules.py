"""Stopping rules (runtime/rules.py) and their simulation (export/simulate.py): hand-computed
decisions for every rule, the device-dependent look-ahead rule, JSON round trips, clear errors,
and the vectorised simulation against a plain per-sample sequential loop (hypothesis)."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from export.simulate import latency_at_exits
from runtime.exits import normalised_entropy, top2_margin
from runtime.manifest import LatencyEntry, Stopping
from runtime.rules import (RULES, EntropyRule, FullDepthRule, LookAheadRule, MaxProbRule,
                           PatienceRule, StopContext, make_rule, rule_from_stopping)
from export.simulate import simulate

T0 = "2025-01-31T12:00:00+00:00"


def row(top: float, cls: int = 0, C: int = 10) -> list[float]:
    """A probability vector with top probability ``top`` on class ``cls``, the rest uniform."""
    rest = (1.0 - top) / (C - 1)
    assert rest < top
    return [top if c == cls else rest for c in range(C)]


def stack(*exits_rows) -> np.ndarray:
    """(S, N, C) from S lists of N rows."""
    return np.array(exits_rows, dtype=np.float64)


def run_exits(rule, probs, segment_ms):
    return simulate(rule, probs, None, StopContext(segment_ms)).exits.tolist()


# ------------------------------------------------------------------------------------------------
# hand-computed cases
# ------------------------------------------------------------------------------------------------

def test_max_prob_per_exit_thresholds():
    # 4 samples, 3 exits; thresholds [0.9, 0.8] for exits 0 and 1
    probs = stack([row(0.95), row(0.85), row(0.50), row(0.89)],
                  [row(0.99), row(0.80), row(0.79), row(0.70)],
                  [row(0.99), row(0.99), row(0.99), row(0.99)])
    rule = MaxProbRule([0.9, 0.8])
    ctx = StopContext([1.0, 2.0, 3.0])
    assert rule.stop(0, [probs[0]], ctx).tolist() == [True, False, False, False]
    assert rule.stop(1, [probs[0], probs[1]], ctx).tolist() == [True, True, False, False]
    assert rule.stop(2, list(probs), ctx).tolist() == [True] * 4  # last exit always stops
    # sample 1 stops at exit 1 (0.80 >= 0.8 exactly), samples 2-3 run to the end
    assert run_exits(rule, probs, [1.0, 2.0, 3.0]) == [0, 1, 2, 2]
    # a scalar threshold applies to every exit; None never stops at that exit
    assert run_exits(MaxProbRule(0.85), probs, [1, 2, 3]) == [0, 0, 2, 0]
    assert run_exits(MaxProbRule([None, 0.7]), probs, [1, 2, 3]) == [1, 1, 1, 1]


def test_entropy_rule_hand_computed():
    C = 3
    onehot = [1.0, 0.0, 0.0]
    half = [0.5, 0.5, 0.0]       # H / log 3 = log 2 / log 3 = 0.6309
    uniform = [1 / 3] * 3         # 1
    h = normalised_entropy(np.array([onehot, half, uniform]))
    np.testing.assert_allclose(h, [0.0, math.log(2) / math.log(3), 1.0], atol=1e-12)
    probs = stack([onehot, half, uniform], [half, half, uniform], [uniform, uniform, onehot])
    assert probs.shape == (3, 3, C)
    assert run_exits(EntropyRule([0.7, 0.7]), probs, [1, 1, 1]) == [0, 0, 2]
    assert run_exits(EntropyRule([0.5, 0.7]), probs, [1, 1, 1]) == [0, 1, 2]
    assert run_exits(EntropyRule(0.0), probs, [1, 1, 1]) == [0, 2, 2]
    assert run_exits(EntropyRule([None, 1.0]), probs, [1, 1, 1]) == [1, 1, 1]


def test_patience_two():
    # predicted classes per exit (rows) for 4 samples
    preds = [[0, 1, 2, 3],
             [0, 2, 2, 4],
             [0, 2, 1, 5],
             [1, 2, 1, 6]]
    tops = [[0.6, 0.6, 0.6, 0.6],
            [0.9, 0.5, 0.6, 0.6],
            [0.9, 0.95, 0.6, 0.6],
            [0.9, 0.9, 0.9, 0.9]]
    probs = stack(*[[row(t, c) for t, c in zip(tr, pr)] for tr, pr in zip(tops, preds)])
    # per sample (columns): classes s0 0,0,0,1  s1 1,2,2,2  s2 2,2,1,1  s3 3,4,5,6
    #                       tops    s0 .6,.9,.9,.9  s1 .6,.5,.95,.9  s2 and s3 .6,.6,.6,.9
    # patience 2: s0 agrees at exits 0-1 -> 1; s1 at 1-2 -> 2; s2 at 0-1 -> 1; s3 never -> 3
    assert run_exits(PatienceRule(2), probs, [1, 1, 1, 1]) == [1, 2, 1, 3]
    # with min_confidence 0.8: s2 agrees at exit 1 with top 0.6 only, and exits 1-2 differ,
    # so it runs to the last exit
    assert run_exits(PatienceRule(2, 0.8), probs, [1, 1, 1, 1]) == [1, 2, 3, 3]
    # patience 1 = stop at the first exit (min_confidence alone: a shared max-prob threshold)
    assert run_exits(PatienceRule(1), probs, [1, 1, 1, 1]) == [0, 0, 0, 0]
    assert run_exits(PatienceRule(1, 0.85), probs, [1, 1, 1, 1]) == \
        run_exits(MaxProbRule(0.85), probs, [1, 1, 1, 1])
    # patience 3 needs three agreeing exits: sample 0 exits 0-2 -> 2
    assert run_exits(PatienceRule(3), probs, [1, 1, 1, 1]) == [2, 3, 3, 3]
    assert run_exits(PatienceRule(4), probs, [1, 1, 1, 1]) == [3, 3, 3, 3]
    # parameter-free use: patience 2, no confidence floor
    assert make_rule("patience", {}) == PatienceRule(2)


def test_full_depth_never_stops_early():
    probs = stack([row(0.99)] * 3, [row(0.99)] * 3)
    assert run_exits(FullDepthRule(), probs, [1, 1]) == [1, 1, 1]
    assert FullDepthRule().stop(0, [probs[0]], StopContext([1, 1])).tolist() == [False] * 3


# -- look-ahead ----------------------------------------------------------------------------------

EDGES = [0.0, 0.5, 0.8, 1.0]
GAIN = [[0.30, 0.10, 0.01],   # exit 0 -> 1, bins [0,.5) [.5,.8) [.8,1]
        [0.20, 0.05, 0.00]]   # exit 1 -> 2


def lookahead_probs():
    tops = [[0.9, 0.6, 0.3],     # exit 0
            [0.9, 0.85, 0.6],    # exit 1
            [0.9, 0.9, 0.9]]     # exit 2
    return stack(*[[row(t) for t in tr] for tr in tops])


def test_lookahead_hand_built_table():
    rule = LookAheadRule(EDGES, GAIN, lam=0.01)
    probs = lookahead_probs()
    # device A: lam * dt = 0.01 * 4 = 0.04 for both decisions
    ctx = StopContext([1.0, 4.0, 4.0])
    # exit 0: bins (2, 1, 0) -> gains 0.01 <= 0.04 stop, 0.10 and 0.30 continue
    assert rule.stop(0, [probs[0]], ctx).tolist() == [True, False, False]
    # exit 1: sample 1 in bin 2 (0.00) stops, sample 2 in bin 1 (0.05 > 0.04) continues
    assert rule.stop(1, [probs[0], probs[1]], ctx).tolist() == [True, True, False]
    assert run_exits(rule, probs, [1.0, 4.0, 4.0]) == [0, 1, 2]
    # the expected gains the rule used
    np.testing.assert_allclose(rule.expected_gain(0, 1, np.array([0.9, 0.6, 0.3])),
                               [0.01, 0.10, 0.30])


def test_lookahead_stops_at_equality():
    rule = LookAheadRule([0.0, 1.0], [[0.25]], lam=0.25)
    probs = stack([row(0.5)], [row(0.5)])
    assert run_exits(rule, probs, [1.0, 1.0]) == [0]          # 0.25 <= 0.25 * 1
    assert run_exits(rule, probs, [1.0, 0.5]) == [1]          # 0.25 >  0.125


def test_lookahead_same_table_stops_differently_on_two_devices():
    """Same calibration table, two devices' latency tables -> different exit distributions."""
    rule = make_rule("lookahead", {"edges": EDGES, "gain": GAIN, "lam": 0.01})
    probs = lookahead_probs()
    fast_tail = simulate(rule, probs, None, StopContext([1.0, 4.0, 4.0]))
    slow_tail = simulate(rule, probs, None, StopContext([1.0, 12.0, 12.0]))
    assert fast_tail.exits.tolist() == [0, 1, 2]
    # lam * dt = 0.12: exit 0 stops bins 1-2 (0.10, 0.01); exit 1 stops bins 1-2 (0.05, 0.00)
    assert slow_tail.exits.tolist() == [0, 0, 1]
    assert fast_tail.exit_histogram == [1, 1, 1] and slow_tail.exit_histogram == [2, 1, 0]
    assert slow_tail.mean_exit < fast_tail.mean_exit
    # a larger population: the whole exit distribution shifts towards early exits
    rng = np.random.default_rng(0)
    tops = rng.uniform(0.15, 1.0, size=(3, 500))
    probs = np.array([[row(t) for t in tr] for tr in tops])
    h_fast = simulate(rule, probs, None, StopContext([1.0, 4.0, 4.0])).exit_histogram
    h_slow = simulate(rule, probs, None, StopContext([1.0, 12.0, 12.0])).exit_histogram
    assert h_fast != h_slow and h_slow[0] > h_fast[0]


def test_lookahead_multi_step_sees_past_a_weak_exit():
    # exit 1 is weak: going 0 -> 1 loses accuracy, 0 -> 2 gains a lot for unsure samples
    edges = [0.0, 0.5, 0.8, 1.0]
    multi = {"edges": edges, "lam": 0.01,
             "gain": [[[-0.05, -0.05, -0.05], [0.30, 0.20, 0.02]],   # exit 0: h = 1, 2
                      [[0.40, 0.30, 0.20], None]]}                   # exit 1: h = 1 only
    one_step = {"edges": edges, "lam": 0.01,
                "gain": [[-0.05, -0.05, -0.05], [0.40, 0.30, 0.20]]}
    probs = lookahead_probs()
    seg = [1.0, 2.0, 2.0]  # cost of h=1: 0.02, h=2: 0.04
    # multi-step: exit 0 bin 2 (0.02 - 0.04 < 0, -0.07 < 0) stops; bins 1, 0 continue (0.16,
    # 0.26 > 0); exit 1 always continues (gain >= 0.20 > 0.02)
    assert run_exits(make_rule("lookahead", multi), probs, seg) == [0, 2, 2]
    # one step sees only the weak next exit and stops everyone at exit 0
    assert run_exits(make_rule("lookahead", one_step), probs, seg) == [0, 0, 0]


def test_lookahead_linear_interpolation_and_statistics():
    rule = LookAheadRule([0.0, 0.5, 1.0], [[0.2, 0.0]], lam=0.1, interpolation="linear")
    # midpoints 0.25, 0.75: gain 0.2 below 0.25, 0 above 0.75, linear in between
    np.testing.assert_allclose(rule.expected_gain(0, 1, np.array([0.1, 0.4, 0.6, 0.9])),
                               [0.2, 0.14, 0.06, 0.0])
    probs = stack([[0.1] * 10, row(0.4), row(0.6), row(0.9)], [row(0.9)] * 4)  # tops .1 .4 .6 .9
    assert run_exits(rule, probs, [1.0, 1.0]) == [1, 1, 0, 0]   # stop iff gain <= 0.1
    # another statistic: the top-2 margin
    margin = LookAheadRule([0.0, 0.5, 1.0], [[0.5, 0.0]], lam=0.1, statistic="margin")
    p = stack([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0]], [[1.0, 0.0, 0.0]] * 2)
    np.testing.assert_allclose(top2_margin(p[0]), [0.2, 0.8])
    assert run_exits(margin, p, [1.0, 1.0]) == [1, 0]


# ------------------------------------------------------------------------------------------------
# JSON round trips, manifest records, errors
# ------------------------------------------------------------------------------------------------

EXAMPLES = {
    "max_prob": [{"thresholds": [0.9, 0.8]}, {"thresholds": 0.75}, {"thresholds": [None, 0.5]}],
    "entropy": [{"thresholds": [0.2, 0.3, 0.4]}, {"thresholds": 0.1}],
    "patience": [{"patience": 2, "min_confidence": None}, {"patience": 3, "min_confidence": 0.7},
                 {"patience": 1}],
    "lookahead": [{"edges": EDGES, "gain": GAIN, "lam": 0.01},
                  {"edges": [EDGES, [0.0, 0.4, 1.0]], "gain": [[0.3, 0.1, 0.0], [0.1, 0.0]],
                   "lam": 0.5, "statistic": "confidence", "interpolation": "linear"},
                  {"edges": EDGES, "lam": 0.0,
                   "gain": [[[0.1, 0.0, 0.0], [0.2, 0.1, 0.0]], [[0.1, 0.0, -0.1], None]]}],
    "full": [{}],
    "router": [{"policies": [{"exits": [0, 1, 2], "start": "F", "decisions": {
                    "F": {"breaks": [0.5, 0.9], "ranked": [["T", "F", "stop"], ["F", "stop"],
                                                           ["stop"]]},
                    "FF": {"breaks": [0.7], "ranked": [["F", "stop"], ["stop"]]},
                    "FT": {"breaks": [], "ranked": [["T", "F", "stop"]]}}}]},
               {"policies": [{"exits": [2], "start": "FFF", "decisions": {}},
                             {"exits": [0, 2], "start": "T", "lam": 0.1, "decisions": {
                                 "T": {"breaks": [0.8], "ranked": [["TT", "stop"], ["stop"]]}}}],
                "default": 0, "budgets": [[0.5, 1], [2.0, 0]], "epsilon": 0.05}],
}


def test_every_rule_has_examples():
    assert set(EXAMPLES) == set(RULES)


@pytest.mark.parametrize("name,params", [(n, p) for n, ps in EXAMPLES.items() for p in ps])
def test_make_rule_round_trip(name, params):
    rule = make_rule(name, params)
    assert rule.name == name and isinstance(rule, RULES[name])
    p = rule.params()
    p_json = json.loads(json.dumps(p, allow_nan=False))  # strictly JSON-able
    again = make_rule(name, p_json)
    assert again == rule and again.params() == p
    # and through a manifest Stopping record
    st_rec = Stopping(rule=name, params=p_json)
    assert rule_from_stopping(st_rec) == rule
    # equal decisions
    probs = lookahead_probs()
    ctx = StopContext([1.0, 2.0, 3.0])
    assert simulate(rule, probs, None, ctx).exits.tolist() == \
        simulate(again, probs, None, ctx).exits.tolist()


def test_rule_from_uncalibrated_stopping_is_none():
    assert rule_from_stopping(Stopping()) is None
    assert rule_from_stopping(None) is None


@pytest.mark.parametrize("name,params,needle", [
    ("nope", {}, "unknown stopping rule 'nope'"),
    ("max_prob", {}, "missing parameter 'thresholds'"),
    ("max_prob", {"thresholds": 0.9, "x": 1}, "unknown parameter 'x'"),
    ("max_prob", {"thresholds": 1.5}, "'thresholds'"),
    ("max_prob", {"thresholds": [0.9, "a"]}, "item 1"),
    ("max_prob", {"thresholds": float("nan")}, "'thresholds'"),
    ("max_prob", {"thresholds": []}, "'thresholds'"),
    ("entropy", {"thresholds": -0.1}, "'thresholds'"),
    ("patience", {"patience": 0}, "'patience'"),
    ("patience", {"patience": 2.5}, "'patience'"),
    ("patience", {"patience": True}, "'patience'"),
    ("patience", {"patience": 2, "min_confidence": 2}, "'min_confidence'"),
    ("lookahead", {"edges": EDGES, "gain": GAIN}, "missing parameter 'lam'"),
    ("lookahead", {"edges": EDGES, "gain": GAIN, "lam": -1}, "'lam'"),
    ("lookahead", {"edges": [0.0, 0.8, 0.5, 1.0], "gain": GAIN, "lam": 0}, "strictly increasing"),
    ("lookahead", {"edges": EDGES, "gain": [[0.1, 0.2]], "lam": 0}, "'gain'"),
    ("lookahead", {"edges": EDGES, "gain": [[0.1, 0.2, 5.0]], "lam": 0}, "'gain'"),
    ("lookahead", {"edges": EDGES, "gain": GAIN, "lam": 0, "statistic": "foo"}, "'statistic'"),
    ("lookahead", {"edges": EDGES, "gain": GAIN, "lam": 0, "interpolation": "cubic"},
     "'interpolation'"),
    ("lookahead", {"edges": [EDGES], "gain": GAIN, "lam": 0}, "'edges'"),
    ("full", {"x": 1}, "unknown parameter 'x'"),
])
def test_bad_params_name_the_parameter(name, params, needle):
    with pytest.raises(ValueError) as e:
        make_rule(name, params)
    assert needle in str(e.value)


def test_bad_calls():
    rule = MaxProbRule([0.9])
    probs = lookahead_probs()
    ctx = StopContext([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="no threshold for exit 1"):
        rule.stop(1, [probs[0], probs[1]], ctx)
    with pytest.raises(ValueError, match="exits 0..1"):
        rule.stop(1, [probs[0]], ctx)
    with pytest.raises(ValueError, match="out of range"):
        rule.stop(3, list(probs) + [probs[0]], ctx)
    la = LookAheadRule(EDGES, GAIN, lam=0.01)
    with pytest.raises(ValueError, match="needs a StopContext"):
        la.stop(0, [probs[0]], None)
    with pytest.raises(ValueError, match="expected 3 rows"):
        la.stop(0, [probs[0]], StopContext([1.0] * 4))
    with pytest.raises(ValueError, match="segment_ms"):
        StopContext([1.0, float("nan")])
    with pytest.raises(ValueError, match="segment_ms"):
        StopContext([1.0, -2.0])
    with pytest.raises(ValueError, match="segment_ms"):
        StopContext([])
    with pytest.raises(ValueError, match="3 exits"):
        simulate(rule, probs, None, StopContext([1.0, 1.0]))
    with pytest.raises(ValueError, match="softmax"):
        simulate(rule, np.log(probs + 1e-9), None, [1, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        simulate(rule, probs, np.zeros(5, dtype=int), [1, 1, 1])


def test_rules_are_causal_and_handle_empty_batches():
    probs = lookahead_probs()
    ctx = StopContext([1.0, 2.0, 3.0])
    garbage = np.full_like(probs[0], 1 / probs.shape[2])
    for name, ps in EXAMPLES.items():
        for params in ps:
            rule = make_rule(name, params)
            for k in range(2):
                try:
                    a = rule.stop(k, list(probs[:k + 1]), ctx)
                except ValueError:
                    continue  # e.g. a 3-exit table on a 3-exit context is fine; skip others
                b = rule.stop(k, list(probs[:k + 1]) + [garbage], ctx)  # later exits ignored
                assert a.tolist() == b.tolist()
                empty = rule.stop(k, [p[:0] for p in probs[:k + 1]], ctx)
                assert empty.shape == (0,) and empty.dtype == bool


def test_stop_context_from_latency_table():
    def entry(**kw):
        base = dict(device="orin", backend="onnxruntime", target="cpu", batch=1, p50_ms=1.0,
                    p90_ms=1.0, p95_ms=1.0, p99_ms=1.0, mean_ms=1.0, kind="estimated",
                    created=T0)
        base.update(kw)
        return LatencyEntry(**base)

    execution = {"FF": [["a"], ["b", "h1"]], "FT": [["a"], ["c", "h1"]]}
    pieces = [entry(piece="a", p50_ms=2.0), entry(piece="b", p50_ms=3.0),
              entry(piece="c", p50_ms=1.0), entry(piece="h1", p50_ms=0.5)]
    m = SimpleNamespace(stages=2, execution=execution, latency=pieces)
    assert StopContext.from_manifest(m, "FF").segment_ms == (2.0, 3.5)
    assert StopContext.from_manifest(m, "FT").segment_ms == (2.0, 1.5)
    # cumulative per-exit entries take precedence
    m.latency = pieces + [entry(exit=0, skip_config="FF", p50_ms=2.5),
                          entry(exit=1, skip_config="FF", p50_ms=7.0, mean_ms=9.0)]
    ctx = StopContext.from_manifest(m, "FF")
    assert ctx.segment_ms == (2.5, 4.5) and ctx.skip_config == "FF"
    assert StopContext.from_manifest(m, "FF", stat="mean_ms").segment_ms == (1.0, 8.0)
    m.latency = pieces + [entry(piece="a", device="pi", p50_ms=9.0)]
    with pytest.raises(ValueError, match="several latency groups"):
        StopContext.from_manifest(m, "FF")
    assert StopContext.from_manifest(m, "FF", device="orin").segment_ms == (2.0, 3.5)
    with pytest.raises(ValueError, match="missing pieces: b, h1"):
        StopContext.from_manifest(m, "FF", device="pi")
    with pytest.raises(ValueError, match="skip_config"):
        StopContext.from_manifest(m, "TT")


# ------------------------------------------------------------------------------------------------
# simulation == sequential per-sample loop
# ------------------------------------------------------------------------------------------------

def sequential_exits(rule, probs, ctx):
    """Reference: run each sample alone, segment after segment, as the device would."""
    S, N, _ = probs.shape
    out = []
    for i in range(N):
        seen = []
        for k in range(S):
            seen.append(probs[k][i:i + 1])
            if k == S - 1 or bool(rule.stop(k, seen, ctx)[0]):
                out.append(k)
                break
    return out


@st.composite
def problems(draw):
    S = draw(st.integers(1, 5))
    N = draw(st.integers(1, 12))
    C = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(S, N, C)) * draw(st.sampled_from([0.5, 2.0, 6.0]))
    if draw(st.booleans()):  # ties: repeated rows and quantised logits
        logits = np.round(logits)
    p = np.exp(logits - logits.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    seg = rng.uniform(0.0, 5.0, size=S).round(2).tolist()
    kind = draw(st.sampled_from(sorted(RULES)))
    if kind in ("max_prob", "entropy"):
        th = [None if rng.random() < 0.2 else float(rng.uniform(0, 1)) for _ in range(S)]
        params = {"thresholds": th if draw(st.booleans()) else float(rng.uniform(0, 1))}
    elif kind == "patience":
        params = {"patience": int(rng.integers(1, S + 2)),
                  "min_confidence": None if rng.random() < 0.5 else float(rng.uniform(0, 1))}
    elif kind == "lookahead":
        B = int(rng.integers(1, 5))
        edges = np.unique(np.concatenate([[0.0, 1.0], rng.uniform(0, 1, B - 1)])).tolist()
        B = len(edges) - 1
        multi = draw(st.booleans())
        gain = []
        for k in range(max(S - 1, 1)):
            if multi:
                gain.append([rng.uniform(-0.3, 0.5, B).tolist() if k + h <= S - 1 else None
                             for h in range(1, max(S - 1, 1) + 1)])
                if gain[-1][0] is None:
                    gain[-1][0] = rng.uniform(-0.3, 0.5, B).tolist()
            else:
                gain.append(rng.uniform(-0.3, 0.5, B).tolist())
        params = {"edges": edges, "gain": gain, "lam": float(rng.uniform(0, 0.2)),
                  "statistic": draw(st.sampled_from(["max_prob", "margin", "confidence"])),
                  "interpolation": draw(st.sampled_from(["step", "linear"]))}
    elif kind == "router":  # one path of full stages, random break points per exit
        decisions = {}
        for k in range(S - 1):
            breaks = sorted(rng.uniform(0, 1, int(rng.integers(0, 3))).tolist())
            decisions["F" * (k + 1)] = {"breaks": breaks, "ranked": [
                ["stop"] if rng.random() < 0.5 else ["F", "stop"] for _ in range(len(breaks) + 1)]}
        params = {"policies": [{"exits": list(range(S)), "start": "F", "decisions": decisions}]}
    else:
        params = {}
    return p, seg, kind, params


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_simulate_equals_sequential_loop(problem):
    probs, seg, name, params = problem
    S, N, C = probs.shape
    if name == "lookahead" and S == 1:
        name, params = "full", {}
    rule = make_rule(name, params)
    ctx = StopContext(seg)
    labels = np.arange(N) % C
    res = simulate(rule, probs, labels, ctx)
    ref = sequential_exits(rule, probs, ctx)
    assert res.exits.tolist() == ref
    preds = [int(probs[e, i].argmax()) for i, e in enumerate(ref)]
    assert res.predictions.tolist() == preds
    assert res.accuracy == pytest.approx(np.mean(np.array(preds) == labels))
    lat = [sum(seg[:e + 1]) for e in ref]
    assert res.mean_latency_ms == pytest.approx(np.mean(lat))
    assert res.p99_latency_ms == pytest.approx(np.percentile(lat, 99))
    assert res.exit_histogram == np.bincount(ref, minlength=S).tolist()
    assert res.mean_exit == pytest.approx(np.mean(ref) + 1)


def test_simulate_latency_bookkeeping():
    probs = stack([row(0.95), row(0.5), row(0.5)], [row(0.9), row(0.9), row(0.5)],
                  [row(0.5)] * 3)
    res = simulate(MaxProbRule(0.9), probs, np.array([0, 1, 0]), [2.0, 3.0, 5.0])
    assert res.exits.tolist() == [0, 1, 2]
    assert res.latency_ms.tolist() == [2.0, 5.0, 10.0]
    assert res.mean_latency_ms == pytest.approx(17 / 3)
    assert res.p99_latency_ms == pytest.approx(np.percentile([2, 5, 10], 99))
    assert res.accuracy == pytest.approx(2 / 3) and res.mean_exit == pytest.approx(2.0)
    assert res.summary()["exit_histogram"] == [1, 1, 1]
    assert simulate(MaxProbRule(0.9), probs, None, [2.0, 3.0, 5.0]).accuracy is None
    assert latency_at_exits([2.0, 3.0, 5.0], np.array([2, 0])).tolist() == [10.0, 2.0]
