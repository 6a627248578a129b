"""Fit the joint router for one bundle and write it into the bundle: stopping record, merged
pieces for the spans of dropped exits (export/routing_fit.py, export/merge.py)."""
from __future__ import annotations

from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Optional

import numpy as np

from runtime.latency import segment_costs_ms

#: Per kept exit: softmax, decision and the extra backend call, in ms (measured on the build
#: host with bench/runtime_overhead.py: 10-20 us on x86; a smaller device is slower, which only
#: makes exits cost more than assumed here).
EXIT_COST_MS = 0.015
#: The call's own work before and after its spans (preprocessing, softmax, the answer), in ms,
#: for the simulated deadline of the budget policies (x86 build host: 20-30 us).
CALL_OVERHEAD_MS = 0.03
#: Budgets per fitted router: geometric from the cheapest first exit's p50 to 1.2 x the full
#: depth p99.
N_BUDGETS = 16


def span_costs(manifest, device: str, backend: str, stat: str, *,
               bound: bool = False) -> Callable[[int, int, str], float]:
    """``cost(first, last, variant)``: the span's segments at ``stat`` from the latency table
    (segment k of any configuration whose letter k is the variant's). ``bound``: each segment
    as the runtime's deadline check reads it (``runtime.deadline.LatencyTable.segment``: the
    larger of its pieces' figure and its cumulative increment), else the increments of the
    cumulative table (they sum to the cumulative figure)."""
    S = manifest.stages
    if bound:
        from runtime.deadline import LatencyTable

        lt = LatencyTable(manifest, device, backend)

        def seg(cfg: str, k: int) -> float:
            v = lt.segment(cfg, k, 1, stat)
            if v is None:
                raise LookupError(f"no {stat} latency of segment {k} of {cfg} on {device}")
            return float(v)
    else:
        table = {c: segment_costs_ms(manifest, device, backend, c, 1, stat)
                 for c in manifest.skip_configs}

        def seg(cfg: str, k: int) -> float:
            return float(table[cfg][k])

    def cost(first: int, last: int, variant: str) -> float:
        cfg = "F" * first + variant + "F" * (S - 1 - last)
        return float(sum(seg(cfg, k) for k in range(first, last + 1)))
    return cost


def budget_grid(manifest, device: str, backend: str, count: int = N_BUDGETS) -> list[float]:
    S = manifest.stages
    p50 = span_costs(manifest, device, backend, "p50")
    p99 = span_costs(manifest, device, backend, "p99")
    lo = min(p50(0, 0, v) for v in ("F", "T"))
    hi = 1.2 * p99(0, S - 1, "F" * S)
    return [float(b) for b in np.geomspace(lo, hi, count)]


def fit_bundle_router(manifest, probs: dict, labels, device: str, backend: str, *,
                      max_drop: float, delta: Optional[float], epsilon: float = 0.01,
                      reference_correct=None, progress=None):
    """The fitted router (``export.routing_fit.RouterFit``) for this bundle's latency table;
    ``reference_correct``: what the drop is certified against (default: full depth of
    ``probs``)."""
    from export.routing_fit import DEFAULT_Z, fit_router

    cost = span_costs(manifest, device, backend, "p50")
    q = 1.0 - epsilon
    stat = "p99" if q >= 0.99 else ("p95" if q >= 0.95 else "p90")
    quant = span_costs(manifest, device, backend, stat, bound=True)
    elapsed = span_costs(manifest, device, backend, "p90")
    z = DEFAULT_Z if delta is None else float(NormalDist().inv_cdf(1.0 - float(delta)))
    return fit_router(probs, labels, cost, max_drop=max_drop, z=z, exit_cost_ms=EXIT_COST_MS,
                      budgets_ms=budget_grid(manifest, device, backend), span_quantile=quant,
                      span_elapsed=elapsed, pre_ms=CALL_OVERHEAD_MS, epsilon=epsilon,
                      reference_correct=reference_correct, progress=progress)


