"""Calibration of stopping rules on validation data (stdlib + numpy only; docs/stopping.md).

``calibrate(rule_name, probs, labels, segment_ms, max_drop=... | mean_budget_ms=...)`` fits a
rule's parameters to one of two targets on precomputed per-exit probabilities ``probs`` (S, N, C):

* ``max_drop`` — lose at most this many accuracy POINTS against full depth (0.5 = half a point),
  with the lowest mean latency;
* ``mean_budget_ms`` — the highest accuracy with mean latency (sum of ``segment_ms`` up to the
  exit taken, averaged) <= the budget.

Every rule family is a path of candidates indexed by a price of latency ``lam`` (accuracy per
ms): for a given ``lam`` the parameters minimise ``-accuracy + lam * mean_latency`` on the data
they are fitted on (thresholds by exact coordinate descent, grids by enumeration), or, for the
look-ahead rule, ``lam`` is the rule's own parameter and the gain tables are fitted once.

Point-estimate mode (default): the data is split in two folds (``fit_fraction``); each fold fits
the path and the other one evaluates it (cross-fitting), so every sample is scored by parameters
fitted without it. ``lam`` is chosen on these held-out scores, then the parameters are refitted
on all the data at that ``lam``.

Risk-controlled mode (``risk_delta=delta``): Learn then Test. The path is fitted on the fit part
only and ordered from conservative to aggressive; each candidate's null hypothesis "drop >
max_drop" (or "mean latency > budget") is tested on the other part at level ``delta`` in that
fixed sequence, stopping at the first non-rejection. The most aggressive accepted candidate is
returned as fitted (no refit): with probability >= 1 - delta over the calibration data, its
accuracy drop on the data distribution is <= max_drop.

``make_rule(result.rule_name, result.params)`` restores the chosen rule; ``result.to_stopping()``
is the manifest's ``stopping`` record.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from runtime.exits import normalised_entropy
from runtime.rules import RULES, STATISTICS, LookAheadRule, StopContext, StoppingRule, make_rule
from export.simulate import check_labels, check_probs, first_exit_where, simulate

__all__ = [
    "CalibrationResult",
    "calibrate",
    "fit_gain_tables",
    "binom_cdf",
    "binom_sf",
    "drop_p_value",
    "drop_upper_bound",
    "hb_p_value",
    "DEFAULT_OPTIONS",
]

#: Per-rule calibration options (override with ``calibrate(..., options={...})``).
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    # shared: one threshold for all exits instead of one per exit; n_lams: size of the lam path
    # n_interp: path points interpolated between consecutive Lagrangian vertices
    "max_prob": {"shared": False, "n_lams": 48, "n_interp": 4},
    "entropy": {"shared": False, "n_lams": 48, "n_interp": 4},
    # n_conf: number of min_confidence values tried (plus "none")
    "patience": {"n_conf": 32, "n_lams": 64},
    # horizon: exits looked ahead (None = every deeper exit, 1 = one-step look-ahead);
    # prior: pseudo-count shrinking a bin's gain to the exit's mean gain
    "lookahead": {"n_bins": 10, "horizon": None, "statistic": "max_prob", "prior": 10.0,
                  "min_per_bin": 40, "interpolation": "linear", "n_lams": 128},
    "full": {},
}


# ================================================================================================
# result
# ================================================================================================

@dataclass
class CalibrationResult:
    """Outcome of ``calibrate``. Accuracies are fractions in [0, 1]; the metrics are those of the
    returned rule on ALL the calibration data (see ``details`` for held-out estimates)."""
    rule_name: str
    params: dict
    val_accuracy: float
    full_depth_accuracy: float
    mean_latency_ms: float
    mean_exit: float                     # 1-based
    exit_histogram: list[int]
    target: dict
    details: dict = field(default_factory=dict)

    def rule(self) -> StoppingRule:
        return make_rule(self.rule_name, self.params)

    def to_dict(self) -> dict:
        return {"rule_name": self.rule_name, "params": self.params,
                "val_accuracy": self.val_accuracy,
                "full_depth_accuracy": self.full_depth_accuracy,
                "mean_latency_ms": self.mean_latency_ms, "mean_exit": self.mean_exit,
                "exit_histogram": list(self.exit_histogram), "target": dict(self.target),
                "details": self.details}

    def to_stopping(self, created: Optional[str] = None, *, skip_config: Optional[str] = None,
                    skip_accuracy: Optional[Mapping[str, float]] = None):
        """The manifest's ``Stopping`` record for this result, calibrated for ``skip_config``,
        with every configuration's full-depth validation accuracy."""
        from runtime.jsonsafe import json_safe
        from runtime.manifest import Stopping, utc_now_iso
        return Stopping(rule=self.rule_name, params=json_safe(dict(self.params)),
                        val_accuracy=min(1.0, max(0.0, self.val_accuracy)),
                        mean_latency_ms=max(0.0, self.mean_latency_ms),
                        created=created or utc_now_iso(), skip_config=skip_config,
                        skip_accuracy={k: float(v) for k, v in (skip_accuracy or {}).items()})


# ================================================================================================
# binomial tails and p-values (numpy + math only)
# ================================================================================================

_LOGC_CACHE: dict[int, np.ndarray] = {}


