"""Fit the joint router (runtime/routing.py) on validation data: backward induction with isotonic
value estimates, exits kept only where they pay, cross-fitted choice of the price of latency, and
one policy per budget (numpy only; docs/stopping.md, "The router").

Inputs are the per-exit probabilities of every skip configuration on the validation split
(``probs[cfg]``: (S, N, C)) and span costs from the device's latency table. Exit k of a sample
depends only on the variants of stages 0..k, so every path a router may take is read from these.

**Backward induction.** For a price of latency ``lam`` (accuracy per ms) and kept exits
``e_0 < ... < e_m = S-1``: at the last exit a sample's value is 1 if it is right. At kept exit
``e_i`` of path ``p``, the gain of continuing with variant ``v`` of the next span over stopping
is, per sample, the value reached at ``e_{i+1}`` along ``p+v`` minus being right now, minus
``lam`` x (the span's cost + the per-exit decision cost). Its expectation given the exit's
confidence (top probability) is fitted non-increasing (isotonic, over quantile bins: the more
confident a sample is, the less the next span can add), on the samples that reach that exit
under the policy (a second pass re-weights by reach; paths reached by too few samples use all of
them). Fitting the paired gain, not the two values separately, keeps the noise of the two out
of the decision, and makes "stop" an upper interval of confidence. The policy ranks the actions
by fitted gain (stop: 0); a sample's realised value is that of the action ranked first.

**Choice.** The validation data is split in two folds. For every subset of exits (the last
always kept), every variant of the first span (no exit precedes it, so it is one choice for all
inputs: with only the last exit kept, the candidates are the static sub-networks) and every
``lam`` of a grid, the policy is cross-fitted: fitted on each fold and scored on the other, so
every validation sample is scored by a policy that did not see it. The deployed (exits, lam) is
the fastest one whose upper bound on the drop against full depth of FF..F (the paired drop plus
``z`` of its standard errors, ``z = 1.645``: 95% one-sided for one candidate) is within
``max_drop``, and its policy is refitted on all the data. ``refit=False`` instead fits on one
fold and certifies on the other (both orientations tried) and ships the policy scored: on seven
trainings (docs/stopping.md) it was slower at the same ``z`` and missed the test target as often or more. An exit that does not pay is dropped; when none pays, the policy
runs the whole network as one span.

**Budgets.** For each budget of a grid, every candidate policy (all exits kept, each ``lam``,
fitted on the first fold, plus every static sub-network and the default policy) is simulated on
the second fold with the runtime's deadline rule (a span runs when the elapsed time plus its
``1 - epsilon`` quantile fits the budget) and the most accurate one within the miss target is
stored for that budget.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from export.calibration import _pava_decreasing
from runtime.routing import DEFAULT_EPSILON, STOP, RouterPolicy, RouterRule, spans_of

__all__ = ["RoutingData", "fit_policy", "simulate", "simulate_deadline", "fit_router",
           "RouterFit", "static_policy", "DEFAULT_LAMS", "DEFAULT_Z"]

#: Standard errors added to the held-out drop before it is compared with ``max_drop``.
DEFAULT_Z = 1.645

#: The price-of-latency grid (accuracy per ms): 0 (never trade accuracy) and a geometric range.
DEFAULT_LAMS = tuple([0.0] + list(np.geomspace(1e-3, 3.0, 47)))
SpanCost = Callable[[int, int, str], float]


def variants(n: int) -> list[str]:
    return ["".join(t) for t in itertools.product("FT", repeat=n)]


class RoutingData:
    """Confidence and correctness at every exit of every path, for N validation samples."""

    def __init__(self, probs: dict[str, np.ndarray], labels: np.ndarray) -> None:
        cfgs = sorted(probs)
        self.S = len(cfgs[0])
        self.labels = np.asarray(labels)
        self.N = len(self.labels)
        self.conf: dict[str, np.ndarray] = {}
        self.correct: dict[str, np.ndarray] = {}
        for cfg in cfgs:
            p = np.asarray(probs[cfg])
            for k in range(self.S):
                path = cfg[:k + 1]
                if path not in self.conf:
                    self.conf[path] = p[k].max(axis=-1).astype(np.float64)
                    self.correct[path] = (p[k].argmax(axis=-1) == self.labels).astype(np.float64)
        self.full = "F" * self.S


# ---------------------------------------------------------------------------------------------
# isotonic step functions
# ---------------------------------------------------------------------------------------------

@dataclass
class _Step:
    edges: np.ndarray   # ascending; value index = searchsorted(edges, s, 'right')
    values: np.ndarray  # len(edges) + 1

    def __call__(self, s: np.ndarray) -> np.ndarray:
        return self.values[np.searchsorted(self.edges, s, side="right")]


def _isotonic(s: np.ndarray, y: np.ndarray, *, max_bins: int, min_bin: int,
              decreasing: bool = False) -> _Step:
    """Non-decreasing (or non-increasing) step function of ``s`` fitted to ``y`` over
    quantile bins."""
    n = len(s)
    if n == 0:
        return _Step(np.zeros(0), np.zeros(1))
    nb = int(max(1, min(max_bins, n // max(1, min_bin))))
    if nb > 1:
        edges = np.unique(np.quantile(s, np.linspace(0, 1, nb + 1)[1:-1]))
    else:
        edges = np.zeros(0)
    idx = np.searchsorted(edges, s, side="right")
    cnt = np.bincount(idx, minlength=len(edges) + 1).astype(np.float64)
    tot = np.bincount(idx, weights=y, minlength=len(edges) + 1)
    keep = cnt > 0
    if not keep.all():  # drop empty bins: an empty bin's left edge goes with it
        kept_bins = np.flatnonzero(keep)
        edges = edges[kept_bins[1:] - 1]
        cnt, tot = cnt[keep], tot[keep]
    mean = tot / cnt
    fitted = _pava_decreasing(mean, cnt) if decreasing else -_pava_decreasing(-mean, cnt)
    return _Step(np.asarray(edges, dtype=np.float64), np.asarray(fitted, dtype=np.float64))


# ---------------------------------------------------------------------------------------------
# fitting one policy
# ---------------------------------------------------------------------------------------------

def _rank(values: dict[str, float], costs: dict[str, float]) -> tuple[str, ...]:
    """Actions by value (ties: stop, then the cheaper variant), cut after stop."""
    order = sorted(values, key=lambda a: (-values[a], a != STOP, costs.get(a, 0.0), a))
    out = []
    for a in order:
        out.append(a)
        if a == STOP:
            break
    return tuple(out)


def _policy_intervals(fits: dict[str, _Step], costs: dict[str, float]):
    """Break points and ranked actions of the argmax of several step functions."""
    edges = np.unique(np.concatenate([f.edges for f in fits.values()])) if fits else np.zeros(0)
    reps = np.concatenate([[-np.inf], edges])  # each interval's left end ('right' semantics)
    vals = {a: f.values[np.searchsorted(f.edges, reps, side="right")] for a, f in fits.items()}
    breaks: list[float] = []
    ranked: list[tuple[str, ...]] = []
    for j in range(len(reps)):
        r = _rank({a: float(v[j]) for a, v in vals.items()}, costs)
        if ranked and r == ranked[-1]:
            continue
        if ranked:
            breaks.append(float(reps[j]))
        ranked.append(r)
    return breaks, ranked


def fit_policy(data: RoutingData, span_cost: SpanCost, exits: Sequence[int], lam: float,
               idx: np.ndarray, *, exit_cost_ms: float = 0.0, max_bins: int = 24,
               min_bin: int = 40, min_reach: int = 60, passes: int = 2,
               start: Optional[str] = None) -> RouterPolicy:
    """The backward-induction policy for kept ``exits`` and price ``lam``, fitted on samples
    ``idx``. ``start``: the first span's variant (no exit precedes it, so it is one choice for
    every input); None: the one of highest fitted value."""
    S = data.S
    exits = [int(e) for e in exits]
    spans = spans_of(exits)
    reach: Optional[dict[str, np.ndarray]] = None
    policy = None
    for _ in range(passes):
        decisions: dict[str, dict] = {}
        value: dict[str, np.ndarray] = {p: data.correct[p] for p in data.conf if len(p) == S}
        for i in range(len(exits) - 2, -1, -1):
            e = exits[i]
            first, last = spans[i + 1]
            vs = variants(last - first + 1)
            costs = {v: span_cost(first, last, v) + exit_cost_ms for v in vs}
            new_value: dict[str, np.ndarray] = {}
            for p in variants(e + 1):
                s_all = data.conf[p]
                now = data.correct[p]
                # the gain of continuing with v over stopping, per sample (paired), minus its
                # price; the expected gain given the confidence is fitted non-increasing
                gains = {v: value[p + v] - now - lam * costs[v] for v in vs}
                targets = {STOP: now, **{v: now + g for v, g in gains.items()}}
                use = idx
                if reach is not None:
                    r = idx[reach.get(p, np.zeros(data.N, dtype=bool))[idx]]
                    if len(r) >= min_reach:
                        use = r
                fits = {v: _isotonic(s_all[use], g[use], max_bins=max_bins, min_bin=min_bin,
                                     decreasing=True) for v, g in gains.items()}
                fits[STOP] = _Step(np.zeros(0), np.zeros(1))  # stopping gains nothing
                breaks, ranked = _policy_intervals(fits, costs)
                decisions[p] = {"breaks": breaks, "ranked": [list(r) for r in ranked]}
                # realised value of every sample: the target of its first-ranked action
                j = np.searchsorted(np.asarray(breaks), s_all, side="right")
                first_action = np.array([r[0] for r in ranked], dtype=object)[j]
                val = np.array(targets[STOP], dtype=np.float64)
                for v in vs:
                    m = first_action == v
                    val[m] = targets[v][m]
                new_value[p] = val
            value = {**value, **new_value}
        f0, l0 = spans[0]
        starts = {v: float(value[v][idx].mean()) - lam * (span_cost(f0, l0, v) + exit_cost_ms)
                  for v in variants(l0 - f0 + 1)}
        begin = start if start is not None else \
            max(starts, key=lambda v: (starts[v], -span_cost(f0, l0, v)))
        if begin not in starts:
            raise ValueError(f"start {begin!r} is not a variant of stages {f0}..{l0}")
        policy = RouterPolicy(exits, begin, _only_reachable(exits, begin, decisions), lam=lam,
                              stages=S)
        reach = _reach(policy, data, idx)
    assert policy is not None
    return policy


def _only_reachable(exits: Sequence[int], start: str, decisions: dict[str, dict]) -> dict:
    """The decisions of paths the policy can reach from ``start``."""
    out: dict[str, dict] = {}
    frontier = [start]
    while frontier:
        p = frontier.pop()
        d = decisions.get(p)
        if d is None:
            continue
        out[p] = d
        for r in d["ranked"]:
            for a in r:
                if a != STOP:
                    frontier.append(p + a)
    return out


def _reach(policy: RouterPolicy, data: RoutingData, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Which samples reach each path (no deadline)."""
    res = simulate(policy, data, lambda f, l, v: 0.0, idx)
    out: dict[str, np.ndarray] = {}
    for p, rows in res.visited.items():
        m = np.zeros(data.N, dtype=bool)
        m[rows] = True
        out[p] = m
    return out


