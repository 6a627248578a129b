"""Stopping rules of the early-exit runtime (stdlib + numpy only; see docs/stopping.md).

After exit k the runtime holds the softmax of exits 0..k for the samples still running and asks
the rule which of them stop now::

    rule = make_rule("max_prob", {"thresholds": [0.9, 0.8]})
    ctx = StopContext(segment_ms=[2.0, 3.1, 3.4])       # cost of each segment on this device
    done = rule.stop(k, [p0, p1, ..., pk], ctx)         # bool (n,), True = stop after exit k

Rules are *causal* (they read exits <= k only), *row-wise* (a sample's decision depends on its
own probabilities only, never on the other samples of the batch) and *stateless*. At the last
exit (k = S - 1, S = len(ctx.segment_ms)) every rule returns all True; callers stop there anyway.

Every rule's parameters are a JSON object, and ``make_rule(rule.name, rule.params())`` gives an
equal rule. ``rule_from_stopping`` restores the rule stored in a bundle manifest.

=============  ==================================================================================
name           stops after exit k when
=============  ==================================================================================
``max_prob``   ``max_c p_k[c] >= thresholds[k]``
``entropy``    ``H(p_k) / log C <= thresholds[k]``
``patience``   the argmax of exits k-patience+1..k is the same (and ``max p_k >= min_confidence``)
``lookahead``  ``max_h ( gain_k,h(s_k) - lam * (segment_ms[k+1] + .. + segment_ms[k+h]) ) <= 0``
``full``       never (full depth)
``router``     the fitted policy's first choice at this exit is to stop (joint routing: see
               :mod:`runtime.routing`; the runtime also picks the next span's variant per input)
=============  ==================================================================================
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import numpy as np

from .errors import ConfigError
from .exits import normalised_entropy, top2_margin, top_prob
from .latency import STATS, find_groups, piece_sums
from .validate import Validator, type_name
from .errors import UsageError

__all__ = [
    "StopContext",
    "StoppingRule",
    "MaxProbRule",
    "EntropyRule",
    "PatienceRule",
    "LookAheadRule",
    "FullDepthRule",
    "RULES",
    "STATISTICS",
    "make_rule",
    "rule_from_stopping",
]


def _confidence(p: np.ndarray) -> np.ndarray:
    return 1.0 - normalised_entropy(p)


#: Per-exit confidence statistics a look-ahead rule can bin on; each is in [0, 1] and grows
#: with confidence.
STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "max_prob": top_prob,
    "margin": top2_margin,
    "confidence": _confidence,  # 1 - normalised entropy
}

#: ``stat=`` of :meth:`StopContext.from_manifest`: a LatencyEntry field name.
LATENCY_STATS = tuple(f"{s}_ms" for s in STATS)


# ------------------------------------------------------------------------------------------------
# context
# ------------------------------------------------------------------------------------------------

@dataclass
class StopContext:
    """What a rule may know about the device: the cost of each segment.

    ``segment_ms[k]`` is the latency (ms) of segment k — everything that runs between the decision
    at exit k-1 and exit k's prediction, head included — on this device, backend and skip config
    (p50 or mean from the bundle's latency table, or an estimate). Its length is the number of
    exits S. ``skip_config`` is informative.
    """
    segment_ms: Sequence[float]
    skip_config: Optional[str] = None

    def __post_init__(self) -> None:
        try:
            seg = tuple(float(x) for x in self.segment_ms)
        except (TypeError, ValueError):
            raise ValueError(f"StopContext.segment_ms: expected a sequence of numbers, got "
                             f"{self.segment_ms!r}") from None
        if not seg:
            raise ValueError("StopContext.segment_ms: needs one cost per exit, got none")
        for k, x in enumerate(seg):
            if not math.isfinite(x) or x < 0:
                raise ValueError(f"StopContext.segment_ms[{k}]: expected a finite number >= 0, "
                                 f"got {x!r}")
        self.segment_ms = seg

    @property
    def num_exits(self) -> int:
        return len(self.segment_ms)

    @property
    def cumulative_ms(self) -> tuple[float, ...]:
        """``C_k``: latency to reach and evaluate exit k."""
        out, acc = [], 0.0
        for x in self.segment_ms:
            acc += x
            out.append(acc)
        return tuple(out)

    @classmethod
    def from_manifest(cls, manifest: Any, skip_config: str, *, device: Optional[str] = None,
                      backend: Optional[str] = None, target: Optional[str] = None,
                      batch: int = 1, stat: str = "p50_ms") -> "StopContext":
        """Segment costs from a bundle manifest's latency table.

        Uses the cumulative per-exit entries of ``skip_config`` when all S are present
        (``segment_ms[k] = C_k - C_{k-1}``, clipped at 0), else the per-piece entries summed over
        each segment's pieces. ``device``/``backend``/``target`` select the latency group and may
        be omitted when only one matches. ``stat`` is which column to use (default p50).
        Lookups and sums come from :mod:`runtime.latency` (the one reader of the table).
        """
        if stat not in LATENCY_STATS:
            raise UsageError(f"stat: expected one of {', '.join(LATENCY_STATS)}, got {stat!r}")
        if skip_config not in manifest.execution:
            raise UsageError(f"skip_config {skip_config!r} is not in the manifest "
                             f"(known: {', '.join(manifest.execution)})")
        found = find_groups(manifest, device=device, backend=backend, target=target, batch=batch)
        groups = sorted((d, b, t) for d, b, t, _ in found)
        if not groups:
            raise UsageError(f"no latency entries for device={device!r} backend={backend!r} "
                             f"target={target!r} batch={batch} in the manifest")
        if len(groups) > 1:
            raise UsageError("several latency groups match; pass device/backend/target to pick "
                             "one of: " + ", ".join("/".join(g) for g in groups))
        group = next(iter(found.values()))
        stat = stat[:-len("_ms")]
        S = manifest.stages
        seg = [group.exit_increment(skip_config, k, stat) for k in range(S)]
        if None in seg:
            plan = manifest.execution[skip_config]
            seg = piece_sums(group, plan, stat)
            if None in seg:
                missing = [pid for segment in plan for pid in group.missing(segment)]
                raise UsageError(f"latency table of {'/'.join(groups[0])} has neither all {S} "
                                 f"exits of {skip_config!r} nor every piece (missing pieces: "
                                 f"{', '.join(missing)})")
        return cls(segment_ms=seg, skip_config=skip_config)


# ------------------------------------------------------------------------------------------------
# base class and validation helpers
# ------------------------------------------------------------------------------------------------

# Parameter errors are ConfigError (a ValueError) from the shared Validator:
# "stopping rule 'max_prob': params['thresholds']: expected a number <= 1, got 1.5".

def _v(rule: str) -> Validator:
    return Validator(f"stopping rule {rule!r}")


def _at(key: str) -> str:
    return f"params[{key!r}]"


def _fail(rule: str, key: str, msg: str) -> None:
    _v(rule).fail(_at(key), msg)


def _check_keys(rule: str, params: object, required: Sequence[str],
                optional: Sequence[str] = ()) -> dict:
    v = _v(rule)
    if not isinstance(params, Mapping):
        v.fail("params", f"expected a JSON object, got {type_name(params)}")
    allowed = set(required) | set(optional)
    for k in params:
        if k not in allowed:
            v.fail("params", f"unknown parameter {k!r} (allowed: "
                             f"{', '.join(sorted(allowed)) or 'none'})")
    for k in required:
        if k not in params:
            v.fail("params", f"missing parameter {k!r}")
    return dict(params)


def _py(x: object) -> object:
    """numpy scalars as Python numbers (calibration hands them over), anything else as is."""
    return x.item() if isinstance(x, (np.integer, np.floating, np.bool_)) else x


def _is_num(x: object) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float, np.integer, np.floating))


def _num(rule: str, key: str, x: object, lo: Optional[float] = None,
         hi: Optional[float] = None) -> float:
    return _v(rule).num(_py(x), _at(key), lo=lo, hi=hi)


def _thresholds(rule: str, x: object) -> tuple[bool, np.ndarray]:
    """(scalar?, values) — a number in [0, 1], or a list of numbers in [0, 1] / null (never)."""
    if isinstance(x, np.ndarray) and x.ndim == 0:
        x = x.item()
    if _is_num(x):
        return True, np.array([_num(rule, "thresholds", x, 0, 1)])
    if isinstance(x, (list, tuple, np.ndarray)) and len(x) > 0:
        vals = []
        for i, v in enumerate(x):
            if v is None:
                vals.append(math.nan)
            elif _is_num(v) and math.isfinite(float(v)) and 0.0 <= float(v) <= 1.0:
                vals.append(float(v))
            else:
                _fail(rule, "thresholds", f"item {i}: expected a number in [0, 1] or null "
                                          f"(never stop there), got {v!r}")
        return False, np.array(vals)
    _fail(rule, "thresholds", f"expected a number in [0, 1] or a non-empty list of them "
                              f"(one per exit), got {x!r}")
    raise AssertionError  # unreachable


def _thresholds_json(scalar: bool, t: np.ndarray) -> float | list:
    if scalar:
        return float(t[0])
    return [None if math.isnan(v) else float(v) for v in t]


class StoppingRule(ABC):
    """Decides after each exit which samples stop. Subclasses set ``name`` and implement
    ``stop``, ``params`` and ``from_params``."""

    name: ClassVar[str] = ""

    @abstractmethod
    def stop(self, k: int, probs: list[np.ndarray], ctx: Optional[StopContext]) -> np.ndarray:
        """Bool (n,): stop now after exit k. ``probs[j]`` is the (n, C) softmax of exit j for
        the current samples, j = 0..k (later entries, if any, are ignored)."""

    @abstractmethod
    def params(self) -> dict:
        """JSON-able parameters; ``make_rule(self.name, self.params())`` reproduces the rule."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: Mapping[str, Any]) -> "StoppingRule":
        """Validated construction from JSON parameters (ConfigError naming the bad parameter)."""

    # -- shared helpers -------------------------------------------------------------------------

    def _current(self, k: int, probs: Sequence[np.ndarray],
                 ctx: Optional[StopContext]) -> tuple[np.ndarray, bool]:
        """Validate a call; return (probs[k] as a 2-D array, is k the last exit?)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"{self.name}: exit index k must be an int >= 0, got {k!r}")
        k = int(k)
        if len(probs) <= k:
            raise ValueError(f"{self.name}: need the probabilities of exits 0..{k}, got "
                             f"{len(probs)} exit(s)")
        p = np.asarray(probs[k])
        if p.ndim != 2:
            raise ValueError(f"{self.name}: probs[{k}] must be (n, C), got shape {p.shape}")
        last = False
        if ctx is not None:
            if k >= ctx.num_exits:
                raise ValueError(f"{self.name}: exit {k} out of range: ctx.segment_ms has "
                                 f"{ctx.num_exits} exits")
            last = k == ctx.num_exits - 1
        return p, last

    def stop_matrix(self, probs: np.ndarray, ctx: Optional[StopContext]) -> np.ndarray:
        """(S, N) bool: the rule's decision after every exit for every sample, as if every
        sample reached every exit (valid because rules are row-wise). Last row is all True."""
        probs = np.asarray(probs)
        S, N = probs.shape[:2]
        out = np.ones((S, N), dtype=bool)
        views = [probs[j] for j in range(S)]
        for k in range(S - 1):
            out[k] = np.asarray(self.stop(k, views[:k + 1], ctx), dtype=bool).reshape(N)
        return out

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.params() == self.params()

    def __hash__(self) -> int:
        return hash((self.name, repr(self.params())))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()!r})"


# ------------------------------------------------------------------------------------------------
# rules
# ------------------------------------------------------------------------------------------------

class _ThresholdRule(StoppingRule):
    _key: ClassVar[str] = "thresholds"

    def __init__(self, thresholds: float | Sequence[Optional[float]]):
        self._scalar, self._t = _thresholds(self.name, thresholds)

    @property
    def thresholds(self) -> float | list:
        return _thresholds_json(self._scalar, self._t)

    def _threshold(self, k: int) -> float:
        if self._scalar:
            return float(self._t[0])
        if k >= len(self._t):
            raise ValueError(f"{self.name}: no threshold for exit {k} (thresholds has "
                             f"{len(self._t)} entries)")
        return float(self._t[k])

    def params(self) -> dict:
        return {"thresholds": self.thresholds}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "StoppingRule":
        d = _check_keys(cls.name, params, ("thresholds",))
        return cls(d["thresholds"])


class MaxProbRule(_ThresholdRule):
    """Stop after exit k when the top class probability reaches ``thresholds[k]``.

    ``thresholds``: one number in [0, 1] for every exit, or a list (entry k for exit k; ``None``
    = never stop at that exit; entries for the last exit are not needed).
    """
    name = "max_prob"

    def stop(self, k, probs, ctx=None):
        p, last = self._current(k, probs, ctx)
        if last:
            return np.ones(p.shape[0], dtype=bool)
        t = self._threshold(int(k))
        return top_prob(p) >= t  # NaN (never) compares False


class EntropyRule(_ThresholdRule):
    """Stop after exit k when the normalised entropy ``H(p_k) / log C`` is <= ``thresholds[k]``
    (0 = one-hot, 1 = uniform). Same threshold format as ``max_prob``."""
    name = "entropy"

    def stop(self, k, probs, ctx=None):
        p, last = self._current(k, probs, ctx)
        if last:
            return np.ones(p.shape[0], dtype=bool)
        t = self._threshold(int(k))
        return normalised_entropy(p) <= t


class PatienceRule(StoppingRule):
    """Stop after exit k when the argmax is the same at the ``patience`` consecutive exits
    k-patience+1..k (so never before exit patience-1), and, if ``min_confidence`` is set, the top
    probability of exit k is >= it. ``patience = 1`` with a ``min_confidence`` is a shared
    max-prob threshold; ``patience >= S`` never stops early. Parameter-free use
    (``make_rule("patience", {})``) means patience 2 and no min_confidence."""
    name = "patience"

    def __init__(self, patience: int = 2, min_confidence: Optional[float] = None):
        self.patience = _v(self.name).int_(_py(patience), _at("patience"), lo=1)
        self.min_confidence = None if min_confidence is None else \
            _num(self.name, "min_confidence", min_confidence, 0, 1)

    def stop(self, k, probs, ctx=None):
        p, last = self._current(k, probs, ctx)
        n = p.shape[0]
        if last:
            return np.ones(n, dtype=bool)
        k = int(k)
        if k + 1 < self.patience:
            return np.zeros(n, dtype=bool)
        pred = p.argmax(axis=1)
        out = np.ones(n, dtype=bool)
        for j in range(k - self.patience + 1, k):
            out &= np.asarray(probs[j]).argmax(axis=1) == pred
        if self.min_confidence is not None:
            out &= top_prob(p) >= self.min_confidence
        return out

    def params(self) -> dict:
        return {"patience": self.patience, "min_confidence": self.min_confidence}

    @classmethod
    def from_params(cls, params):
        d = _check_keys(cls.name, params, (), ("patience", "min_confidence"))
        return cls(d.get("patience", 2), d.get("min_confidence"))


class FullDepthRule(StoppingRule):
    """Never stops early: every sample runs to the last exit."""
    name = "full"

    def stop(self, k, probs, ctx=None):
        p, last = self._current(k, probs, ctx)
        return np.full(p.shape[0], last, dtype=bool)

    def params(self) -> dict:
        return {}

    @classmethod
    def from_params(cls, params):
        _check_keys(cls.name, params, ())
        return cls()


class LookAheadRule(StoppingRule):
    """Optimal-stopping look-ahead rule with the device's own segment costs.

    At exit k < S-1 with statistic ``s_k`` (default: top probability) in bin ``b`` of
    ``edges[k]``, stop iff for every horizon h = 1..H_k

        gain[k][h-1][b]  <=  lam * (segment_ms[k+1] + ... + segment_ms[k+h])

    where ``gain[k][h-1][b]`` is the calibrated ``E[correct_{k+h} - correct_k | s_k in bin b]``
    and ``segment_ms`` comes from ``ctx`` (the device's latency table). With one horizon (H = 1)
    this is the one-step look-ahead rule ``E[G_{k+1} - G_k | s_k] <= lam * dt_{k+1}``.

    Parameters (JSON):

    * ``lam`` — price of latency, in accuracy (fraction, not points) per millisecond, >= 0;
    * ``edges`` — bin edges, strictly increasing: one list shared by all exits, or one list per
      exit 0..S-2; ``B = len(edges) - 1`` bins ``[e_b, e_{b+1})`` (values below ``e_0`` go to the
      first bin, values >= ``e_B`` to the last);
    * ``gain`` — per exit k = 0..S-2: a list of B gains (one-step), or a list over horizons
      h = 1..H of lists of B gains (``null`` where k + h > S - 1, i.e. not reachable);
    * ``statistic`` — ``"max_prob"`` (default), ``"margin"`` or ``"confidence"``;
    * ``interpolation`` — ``"step"`` (default: the gain of the statistic's bin) or ``"linear"``
      (piecewise linear between the bin midpoints, constant beyond the outer midpoints, so the
      decision threshold on the statistic moves continuously with ``lam`` and the costs).
    """
    name = "lookahead"
    INTERPOLATIONS: ClassVar[tuple[str, ...]] = ("step", "linear")

    def __init__(self, edges: Sequence, gain: Sequence, lam: float,
                 statistic: str = "max_prob", interpolation: str = "step"):
        name = self.name
        self.lam = _num(name, "lam", lam, 0)
        if interpolation not in self.INTERPOLATIONS:
            _fail(name, "interpolation", f"expected one of {', '.join(self.INTERPOLATIONS)}, "
                                         f"got {interpolation!r}")
        self.interpolation = interpolation
        if statistic not in STATISTICS:
            _fail(name, "statistic", f"expected one of {', '.join(STATISTICS)}, got "
                                     f"{statistic!r}")
        self.statistic = statistic
        if not isinstance(gain, (list, tuple)) or not gain:
            _fail(name, "gain", "expected a non-empty list (one entry per exit 0..S-2)")
        nk = len(gain)
        if not isinstance(edges, (list, tuple)) or not edges:
            _fail(name, "edges", "expected a list of bin edges (or one list per exit)")
        self._shared_edges = not isinstance(edges[0], (list, tuple))
        edge_lists = [edges] * nk if self._shared_edges else list(edges)
        if len(edge_lists) != nk:
            _fail(name, "edges", f"expected {nk} lists of edges (one per exit of 'gain'), got "
                                 f"{len(edge_lists)}")
        self._edges: list[np.ndarray] = []
        for k, e in enumerate(edge_lists):
            where = "" if self._shared_edges else f"[{k}]"
            if not isinstance(e, (list, tuple)) or len(e) < 2 \
                    or not all(_is_num(x) and math.isfinite(float(x)) for x in e):
                _fail(name, "edges", f"{where} expected a list of >= 2 finite numbers, got {e!r}")
            arr = np.array([float(x) for x in e])
            if np.any(np.diff(arr) <= 0):
                _fail(name, "edges", f"{where} must be strictly increasing, got {list(e)!r}")
            self._edges.append(arr)
        # gain: per exit, (H, B) array with NaN for unreachable horizons
        depth = None
        self._gain: list[np.ndarray] = []
        for k, g in enumerate(gain):
            B = len(self._edges[k]) - 1
            if not isinstance(g, (list, tuple)) or not g:
                _fail(name, "gain", f"[{k}] expected a list of {B} gains or a list of such lists")
            d = 3 if any(isinstance(x, (list, tuple)) for x in g) else 2
            if depth is None:
                depth = d
            elif d != depth:
                _fail(name, "gain", f"[{k}] mixes the one-step (list of gains) and multi-step "
                                    "(list over horizons) layouts")
            rows = [g] if d == 2 else list(g)
            mat = np.full((len(rows), B), np.nan)
            for h, row in enumerate(rows):
                at = f"[{k}]" + ("" if d == 2 else f"[{h}]")
                if row is None and d == 3:
                    continue  # horizon not reachable from this exit
                if not isinstance(row, (list, tuple)) or len(row) != B:
                    _fail(name, "gain", f"{at} expected {B} gains (one per bin of edges"
                                        f"{'' if self._shared_edges else f'[{k}]'}), got {row!r}")
                for b, x in enumerate(row):
                    if x is None and d == 3:
                        continue
                    if not _is_num(x) or not math.isfinite(float(x)) or abs(float(x)) > 1.0:
                        _fail(name, "gain", f"{at}[{b}] expected a number in [-1, 1] (a "
                                            f"difference of accuracies), got {x!r}")
                    mat[h, b] = float(x)
            self._gain.append(mat)
        self._multi = depth == 3

    @property
    def num_decision_exits(self) -> int:
        """Number of exits with a decision (S - 1)."""
        return len(self._gain)

    @property
    def horizon(self) -> int:
        return max(g.shape[0] for g in self._gain)

    def bins(self, k: int, stat: np.ndarray) -> np.ndarray:
        """Bin index of statistic values at exit k."""
        e = self._edges[k]
        return np.clip(np.searchsorted(e, stat, side="right") - 1, 0, len(e) - 2)

    def expected_gain(self, k: int, h: int, stat: np.ndarray) -> np.ndarray:
        """Calibrated ``E[correct_{k+h} - correct_k | s_k = stat]`` (h >= 1); NaN if unknown."""
        row = self._gain[k][h - 1] if h - 1 < self._gain[k].shape[0] else None
        stat = np.asarray(stat, dtype=np.float64)
        if row is None or np.all(np.isnan(row)):
            return np.full(stat.shape, np.nan)
        if self.interpolation == "linear":
            e = self._edges[k]
            return np.interp(stat, 0.5 * (e[:-1] + e[1:]), row)
        return row[self.bins(k, stat)]

    def continuation_value(self, k: int, stat: np.ndarray,
                           segment_ms: Sequence[float]) -> np.ndarray:
        """``max_h (gain_k,h(s_k) - lam * cost(k, h))`` per sample: > 0 means continue."""
        stat = np.asarray(stat)
        best = np.full(stat.shape, -np.inf)
        cost = 0.0
        for h in range(1, self._gain[k].shape[0] + 1):
            if k + h >= len(segment_ms):
                break
            cost += float(segment_ms[k + h])
            v = self.expected_gain(k, h, stat) - self.lam * cost
            best = np.where(np.isnan(v), best, np.maximum(best, v))
        return best

    def stop_from_stat(self, k: int, stat: np.ndarray, segment_ms: Sequence[float]) -> np.ndarray:
        """The decision at exit k < S-1 from the statistic values of exit k."""
        return self.continuation_value(k, stat, segment_ms) <= 0.0

    def stop(self, k, probs, ctx=None):
        if ctx is None:
            raise ValueError("lookahead: needs a StopContext with the device's segment_ms")
        p, last = self._current(k, probs, ctx)
        if last:
            return np.ones(p.shape[0], dtype=bool)
        k = int(k)
        if self.num_decision_exits != ctx.num_exits - 1:
            raise ValueError(f"lookahead: gain table covers {self.num_decision_exits} exit(s) but "
                             f"ctx.segment_ms has {ctx.num_exits} exits (expected "
                             f"{ctx.num_exits - 1} rows, one per exit 0..S-2)")
        return self.stop_from_stat(k, STATISTICS[self.statistic](p), ctx.segment_ms)

    def params(self) -> dict:
        edges = [float(x) for x in self._edges[0]] if self._shared_edges else \
            [[float(x) for x in e] for e in self._edges]

        def row(r):
            return [None if math.isnan(x) else float(x) for x in r]

        if self._multi:
            gain = [[None if np.all(np.isnan(r)) else row(r) for r in g] for g in self._gain]
        else:
            gain = [row(g[0]) for g in self._gain]
        return {"statistic": self.statistic, "interpolation": self.interpolation,
                "lam": self.lam, "edges": edges, "gain": gain}

    @classmethod
    def from_params(cls, params):
        d = _check_keys(cls.name, params, ("edges", "gain", "lam"),
                        ("statistic", "interpolation"))
        return cls(d["edges"], d["gain"], d["lam"], d.get("statistic", "max_prob"),
                   d.get("interpolation", "step"))


RULES: dict[str, type[StoppingRule]] = {
    "max_prob": MaxProbRule,
    "entropy": EntropyRule,
    "patience": PatienceRule,
    "lookahead": LookAheadRule,
    "full": FullDepthRule,
}

from . import routing  # noqa: E402,F401  (the router is a rule of its own module; it registers itself)


def make_rule(name: str, params: Optional[Mapping[str, Any]] = None) -> StoppingRule:
    """The rule called ``name`` with JSON ``params``; :class:`runtime.errors.ConfigError` (a
    ValueError) for an unknown name or bad parameters (the message names the parameter)."""
    if not isinstance(name, str) or name not in RULES:
        raise ConfigError("stopping rule", "name",
                          f"unknown stopping rule {name!r} (known: {', '.join(RULES)})")
    return RULES[name].from_params({} if params is None else params)


def rule_from_stopping(stopping: Any) -> Optional[StoppingRule]:
    """The rule of a ``runtime.manifest.Stopping`` record; None when not calibrated."""
    if stopping is None or getattr(stopping, "rule", None) is None:
        return None
    return make_rule(stopping.rule, stopping.params or {})