def _log_binom_coeffs(n: int) -> np.ndarray:
    c = _LOGC_CACHE.get(n)
    if c is None:
        i = np.arange(1, n + 1, dtype=np.float64)
        c = np.concatenate([[0.0], np.cumsum(np.log(n - i + 1) - np.log(i))])
        if len(_LOGC_CACHE) > 64:
            _LOGC_CACHE.clear()
        _LOGC_CACHE[n] = c
    return c


def _binom_logsum(lo: int, hi: int, n: int, p: float) -> float:
    """log P(lo <= Bin(n, p) <= hi) for 0 < p < 1 and 0 <= lo <= hi <= n."""
    logc = _log_binom_coeffs(n)
    # terms further than 12 standard deviations (+ 16) from the mean are negligible relative to
    # the ones kept (Chernoff); a range entirely in one tail keeps its 512 terms nearest the mean
    mu, sd = n * p, math.sqrt(n * p * (1 - p))
    w_lo, w_hi = int(mu - 12 * sd) - 16, int(mu + 12 * sd) + 16
    if hi < w_lo:
        lo = max(lo, hi - 512)
    elif lo > w_hi:
        hi = min(hi, lo + 512)
    else:
        lo, hi = max(lo, min(w_lo, hi - 512)), min(hi, max(w_hi, lo + 512))
    i = np.arange(lo, hi + 1, dtype=np.float64)
    t = logc[lo:hi + 1] + i * math.log(p) + (n - i) * math.log1p(-p)
    m = float(t.max())
    return m + math.log(float(np.exp(t - m).sum()))


def binom_cdf(x: int, n: int, p: float) -> float:
    """P(Bin(n, p) <= x)."""
    x = int(math.floor(x))
    if x < 0:
        return 0.0
    if x >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    return min(1.0, math.exp(_binom_logsum(0, x, n, p)))


def binom_sf(x: int, n: int, p: float) -> float:
    """P(Bin(n, p) >= x)."""
    x = int(math.ceil(x))
    if x <= 0:
        return 1.0
    if x > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    return min(1.0, math.exp(_binom_logsum(x, n, n, p)))


def drop_p_value(n_worse: int, n_better: int, n: int, eps: float) -> float:
    """Valid p-value for H0: ``q+ - q- > eps`` from paired outcomes.

    ``n_worse``: samples the rule gets wrong and full depth right (rate q+); ``n_better``: the
    reverse (rate q-); the accuracy drop is q+ - q-. Split Clopper-Pearson test: reject at level
    a when, for some c >= 0, q+ <= c + eps is supported at level a/2 (binomial lower tail) and
    q- >= c at level a/2 (upper tail; free when c = 0). The p-value is the smallest such a:
    ``2 * min_c max(P_{c+eps}(Bin <= n_worse), P_c(Bin >= n_better))``. Exact (no asymptotics).
    """
    if n <= 0:
        return 1.0
    if eps >= 1.0:
        return 0.0
    if eps <= -1.0:
        return 1.0

    def f_plus(c: float) -> float:  # decreasing in c
        return binom_cdf(n_worse, n, min(1.0, c + eps))

    def g_minus(c: float) -> float:  # increasing in c; q- >= 0 is free
        return 0.0 if c <= 0.0 else binom_sf(n_better, n, min(1.0, c))

    lo, hi = max(0.0, -eps), min(1.0, 1.0 - eps)
    best = max(f_plus(lo), g_minus(lo))
    if n_better > 0 or lo > 0.0:
        a, b = lo, hi
        for _ in range(40):
            mid = 0.5 * (a + b)
            if f_plus(mid) > g_minus(mid):
                a = mid
            else:
                b = mid
        best = min(best, max(f_plus(a), g_minus(a)), max(f_plus(b), g_minus(b)))
    return min(1.0, 2.0 * best)


def drop_upper_bound(n_worse: int, n_better: int, n: int, delta: float) -> float:
    """Upper confidence bound (level 1 - delta) on the drop q+ - q-: smallest eps with
    ``drop_p_value(..., eps) <= delta``."""
    lo, hi = -1.0, 1.0
    for _ in range(32):
        mid = 0.5 * (lo + hi)
        if drop_p_value(n_worse, n_better, n, mid) <= delta:
            hi = mid
        else:
            lo = mid
    return hi


def hb_p_value(mean_loss: float, n: int, t: float) -> float:
    """Hoeffding-Bentkus p-value for H0: E[loss] > t, losses in [0, 1], n samples with mean
    ``mean_loss`` (Bates et al. 2021; Angelopoulos et al. 2021, Learn then Test)."""
    if n <= 0:
        return 1.0
    if t >= 1.0:
        return 0.0
    if t <= 0.0:
        return 1.0
    r = min(max(mean_loss, 0.0), 1.0)
    a = min(r, t)

    def h1(a: float, b: float) -> float:
        out = 0.0
        if a > 0:
            out += a * math.log(a / b)
        if a < 1:
            out += (1 - a) * math.log((1 - a) / (1 - b))
        return out

    hoeffding = math.exp(-n * h1(a, t))
    bentkus = math.e * binom_cdf(int(math.ceil(n * r - 1e-9)), n, t)
    return min(1.0, hoeffding, bentkus)


# ================================================================================================
# data
# ================================================================================================