def merged_spans(rule) -> list[tuple[int, int, str]]:
    """The spans of more than one stage the router may run (each needs a merged piece), and
    full depth of FF..F (``rule="full"`` and the no-budget full-depth path run it as one
    artifact: the monolithic network)."""
    S = rule.stages
    spans = {(f, l, v) for f, l, v in rule.used_spans() if l > f}
    if S > 1:
        spans.add((0, S - 1, "F" * S))
    return sorted(spans)


def add_router_pieces(bundle_dir: Path, rule, *, progress=None) -> list[str]:
    """Merged pieces for every multi-stage span of ``rule`` (export/merge.py)."""
    spans = merged_spans(rule)
    if not spans:
        return []
    from export.merge import add_merged_pieces

    return add_merged_pieces(Path(bundle_dir), spans, progress=progress)


def router_record(fit) -> dict[str, Any]:
    """The calibration annotation's router part."""
    return {"exits_kept": fit.exits, "lam": fit.lam, "heldout_accuracy": fit.heldout_accuracy,
            "heldout_latency_ms": fit.heldout_latency_ms,
            "heldout_drop_points": fit.heldout_drop_points,
            "drop_bound_points": fit.drop_bound_points, "exit_subsets": fit.subsets,
            "reference_accuracy": fit.reference_accuracy,
            "budgets": fit.budgets, "exit_cost_ms": EXIT_COST_MS,
            "why": _why_exits(fit)}


def _why_exits(fit) -> str:
    kept = fit.exits
    rows = [s for s in fit.subsets if s.get("lam") is not None]
    folds = " x fold" if any(s.get("fit_fold") == 1 for s in fit.subsets) else ", cross-fitted"
    txt = (f"kept exits {kept}: the fastest held-out policy among {len(fit.subsets)} candidates "
           f"(exit subset x first-span variant{folds}) within the accuracy target")
    best: dict[str, float] = {}
    for s in rows:
        key = f"{s['exits']} from {s.get('start')}"
        best[key] = min(best.get(key, float("inf")), float(s["heldout_latency_ms"]))
    if best:
        txt += "; " + ", ".join(f"{k}: {v:.4f} ms" for k, v in best.items())
    bad = sorted({f"{s['exits']} from {s.get('start')}" for s in fit.subsets
                  if s.get("lam") is None} - set(best))
    if bad:
        txt += f"; no price of latency met the target with {', '.join(bad)}"
    return txt


def router_annotation(fit, skip_accuracy: dict, full: str, *, data: str, n: int, backend: str,
                      target: Optional[str], device: str, table_backend: str, kind: Optional[str],
                      max_drop: float, risk_delta: Optional[float], epsilon: float = 0.01,
                      extra: Optional[dict] = None):
    """``(Stopping record, calibration annotation)`` of a fitted router."""
    from runtime.jsonsafe import json_safe
    from runtime.manifest import Stopping, utc_now_iso

    S = len(full)
    stopping = Stopping(rule="router", params=json_safe(fit.rule.params()),
                        val_accuracy=float(fit.val_accuracy),
                        mean_latency_ms=float(fit.mean_latency_ms), created=utc_now_iso(),
                        skip_config=full, skip_accuracy=dict(skip_accuracy))
    hist = fit.exit_histogram
    ann = json_safe({
        "rule": "router", "skip_config": full, "data": data, "split": "val", "n": int(n),
        "backend": backend, "target": target,
        "segment_ms_source": f"latency table ({kind}, device {device}, {table_backend})",
        "max_drop": float(max_drop), "mean_budget_ms": None, "risk_delta": risk_delta,
        "epsilon": float(epsilon), "full_depth_accuracy": skip_accuracy[full],
        "mean_exit": float(np.dot(np.arange(1, S + 1), hist) / max(1, sum(hist))),
        "exit_histogram": hist, "requested_rule": "router", "created": stopping.created,
        "router": router_record(fit), **(extra or {})})
    return stopping, ann