# ---------------------------------------------------------------------------------------------
# simulation (the runtime's decisions on precomputed probabilities)
# ---------------------------------------------------------------------------------------------

@dataclass
class SimOutcome:
    exit: np.ndarray        # exit index per sample (of idx)
    path: np.ndarray        # path string per sample (object)
    correct: np.ndarray     # 0/1 per sample
    latency_ms: np.ndarray  # simulated latency per sample
    missed: np.ndarray      # simulated deadline miss (bool) per sample
    visited: dict[str, np.ndarray] = field(default_factory=dict)  # path -> sample ids there

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else 0.0

    @property
    def mean_latency_ms(self) -> float:
        return float(self.latency_ms.mean()) if len(self.latency_ms) else 0.0


def simulate(policy: RouterPolicy, data: RoutingData, span_cost: SpanCost, idx: np.ndarray, *,
             exit_cost_ms: float = 0.0, budget_ms: Optional[float] = None,
             span_quantile: Optional[SpanCost] = None, pre_ms: float = 0.0) -> SimOutcome:
    """Route samples ``idx`` with ``policy`` as the runtime does. With ``budget_ms``, a span
    runs only when the elapsed time (``pre_ms`` + the ``span_cost`` of the spans run, each plus
    ``exit_cost_ms``) plus its ``span_quantile`` fits the budget (the first span always runs);
    else the next ranked action is tried, stop always fitting. ``missed``: the simulated
    latency exceeds the budget."""
    idx = np.asarray(idx)
    n = len(idx)
    exit_ = np.zeros(n, dtype=np.int64)
    path_out = np.empty(n, dtype=object)
    corr = np.zeros(n)
    lat = np.zeros(n)
    visited: dict[str, np.ndarray] = {}
    f0, l0 = policy.spans[0]
    start_cost = span_cost(f0, l0, policy.start) + exit_cost_ms
    groups = [(policy.start, np.arange(n), pre_ms + start_cost)]
    while groups:
        path, rows, elapsed = groups.pop()
        ids = idx[rows]
        visited[path] = ids
        e = len(path) - 1
        nxt = policy.next_span(e)
        if nxt is None:
            _finish(rows, path, e, data, ids, exit_, path_out, corr, lat, elapsed)
            continue
        j = policy.interval(path, data.conf[path][ids])
        lists = policy.ranked_lists(path)
        for jj in np.unique(j):
            sub = rows[j == jj]
            action = STOP
            for a in lists[jj]:
                if a == STOP:
                    break
                if budget_ms is None or span_quantile is None or \
                        elapsed + span_quantile(nxt[0], nxt[1], a) <= budget_ms:
                    action = a
                    break
            if action == STOP:
                _finish(sub, path, e, data, idx[sub], exit_, path_out, corr, lat, elapsed)
            else:
                groups.append((path + action, sub,
                               elapsed + span_cost(nxt[0], nxt[1], action) + exit_cost_ms))
    missed = np.zeros(n, dtype=bool) if budget_ms is None else lat > budget_ms + 1e-9
    return SimOutcome(exit_, path_out, corr, lat, missed, visited)