class _Data:
    """Per-sample arrays derived from probs: predictions, correctness, statistics (cached)."""

    def __init__(self, probs: np.ndarray, labels: np.ndarray, cum_ms: np.ndarray,
                 _derived: Optional[dict] = None):
        self.probs = probs
        self.labels = labels
        self.cum_ms = cum_ms
        self.S, self.n = probs.shape[:2]
        if _derived is None:
            pred = probs.argmax(axis=2)
            _derived = {"pred": pred, "correct": pred == labels[None, :]}
        self._d = _derived

    @property
    def pred(self) -> np.ndarray:
        return self._d["pred"]

    @property
    def correct(self) -> np.ndarray:
        return self._d["correct"]

    def stat(self, name: str) -> np.ndarray:
        """(S, N) statistic: 'max_prob', 'margin', 'confidence' or 'neg_entropy'."""
        key = "stat:" + name
        if key not in self._d:
            if name == "neg_entropy":
                self._d[key] = -normalised_entropy(self.probs)
            else:
                self._d[key] = STATISTICS[name](self.probs)
        return self._d[key]

    def take(self, idx: np.ndarray) -> "_Data":
        d = {k: v[:, idx] for k, v in self._d.items()}
        return _Data(self.probs[:, idx], self.labels[idx], self.cum_ms, d)

    def outcome(self, exits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(correct (N,), latency (N,)) when sample i stops at exits[i]."""
        return self.correct[exits, np.arange(self.n)], self.cum_ms[exits]


# ================================================================================================
# rule families: fit on some data, give the candidate for a price lam, evaluate it elsewhere
# ================================================================================================

_NEVER = None  # the "never stop early" candidate (exported as rule "full")


def _lagrangian_pick(acc: np.ndarray, lat: np.ndarray, lam: float) -> int:
    """Index minimising -acc + lam * lat; ties go to the higher latency (more conservative)."""
    order = np.lexsort((-acc, -lat))  # by latency descending, then accuracy descending
    j = -acc[order] + lam * lat[order]
    return int(order[int(np.argmin(j))])


def _default_lams(cum_ms: np.ndarray, n: int) -> np.ndarray:
    """0 and a geometric grid of prices: lam * C_S from 1e-4 to 3 accuracy per full network."""
    total = float(cum_ms[-1]) if cum_ms[-1] > 0 else 1.0
    return np.concatenate([[0.0], np.geomspace(1e-4, 3.0, max(1, n - 1)) / total])


def _threshold_at_fraction(sorted_desc: np.ndarray, u: float, lo: float) -> float:
    """Threshold t such that a fraction ~u of the values stop (value >= t): inf for u = 0,
    ``lo`` (always stop) for u = 1, else the midpoint between neighbouring values."""
    n = sorted_desc.size
    m = int(round(float(u) * n))
    if m <= 0 or n == 0:
        return math.inf
    if m >= n:
        return lo
    hi_v, lo_v = float(sorted_desc[m - 1]), float(sorted_desc[m])
    t = lo_v + 0.5 * (hi_v - lo_v)
    return t if lo_v < t <= hi_v else hi_v


class _Fitted:
    """A rule family fitted on some data: an ordered path of candidates, indexed by a float
    ``position`` (conservative -> aggressive)."""
    rule_name: str

    def positions(self) -> np.ndarray:
        raise NotImplementedError

    def candidate(self, pos: float):
        raise NotImplementedError

    def stop_matrix(self, cand, data: _Data) -> np.ndarray:
        raise NotImplementedError

    def params(self, cand) -> tuple[str, dict]:
        raise NotImplementedError

    def exits(self, cand, data: _Data) -> np.ndarray:
        if cand is _NEVER:
            return np.full(data.n, data.S - 1, dtype=np.intp)
        return first_exit_where(self.stop_matrix(cand, data))

    def export(self, cand) -> tuple[str, dict]:
        return ("full", {}) if cand is _NEVER else self.params(cand)


# -- per-exit / shared thresholds (max_prob, entropy) ---------------------------------------------

def _fit_per_exit_thresholds(stat: np.ndarray, correct: np.ndarray, cum_ms: np.ndarray,
                             lam: float, lo: float, orders: Sequence[np.ndarray],
                             max_sweeps: int = 6) -> np.ndarray:
    """Thresholds t (S-1,) minimising mean(-correct + lam * latency) of "stop at the first k with
    stat_k >= t_k" on the given samples, by exact coordinate descent (each t_k optimal given the
    others), sweeping from the last decision exit backwards (a first sweep from "never stop" is
    backward induction). ``inf`` = never stop at that exit, ``lo`` = always stop."""
    S, N = stat.shape
    t = np.full(S - 1, np.inf)
    value = lam * cum_ms[:, None] - correct
    cols = np.arange(N)
    for _ in range(max_sweeps):
        changed = False
        for k in range(S - 2, -1, -1):
            stops = stat[:S - 1] >= t[:, None]
            reach = ~stops[:k].any(axis=0)
            tail = np.vstack([stops[k + 1:], np.ones((1, N), dtype=bool)])
            cont = value[k + 1 + tail.argmax(axis=0), cols]
            order = orders[k][reach[orders[k]]]
            if order.size == 0:
                continue
            s = stat[k, order]
            csum = np.concatenate([[0.0], np.cumsum(value[k, order] - cont[order])])
            valid = np.ones(order.size + 1, dtype=bool)
            valid[1:-1] = s[:-1] > s[1:]
            m = int(np.argmin(np.where(valid, csum, np.inf)))
            if m == 0:
                new = np.inf
            elif m == order.size:
                new = lo
            else:
                hi_v, lo_v = float(s[m - 1]), float(s[m])
                new = lo_v + 0.5 * (hi_v - lo_v)
                if not lo_v < new <= hi_v:
                    new = hi_v
            if not np.array_equal(stat[k] >= new, stops[k]):
                t[k] = new
                changed = True
        if not changed:
            break
    return t


class _ThresholdFitted(_Fitted):
    """max_prob / entropy: stop at exit k iff stat_k >= t_k.

    Per-exit thresholds: the vertices of the path are the Lagrangian optima for a grid of prices
    (coordinate descent), and ``n_interp`` points are interpolated between consecutive vertices
    in quantile space (each exit's fraction of stopping samples moves linearly), so the path has
    no big jumps in latency. Shared threshold: the path is the pooled upper quantiles.
    """

    def __init__(self, rule_name: str, data: _Data, stat_name: str, lo: float, sign: float,
                 shared: bool, n_lams: int, n_interp: int):
        self.rule_name = rule_name
        self.stat_name, self.lo, self.sign, self.shared = stat_name, lo, sign, shared
        stat = data.stat(stat_name)
        S, N = stat.shape
        if shared:
            self._pooled = np.sort(stat[:-1].ravel())[::-1]
            self._positions = np.linspace(0.0, 1.0, 401)
            return
        self._sorted = [np.sort(stat[k])[::-1] for k in range(S - 1)]
        orders = [np.argsort(-stat[k], kind="stable") for k in range(S - 1)]
        verts = []
        for lam in _default_lams(data.cum_ms, n_lams):
            t = _fit_per_exit_thresholds(stat, data.correct, data.cum_ms, float(lam), lo, orders)
            verts.append([float(np.mean(stat[k] >= t[k])) if N else 0.0 for k in range(S - 1)])
        self._verts = np.array(verts)
        step = 1.0 / max(1, int(n_interp))
        self._positions = np.arange(0.0, len(verts) - 1 + 1e-9, step)

    def positions(self):
        return self._positions

    def candidate(self, pos):
        pos = float(pos)
        if self.shared:
            t = _threshold_at_fraction(self._pooled, pos, self.lo)
            return _NEVER if math.isinf(t) else ("shared", t)
        i = min(int(math.floor(pos + 1e-9)), len(self._verts) - 1)
        a = pos - i if i < len(self._verts) - 1 else 0.0
        u = self._verts[i] if a <= 1e-9 else (1 - a) * self._verts[i] + a * self._verts[i + 1]
        t = tuple(_threshold_at_fraction(self._sorted[k], u[k], self.lo) for k in range(len(u)))
        return _NEVER if all(math.isinf(x) for x in t) else ("per_exit", t)

    def stop_matrix(self, cand, data):
        stat = data.stat(self.stat_name)
        kind, t = cand
        t = np.full(data.S - 1, t) if kind == "shared" else np.asarray(t)
        out = np.ones((data.S, data.n), dtype=bool)
        out[:-1] = stat[:-1] >= t[:, None]
        return out

    def params(self, cand):
        kind, t = cand

        def conv(x: float):
            if math.isinf(x):
                return None
            v = self.sign * x
            return float(min(1.0, max(0.0, v)))

        if kind == "shared":
            return self.rule_name, {"thresholds": conv(t)}
        return self.rule_name, {"thresholds": [conv(x) for x in t]}


# -- patience ------------------------------------------------------------------------------------

class _PatienceFitted(_Fitted):
    """Patience with an optional min_confidence: a grid of (patience, min_confidence); the path
    is the Lagrangian optimum of the grid for a grid of prices (position = price)."""
    rule_name = "patience"

    def __init__(self, data: _Data, n_conf: int, n_lams: int):
        self._lams = _default_lams(data.cum_ms, n_lams)
        S = data.S
        top = data.stat("max_prob")
        confs = np.unique(np.quantile(top[:-1].ravel(), np.linspace(0.0, 1.0, n_conf + 1)[1:]))
        self._cands = [(p, None) for p in range(1, S)] + \
                      [(p, float(m)) for p in range(1, S) for m in confs]
        acc, lat = [], []
        for c in self._cands:
            cc, ll = data.outcome(self.exits(c, data))
            acc.append(cc.mean())
            lat.append(ll.mean())
        self._acc, self._lat = np.array(acc), np.array(lat)

    def positions(self):
        return self._lams

    def candidate(self, pos):
        if not self._cands:
            return _NEVER
        return self._cands[_lagrangian_pick(self._acc, self._lat, float(pos))]

    @staticmethod
    def _runs(data: _Data) -> np.ndarray:
        if "runs" not in data._d:
            pred = data.pred
            runs = np.ones(pred.shape, dtype=np.int64)
            for k in range(1, pred.shape[0]):
                runs[k] = np.where(pred[k] == pred[k - 1], runs[k - 1] + 1, 1)
            data._d["runs"] = runs
        return data._d["runs"]

    def stop_matrix(self, cand, data):
        p, m = cand
        out = self._runs(data) >= p
        if m is not None:
            out &= data.stat("max_prob") >= m
        out[-1] = True
        return out

    def params(self, cand):
        p, m = cand
        return "patience", {"patience": int(p), "min_confidence": m}


# -- look-ahead ----------------------------------------------------------------------------------

def _pava_decreasing(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares non-increasing fit (pool adjacent violators)."""
    vals, wts, lens = [], [], []
    for yi, wi in zip(y.tolist(), w.tolist()):
        vals.append(yi)
        wts.append(wi)
        lens.append(1)
        while len(vals) > 1 and vals[-2] < vals[-1]:
            v2, w2, l2 = vals.pop(), wts.pop(), lens.pop()
            v1, w1, l1 = vals.pop(), wts.pop(), lens.pop()
            wt = w1 + w2
            vals.append((v1 * w1 + v2 * w2) / wt if wt > 0 else 0.5 * (v1 + v2))
            wts.append(wt)
            lens.append(l1 + l2)
    return np.repeat(np.array(vals), lens)


def fit_gain_tables(stat: np.ndarray, correct: np.ndarray, *, n_bins: int = 10,
                    horizon: Optional[int] = None, prior: float = 10.0,
                    min_per_bin: int = 40) -> tuple[list[list[float]], list]:
    """Gain tables of the look-ahead rule from calibration data.

    ``stat`` (S, N): the per-exit statistic; ``correct`` (S, N) bool. For every decision exit k
    (0..S-2): equal-count bins of ``stat[k]`` (at most ``n_bins``, at least ``min_per_bin``
    samples each, edges spanning [0, 1]), and for every horizon h = 1..H the bin means of
    ``correct[k+h] - correct[k]``, shrunk towards the exit's overall mean with ``prior``
    pseudo-samples and made non-increasing in the statistic (weighted isotonic regression).
    Returns (edges per exit, gain) in the layout of LookAheadRule's params: one-step
    (``gain[k][b]``) when H == 1, else ``gain[k][h-1][b]`` with None beyond the last exit.
    """
    S, N = stat.shape
    H = S - 1 if horizon is None else max(1, min(int(horizon), S - 1))
    edges_out, gain_out = [], []
    for k in range(S - 1):
        s = stat[k].astype(np.float64)
        B = max(1, min(int(n_bins), N // max(1, int(min_per_bin))))
        inner = np.quantile(s, np.linspace(0.0, 1.0, B + 1)[1:-1]) if B > 1 else np.array([])
        edges = np.unique(np.concatenate([[0.0], inner[(inner > 0.0) & (inner < 1.0)], [1.0]]))
        nb = len(edges) - 1
        b = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, nb - 1)
        counts = np.bincount(b, minlength=nb).astype(np.float64)
        rows = []
        for h in range(1, H + 1):
            if k + h > S - 1:
                rows.append(None)
                continue
            d = correct[k + h].astype(np.float64) - correct[k].astype(np.float64)
            mu = float(d.mean()) if N else 0.0
            sums = np.bincount(b, weights=d, minlength=nb)
            g = (sums + prior * mu) / np.maximum(counts + prior, 1e-12)
            g = _pava_decreasing(g, counts + prior)
            rows.append([float(np.clip(x, -1.0, 1.0)) for x in g])
        edges_out.append([float(x) for x in edges])
        gain_out.append(rows[0] if H == 1 else rows)
    return edges_out, gain_out


class _LookAheadFitted(_Fitted):
    rule_name = "lookahead"

    def __init__(self, data: _Data, n_bins: int, horizon: Optional[int], statistic: str,
                 prior: float, min_per_bin: int, interpolation: str, n_lams: int):
        if statistic not in STATISTICS:
            raise ValueError(f"options['statistic']: expected one of {', '.join(STATISTICS)}, "
                             f"got {statistic!r}")
        if interpolation not in LookAheadRule.INTERPOLATIONS:
            raise ValueError(f"options['interpolation']: expected one of "
                             f"{', '.join(LookAheadRule.INTERPOLATIONS)}, got {interpolation!r}")
        self.statistic, self.interpolation, self.n_lams = statistic, interpolation, n_lams
        self.segment_ms = np.diff(np.concatenate([[0.0], data.cum_ms]))
        self.edges, self.gain = fit_gain_tables(data.stat(statistic), data.correct,
                                                n_bins=n_bins, horizon=horizon, prior=prior,
                                                min_per_bin=min_per_bin)
        self._rules: dict[float, LookAheadRule] = {}

    def rule(self, lam: float) -> LookAheadRule:
        r = self._rules.get(lam)
        if r is None:
            if not self._rules:
                r = LookAheadRule(self.edges, self.gain, lam, self.statistic, self.interpolation)
            else:  # same validated tables, another price
                r = copy.copy(next(iter(self._rules.values())))
                r.lam = float(lam)
            self._rules[lam] = r
        return r

    def critical_lams(self) -> np.ndarray:
        """The prices at which some (exit, bin) decision flips: max_h gain / cost."""
        r0 = self.rule(0.0)
        seg = self.segment_ms
        out = []
        for k, g in enumerate(r0._gain):
            best = np.full(g.shape[1], -np.inf)
            cost = 0.0
            for h in range(g.shape[0]):
                if k + h + 1 >= len(seg):
                    break
                cost += float(seg[k + h + 1])
                row = g[h]
                if cost > 0:
                    ratio = row / cost
                else:
                    ratio = np.where(row <= 0, -np.inf, np.inf)
                best = np.where(np.isnan(row), best, np.maximum(best, ratio))
            out.extend(best[np.isfinite(best) & (best > 0)].tolist())
        return np.array(out)

    def positions(self):
        crit = self.critical_lams()
        grid = [[0.0], crit * (1 + 1e-9)]
        if self.interpolation == "linear" and crit.size:
            # decisions move continuously with lam between the knots' critical values
            lo, hi = float(crit.min()), float(crit.max())
            grid.append(np.geomspace(lo, hi, self.n_lams) if hi > lo else np.array([lo]))
        return np.unique(np.concatenate(grid))

    def candidate(self, lam):
        return float(lam)

    def stop_matrix(self, lam, data):
        rule = self.rule(lam)
        stat = data.stat(self.statistic)
        out = np.ones((data.S, data.n), dtype=bool)
        for k in range(data.S - 1):
            out[k] = rule.stop_from_stat(k, stat[k], self.segment_ms)
        return out

    def params(self, lam):
        return "lookahead", self.rule(lam).params()


class _FullFitted(_Fitted):
    rule_name = "full"

    def positions(self):
        return np.array([0.0])

    def candidate(self, lam):
        return _NEVER


def _make_fitted(rule_name: str, data: _Data, opts: dict) -> _Fitted:
    if rule_name == "max_prob":
        return _ThresholdFitted("max_prob", data, "max_prob", 0.0, 1.0, bool(opts["shared"]),
                                int(opts["n_lams"]), int(opts["n_interp"]))
    if rule_name == "entropy":
        # stat = -H/log C, stop iff stat >= t  <=>  H/log C <= -t (negation is exact)
        return _ThresholdFitted("entropy", data, "neg_entropy", -1.0, -1.0,
                                bool(opts["shared"]), int(opts["n_lams"]), int(opts["n_interp"]))
    if rule_name == "patience":
        return _PatienceFitted(data, int(opts["n_conf"]), int(opts["n_lams"]))
    if rule_name == "lookahead":
        return _LookAheadFitted(data, int(opts["n_bins"]), opts["horizon"], opts["statistic"],
                                float(opts["prior"]), int(opts["min_per_bin"]),
                                opts["interpolation"], int(opts["n_lams"]))
    return _FullFitted()


# ================================================================================================
# calibrate
# ================================================================================================

def _check_options(rule_name: str, options: Optional[Mapping[str, Any]]) -> dict:
    opts = dict(DEFAULT_OPTIONS[rule_name])
    for k, v in (options or {}).items():
        if k not in opts:
            raise ValueError(f"options[{k!r}]: unknown option for rule {rule_name!r} "
                             f"(known: {', '.join(sorted(opts)) or 'none'})")
        opts[k] = v
    for k in ("n_lams", "n_conf", "n_bins", "min_per_bin", "n_interp"):
        if k in opts and (isinstance(opts[k], bool) or not isinstance(opts[k], int)
                          or opts[k] < 1):
            raise ValueError(f"options[{k!r}]: expected an integer >= 1, got {opts[k]!r}")
    if "horizon" in opts and opts["horizon"] is not None and (
            isinstance(opts["horizon"], bool) or not isinstance(opts["horizon"], int)
            or opts["horizon"] < 1):
        raise ValueError(f"options['horizon']: expected None or an integer >= 1, got "
                         f"{opts['horizon']!r}")
    if "prior" in opts and (not isinstance(opts["prior"], (int, float)) or opts["prior"] < 0):
        raise ValueError(f"options['prior']: expected a number >= 0, got {opts['prior']!r}")
    return opts


def _finite_nonneg(name: str, x: object, *, positive: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name}: expected a number, got {x!r}")
    x = float(x)
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, "
                         f"got {x!r}")
    return x


def calibrate(rule_name: str, probs: np.ndarray, labels: np.ndarray,
              segment_ms: Sequence[float], *, max_drop: Optional[float] = None,
              mean_budget_ms: Optional[float] = None, risk_delta: Optional[float] = None,
              fit_fraction: float = 0.5, seed: int = 0,
              options: Optional[Mapping[str, Any]] = None) -> CalibrationResult:
    """Fit ``rule_name``'s parameters on validation data to a target.

    probs (S, N, C) per-exit softmax; labels (N,); segment_ms (S,) cost of each segment on the
    target device. Exactly one target: ``max_drop`` (accuracy points vs full depth, >= 0) or
    ``mean_budget_ms`` (> 0). ``risk_delta`` in (0, 1) switches to the risk-controlled (Learn
    then Test) variant. ``fit_fraction``: share of the data in the fitting fold. ``options``
    override DEFAULT_OPTIONS[rule_name].
    """
    # -- validation ------------------------------------------------------------------------------
    if not isinstance(rule_name, str) or rule_name not in RULES:
        raise ValueError(f"unknown stopping rule {rule_name!r} (known: {', '.join(RULES)})")
    if (max_drop is None) == (mean_budget_ms is None):
        raise ValueError("give exactly one target: max_drop (accuracy points vs full depth) or "
                         "mean_budget_ms (mean latency budget)")
    if max_drop is not None:
        max_drop = _finite_nonneg("max_drop", max_drop)
        if max_drop > 100:
            raise ValueError(f"max_drop: is in accuracy points (0..100), got {max_drop!r}")
    if mean_budget_ms is not None:
        mean_budget_ms = _finite_nonneg("mean_budget_ms", mean_budget_ms, positive=True)
    if risk_delta is not None:
        if isinstance(risk_delta, bool) or not isinstance(risk_delta, (int, float)) \
                or not 0.0 < float(risk_delta) < 1.0:
            raise ValueError(f"risk_delta: expected a number in (0, 1), got {risk_delta!r}")
        risk_delta = float(risk_delta)
    if isinstance(fit_fraction, bool) or not isinstance(fit_fraction, (int, float)) \
            or not 0.0 < float(fit_fraction) < 1.0:
        raise ValueError(f"fit_fraction: expected a number in (0, 1), got {fit_fraction!r}")
    p = check_probs(probs)
    S, N, C = p.shape
    y = check_labels(labels, N, C)
    ctx = StopContext(segment_ms=segment_ms)
    if ctx.num_exits != S:
        raise ValueError(f"segment_ms: expected {S} costs (one per exit of probs), got "
                         f"{ctx.num_exits}")
    cum = np.cumsum(np.asarray(ctx.segment_ms, dtype=np.float64))
    if mean_budget_ms is not None and mean_budget_ms < cum[0]:
        raise ValueError(f"mean_budget_ms: {mean_budget_ms} ms is below the cost of the first "
                         f"exit ({cum[0]} ms); no rule can meet it")
    n_fit = int(round(float(fit_fraction) * N))
    if n_fit < 1 or n_fit > N - 1:
        raise ValueError(f"fit_fraction={fit_fraction} leaves an empty fold with N={N} samples")
    opts = _check_options(rule_name, options)

    data = _Data(p, y, cum)
    full_acc = float(data.correct[-1].mean())
    target = {"max_drop": max_drop, "mean_budget_ms": mean_budget_ms, "risk_delta": risk_delta}
    details: dict[str, Any] = {"segment_ms": list(ctx.segment_ms), "n": N,
                               "options": {k: v for k, v in opts.items()},
                               "lam_units": "accuracy (fraction) per ms"}

    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    idx_a, idx_b = np.sort(perm[:n_fit]), np.sort(perm[n_fit:])

    if rule_name == "full" or S == 1:
        chosen_name, chosen_params = "full", {}
        details.update(method="none", position=None, lam=None,
                       target_met=max_drop is not None or float(cum[-1]) <= mean_budget_ms,
                       fallback=None if rule_name == "full" else "one exit: nothing to decide")
    elif risk_delta is None:
        chosen_name, chosen_params = _cross_fit(rule_name, data, idx_a, idx_b, opts, max_drop,
                                                mean_budget_ms, details)
    else:
        chosen_name, chosen_params = _learn_then_test(rule_name, data, idx_a, idx_b, opts,
                                                      max_drop, mean_budget_ms, risk_delta,
                                                      details)

    rule = make_rule(chosen_name, chosen_params)
    sim = simulate(rule, p, y, ctx)
    return CalibrationResult(rule_name=chosen_name, params=rule.params(),
                             val_accuracy=float(sim.accuracy), full_depth_accuracy=full_acc,
                             mean_latency_ms=sim.mean_latency_ms, mean_exit=sim.mean_exit,
                             exit_histogram=sim.exit_histogram, target=target, details=details)


def _path_metrics(fitted: _Fitted, data: _Data, positions: np.ndarray) -> list[tuple]:
    """[(position or None, candidate, accuracy, mean latency)] on ``data``, never-stop first."""
    rows = [(None, _NEVER, float(data.correct[-1].mean()), float(data.cum_ms[-1]))]
    for pos in positions:
        cand = fitted.candidate(pos)
        c, l = data.outcome(fitted.exits(cand, data))
        rows.append((float(pos), cand, float(c.mean()), float(l.mean())))
    return rows


def _cross_fit(rule_name, data, idx_a, idx_b, opts, max_drop, budget, details):
    """Point-estimate calibration.

    1. Each fold fits the family's path; the other fold scores it (every sample is scored by
       parameters fitted without it): held-out accuracy drop and mean latency per position.
    2. max_drop: the held-out drop, made non-increasing in latency (isotonic fit, which removes
       the winner's curse of picking the luckiest point), gives the lowest mean latency L* at
       which the drop is <= max_drop.
    3. Refit the path on all the data and take, for max_drop, the fastest candidate whose mean
       latency is >= L* (latency needs no labels, so it transfers between fits where accuracy
       would not), or, for a budget, the most accurate candidate with mean latency <= budget.
    """
    da, db = data.take(idx_a), data.take(idx_b)
    fa, fb = _make_fitted(rule_name, da, opts), _make_fitted(rule_name, db, opts)
    positions = np.unique(np.concatenate([fa.positions(), fb.positions()]))
    n = data.n
    full_acc = float(data.correct[-1].mean())
    total = float(data.cum_ms[-1])
    ho = [(None, 0.0, total, full_acc)]  # (position, drop, latency, accuracy), never-stop first
    for pos in positions:
        corr = np.empty(n, dtype=bool)
        lat = np.empty(n)
        for fitted, ev_idx, ev in ((fa, idx_b, db), (fb, idx_a, da)):
            c, l = ev.outcome(fitted.exits(fitted.candidate(pos), ev))
            corr[ev_idx], lat[ev_idx] = c, l
        acc = float(corr.mean())
        ho.append((float(pos), full_acc - acc, float(lat.mean()), acc))
    h_drop = np.array([r[1] for r in ho])
    h_lat = np.array([r[2] for r in ho])
    h_acc = np.array([r[3] for r in ho])

    fitted = _make_fitted(rule_name, data, opts)  # refit on all the data
    path = _path_metrics(fitted, data, np.unique(fitted.positions()))
    p_acc = np.array([r[2] for r in path])
    p_lat = np.array([r[3] for r in path])
    idx = np.arange(len(path))
    tol = 1e-9 * max(1.0, total)
    if max_drop is not None:
        order = np.lexsort((h_drop, h_lat))                 # by latency ascending
        smooth = np.empty(len(ho))
        smooth[order] = _pava_decreasing(h_drop[order], np.ones(len(ho)))
        ok = smooth <= max_drop / 100.0 + 1e-12             # never-stop (drop 0) is always ok
        l_star = float(h_lat[ok].min())
        c = idx[p_lat >= l_star - tol]                      # never-stop is always >= L*
        i = int(c[np.lexsort((c, -p_acc[c], p_lat[c]))[0]])
        met = True
        j = int(np.flatnonzero(ok)[np.argmin(h_lat[ok])])
    else:
        l_star = float(budget)
        ok = p_lat <= budget + tol
        met = bool(ok.any())
        c = idx[ok] if met else idx
        i = int(c[np.lexsort((c, p_lat[c], -p_acc[c]))[0]]) if met else int(np.argmin(p_lat))
        hok = h_lat <= budget + tol
        hc = np.flatnonzero(hok)
        j = int(hc[np.lexsort((hc, h_lat[hc], -h_acc[hc]))[0]]) if hok.any() \
            else int(np.argmin(h_lat))
    pos, cand = path[i][0], path[i][1]
    name, params = fitted.export(cand)
    details.update(
        method="cross-fit", position=pos, lam=params.get("lam"), target_met=met,
        n_fit=len(idx_a), n_select=len(idx_b), target_latency_ms=l_star,
        fit={"accuracy": float(p_acc[i]), "drop_points": 100 * (full_acc - float(p_acc[i])),
             "mean_latency_ms": float(p_lat[i])},
        held_out={"position": ho[j][0], "accuracy": float(h_acc[j]),
                  "drop_points": 100 * float(h_drop[j]), "mean_latency_ms": float(h_lat[j])},
        frontier=[[r[0], 100 * r[1], r[2]] for r in ho],
        fallback=None)
    if cand is _NEVER:
        details["fallback"] = "no early-exit candidate met the target on held-out folds; " \
                              "full depth"
    if not met:
        details["fallback"] = "no candidate meets the budget; returned the fastest"
    return name, params


def _learn_then_test(rule_name, data, idx_fit, idx_risk, opts, max_drop, budget, delta,
                     details):
    """Risk-controlled calibration (Learn then Test with fixed-sequence testing)."""
    dfit, drisk = data.take(idx_fit), data.take(idx_risk)
    fitted = _make_fitted(rule_name, dfit, opts)
    # the path, conservative -> aggressive, fitted on the fit part only (distinct rules)
    path, seen, pos_of = [_NEVER], {_NEVER}, [None]
    for pos in np.sort(fitted.positions()):
        cand = fitted.candidate(pos)
        if cand not in seen:
            path.append(cand)
            seen.add(cand)
            pos_of.append(float(pos))
    n = drisk.n
    full_c = drisk.correct[-1]
    total = float(data.cum_ms[-1])
    tests = []
    if max_drop is not None:
        # H0_j: drop_j > max_drop, tested from the most conservative candidate on; the
        # never-stop candidate has drop exactly 0 and needs no test
        eps = max_drop / 100.0
        chosen = 0
        for j in range(1, len(path)):
            c, _ = drisk.outcome(fitted.exits(path[j], drisk))
            worse = int(np.sum(full_c & ~c))
            better = int(np.sum(~full_c & c))
            pv = drop_p_value(worse, better, n, eps)
            tests.append({"position": pos_of[j], "p_value": pv,
                          "drop_points": 100 * (worse - better) / n})
            if pv > delta:
                break
            chosen = j
        certified = True
        c, _ = drisk.outcome(fitted.exits(path[chosen], drisk))
        worse, better = int(np.sum(full_c & ~c)), int(np.sum(~full_c & c))
        details["drop_ucb_points"] = 100 * drop_upper_bound(worse, better, n, delta)
        statement = (f"with probability >= {1 - delta:g} over the calibration data, the accuracy "
                     f"drop vs full depth on the data distribution is <= {max_drop:g} points")
    else:
        # H0_j: mean latency_j > budget, tested from the fastest candidate on
        t = budget / total if total > 0 else 1.0
        chosen, certified = None, False
        for j in range(len(path) - 1, -1, -1):
            _, l = drisk.outcome(fitted.exits(path[j], drisk))
            pv = hb_p_value(float(l.mean()) / total if total > 0 else 0.0, n, t)
            tests.append({"position": pos_of[j], "p_value": pv,
                          "mean_latency_ms": float(l.mean())})
            if pv > delta:
                break
            chosen, certified = j, True
        if chosen is None:
            chosen = len(path) - 1
        statement = (f"with probability >= {1 - delta:g} over the calibration data, the mean "
                     f"latency on the data distribution is <= {budget:g} ms" if certified else
                     f"NOT certified: no candidate passed the test at delta={delta:g}; returned "
                     f"the fastest candidate")
    c, l = drisk.outcome(fitted.exits(path[chosen], drisk))
    name, params = fitted.export(path[chosen])
    details.update(
        method="learn-then-test", position=pos_of[chosen], lam=params.get("lam"), delta=delta,
        confidence=1 - delta, certified=certified, statement=statement, n_fit=len(idx_fit),
        n_risk=n, candidates=len(path), tested=len(tests), tests=tests,
        risk_part={"accuracy": float(c.mean()),
                   "drop_points": 100 * float(full_c.mean() - c.mean()),
                   "mean_latency_ms": float(l.mean())},
        fallback=None if path[chosen] is not _NEVER else
        "no early-exit candidate passed the test; full depth")
    return name, params