def _finish(rows, path, e, data, ids, exit_, path_out, corr, lat, elapsed) -> None:
    exit_[rows] = e
    path_out[rows] = path
    corr[rows] = data.correct[path][ids]
    lat[rows] = elapsed


def simulate_deadline(policy: RouterPolicy, data: RoutingData, span_cost: SpanCost,
                      span_quantile: SpanCost, budget_ms: float, idx: np.ndarray, *,
                      exit_cost_ms: float = 0.0, pre_ms: float = 0.0) -> SimOutcome:
    return simulate(policy, data, span_cost, idx, exit_cost_ms=exit_cost_ms, budget_ms=budget_ms,
                    span_quantile=span_quantile, pre_ms=pre_ms)


def static_policy(cfg: str, exit_index: int) -> RouterPolicy:
    """The static sub-network (config ``cfg`` run to ``exit_index``) as a router policy."""
    S = len(cfg)
    decisions = {cfg[:k + 1]: {"breaks": [], "ranked": [[cfg[k + 1], STOP] if k < exit_index
                                                       else [STOP]]}
                 for k in range(S - 1)}
    decisions = _only_reachable(list(range(S)), cfg[0], decisions)
    return RouterPolicy(list(range(S)), cfg[0], decisions, stages=S)


# ---------------------------------------------------------------------------------------------
# the whole fit
# ---------------------------------------------------------------------------------------------

@dataclass
class RouterFit:
    rule: RouterRule
    exits: list[int]
    lam: float
    val_accuracy: float          # refitted policy on all the data
    mean_latency_ms: float
    heldout_accuracy: float      # cross-fitted
    heldout_latency_ms: float
    heldout_drop_points: float
    drop_bound_points: float
    full_accuracy: float
    exit_histogram: list[int]
    subsets: list[dict]          # per exit subset: the chosen lam and its held-out numbers
    budgets: list[dict]          # per budget: the chosen policy and its simulated numbers
    reference_accuracy: Optional[float] = None  # what the drop is measured against, if not
    #                                             full depth of these probabilities

    def summary(self) -> dict:
        return {k: getattr(self, k) for k in (
            "exits", "lam", "val_accuracy", "mean_latency_ms", "heldout_accuracy",
            "heldout_latency_ms", "heldout_drop_points", "drop_bound_points", "full_accuracy",
            "exit_histogram", "subsets", "budgets", "reference_accuracy")}


def _crossfit(data, span_cost, exits, lam, folds, exit_cost_ms, opts, both: bool = True):
    """Held-out correctness and latency: fitted on one fold, scored on the other (both ways,
    or, with ``both=False``, fitted on the first fold and scored on the second only: then the
    arrays hold the second fold's samples)."""
    corr = np.zeros(data.N)
    lat = np.zeros(data.N)
    pairs = (folds, folds[::-1]) if both else (folds,)
    for a, b in pairs:
        pol = fit_policy(data, span_cost, exits, lam, a, exit_cost_ms=exit_cost_ms, **opts)
        out = simulate(pol, data, span_cost, b, exit_cost_ms=exit_cost_ms)
        corr[b] = out.correct
        lat[b] = out.latency_ms
    if not both:
        return corr[folds[1]], lat[folds[1]]
    return corr, lat


def paired_drop_bound(worse: int, better: int, n: int, z: float) -> float:
    """One-sided upper bound on the accuracy drop from paired outcomes (normal approximation):
    ``(worse - better) / n + z * sqrt(worse + better) / n`` (``worse``: right at full depth,
    wrong here; ``better``: the reverse)."""
    return (worse - better) / n + z * math.sqrt(worse + better) / n


def fit_router(probs: dict[str, np.ndarray], labels: np.ndarray, span_cost: SpanCost, *,
               max_drop: float = 0.5, z: float = DEFAULT_Z, lams: Sequence[float] = DEFAULT_LAMS,
               exit_cost_ms: float = 0.01, exit_subsets: Optional[Sequence[Sequence[int]]] = None,
               budgets_ms: Sequence[float] = (), span_quantile: Optional[SpanCost] = None,
               span_elapsed: Optional[SpanCost] = None, pre_ms: float = 0.0,
               epsilon: float = DEFAULT_EPSILON, seed: int = 0, refit: bool = True,
               reference_correct: Optional[np.ndarray] = None, progress=None,
               **opts: Any) -> RouterFit:
    """Fit the router for an accuracy target (``max_drop`` points below full depth of FF..F:
    the cross-fitted drop plus ``z`` standard errors of the paired difference; with
    ``reference_correct``, 0/1 per sample, below that reference instead, e.g. the fp32
    network when the pieces are quantized) and, given
    ``budgets_ms`` and ``span_quantile`` (the ``1 - epsilon`` quantile of a span's latency),
    one policy per budget: the most accurate candidate whose simulated miss rate is within
    ``epsilon``, the elapsed time taken pessimistically (``pre_ms`` for the call's own work
    plus ``span_elapsed``, e.g. the p90 of each span run, default ``span_cost``); when none
    is, the one that misses least."""
    data = RoutingData(probs, labels)
    S, N = data.S, data.N
    perm = np.random.default_rng(seed).permutation(N)
    folds = (np.sort(perm[: N // 2]), np.sort(perm[N // 2:]))
    full_correct = data.correct[data.full]
    full_acc = float(full_correct.mean())
    if reference_correct is None:
        reference = full_correct
    else:
        reference = np.asarray(reference_correct, dtype=np.float64).reshape(-1)
        if reference.shape != (N,):
            raise ValueError(f"reference_correct has {reference.size} entries for {N} samples")
    if exit_subsets is None:
        exit_subsets = [list(c) + [S - 1] for r in range(S) for c in
                        itertools.combinations(range(S - 1), r)]
    best = None
    subsets = []
    # without a refit, both orientations are tried (fit on one fold, certify on the other) and
    # the faster certified one ships: the policy fitted on its first fold
    orientations = [folds] if refit else [folds, folds[::-1]]
    # the first span's variant is one choice for every input (no exit before it to route
    # on): each is a candidate of its own, so a start that wins on value at a high price of
    # latency but misses the target does not hide the other start's cheaper policies
    candidates = [(list(exits), start, fo) for exits in exit_subsets
                  for start in variants(spans_of(list(exits))[0][1] + 1) for fo in orientations]
    for exits, start, fo in candidates:
        chosen = None
        # cheapest first: the first that passes wins (one exit: no decision, lam is moot)
        for lam in (sorted(lams, reverse=True) if len(exits) > 1 else [0.0]):
            corr, lat = _crossfit(data, span_cost, exits, lam, fo, exit_cost_ms,
                                  {**opts, "start": start}, both=refit)
            ref = reference if refit else reference[fo[1]]
            drop = float(ref.mean()) - float(corr.mean())
            if drop * 100.0 > max_drop:
                continue
            worse = int(np.sum((ref == 1) & (corr == 0)))
            better = int(np.sum((ref == 0) & (corr == 1)))
            bound = paired_drop_bound(worse, better, len(ref), z) * 100.0
            if bound <= max_drop:
                chosen = dict(exits=list(exits), start=start, lam=float(lam),
                              heldout_accuracy=float(corr.mean()),
                              heldout_latency_ms=float(lat.mean()), heldout_drop_points=100 * drop,
                              drop_bound_points=bound, fit_fold=0 if fo is folds else 1)
                break
        subsets.append(chosen or {"exits": list(exits), "start": start, "lam": None,
                                  "fit_fold": 0 if fo is folds else 1})
        if progress:
            progress(f"  router exits {list(exits)} from {start} (fitted on fold "
                     f"{0 if fo is folds else 1}): " + (
                f"lam {chosen['lam']:.4g}, held-out {100 * chosen['heldout_accuracy']:.2f}% "
                f"(drop {chosen['heldout_drop_points']:.2f}, bound "
                f"{chosen['drop_bound_points']:.2f} pt), {chosen['heldout_latency_ms']:.4f} ms"
                if chosen else "no lam meets the target"))
        if chosen and (best is None or chosen["heldout_latency_ms"] < best["heldout_latency_ms"]):
            best = chosen
    if best is None:  # not even lam = 0 with every exit: run full depth, no early exit
        best = dict(exits=[S - 1], start=data.full, lam=0.0, heldout_accuracy=full_acc,
                    heldout_latency_ms=float(span_cost(0, S - 1, data.full) + exit_cost_ms),
                    heldout_drop_points=0.0, drop_bound_points=0.0, fit_fold=0)
    everyone = np.arange(N)
    if not refit and best.get("fit_fold") == 1:
        folds = folds[::-1]  # the budget policies too: fitted and scored like the default one
    default = fit_policy(data, span_cost, best["exits"], best["lam"],
                         everyone if refit else folds[0], exit_cost_ms=exit_cost_ms,
                         start=best["start"], **opts)
    dsim = simulate(default, data, span_cost, everyone, exit_cost_ms=exit_cost_ms)
    policies = [default]
    budget_rows: list[list] = []
    budget_info: list[dict] = []
    if budgets_ms and span_quantile is not None:
        all_exits = list(range(S))
        fit_idx, score_idx = folds  # chosen on data the candidates were not fitted on
        cands = [fit_policy(data, span_cost, all_exits, lam, fit_idx, exit_cost_ms=exit_cost_ms,
                            start=start, **opts) for lam in lams for start in variants(1)]
        cands += [static_policy(cfg, e) for cfg in variants(S) for e in range(S)]
        cands.append(default)
        elapsed = span_elapsed or span_cost
        for b in sorted(set(float(x) for x in budgets_ms)):
            scored = []
            for ci, pol in enumerate(cands):
                out = simulate(pol, data, elapsed, score_idx, exit_cost_ms=exit_cost_ms,
                               budget_ms=b, span_quantile=span_quantile, pre_ms=pre_ms)
                miss = float(out.missed.mean())
                # within the miss target: the most accurate; beyond it: the fastest
                scored.append((max(miss, epsilon),
                               -out.accuracy if miss <= epsilon else out.mean_latency_ms,
                               out.mean_latency_ms, ci, out))
            scored.sort(key=lambda t: t[:4])
            ci, out = scored[0][3], scored[0][4]
            pol = cands[ci]
            if pol is default:
                pi = 0
            else:
                try:
                    pi = next(i for i, p in enumerate(policies) if p is pol)
                except StopIteration:
                    policies.append(pol)
                    pi = len(policies) - 1
            budget_rows.append([b, pi])
            budget_info.append({"budget_ms": b, "policy": pi, "lam": pol.lam,
                                "exits": list(pol.exits), "val_accuracy": out.accuracy,
                                "mean_latency_ms": out.mean_latency_ms,
                                "simulated_miss_rate": float(out.missed.mean())})
    rule = RouterRule(policies, 0, budget_rows, epsilon)
    hist = np.bincount(dsim.exit, minlength=S).tolist()
    return RouterFit(rule=rule, exits=list(best["exits"]), lam=float(best["lam"]),
                     val_accuracy=dsim.accuracy, mean_latency_ms=dsim.mean_latency_ms,
                     heldout_accuracy=best["heldout_accuracy"],
                     heldout_latency_ms=best["heldout_latency_ms"],
                     heldout_drop_points=best["heldout_drop_points"],
                     drop_bound_points=best["drop_bound_points"], full_accuracy=full_acc,
                     exit_histogram=hist, subsets=subsets, budgets=budget_info,
                     reference_accuracy=(None if reference_correct is None
                                         else float(reference.mean())))
