"""How far routing can go on a trained model: the router's frontier with the price of latency
chosen on the test set itself (an optimistic bound, not a deployable rule).

    .venv/bin/python bench/router_bound.py --build-dir build/jetson-orin-nano
    .venv/bin/python bench/router_bound.py --build-dir out0/jetson-orin-nano --build-dir out1/jetson-orin-nano

Per build: the validation split's per-exit probabilities of every skip configuration
(``work/calibrated/val.npz``), the test split's through the bundle measured on this machine
(``host/``, else ``bundle/``), and that bundle's latency table (p50 per segment, plus the
router's per-exit cost). For each variant of the first stage (``F``, ``T``: no exit precedes it)
and a grid of prices, the all-exits policy is fitted on the whole validation split
(``export.routing_fit.fit_policy``) and simulated on the test set. Printed per start: the
cheapest policy whose test accuracy is within ``--max-drop`` points of full depth ``FF..F``, as a
fraction of full depth's simulated cost, with its test drop and price. The deployed router is
fitted on one validation fold and certified on the other, so it can only be slower than this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build-dir", type=Path, action="append", required=True,
                   help="a `pipeline build` output directory (<out>/<device>); repeatable")
    p.add_argument("--max-drop", type=float, default=0.5, help="test points below full depth")
    p.add_argument("--prices", type=int, default=40, help="prices on the grid (geometric, "
                   "0.003..1 accuracy per ms)")
    return p.parse_args(argv)


def bound(build_dir: Path, max_drop: float, prices: int) -> dict:
    from export.routing_fit import RoutingData, fit_policy, simulate, variants
    from pipeline.evaluate import config_probabilities
    from pipeline.router_build import EXIT_COST_MS, span_costs
    from pipeline.runtime_cmd import dataset_for_bundle, split_arrays
    from runtime import AdaptiveModel

    here = build_dir / "host" if (build_dir / "host").is_dir() else build_dir / "bundle"
    model = AdaptiveModel.load(here, warn=False)
    m = model.manifest
    S, full = m.stages, "F" * m.stages
    val = np.load(build_dir / "work" / "calibrated" / "val.npz")
    V = RoutingData({c: val[f"p_{c}"] for c in m.skip_configs}, val["labels"])
    _, ds = dataset_for_bundle(m, None, None)
    x, y = split_arrays(ds.test, None)
    T = RoutingData(config_probabilities(model, x), y)
    cost = span_costs(m, model.latency_device, model.table.backend, "p50")
    full_cost = cost(0, S - 1, full) + EXIT_COST_MS
    full_acc = float(T.correct[full].mean())
    out = {"build": str(build_dir), "full_depth_test_accuracy": full_acc,
           "exit_accuracy": {p: float(T.correct[p].mean()) for p in ("F", "T")}, "starts": {}}
    for start in variants(1):
        best = None
        for lam in np.geomspace(0.003, 1.0, prices):
            pol = fit_policy(V, cost, list(range(S)), float(lam), np.arange(V.N),
                             exit_cost_ms=EXIT_COST_MS, start=start)
            o = simulate(pol, T, cost, np.arange(T.N), exit_cost_ms=EXIT_COST_MS)
            drop = 100.0 * (full_acc - o.accuracy)
            rel = o.mean_latency_ms / full_cost
            if drop <= max_drop and (best is None or rel < best["cost_fraction"]):
                best = {"cost_fraction": rel, "test_drop_points": drop, "lam": float(lam)}
        out["starts"][start] = best
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"# {' '.join([sys.executable, *sys.argv])}")
    print(f"{'build':<48} {'full depth':>10} {'exit 0 F/T':>12}  cheapest within "
          f"{args.max_drop:g} test points (cost / full depth, drop, price) per first stage")
    for d in args.build_dir:
        r = bound(d, args.max_drop, args.prices)
        cells = []
        for start, b in r["starts"].items():
            cells.append(f"{start}: " + ("none" if b is None else
                                         f"{b['cost_fraction']:.3f}, {b['test_drop_points']:.2f} pt, "
                                         f"lam {b['lam']:.3g}"))
        e = r["exit_accuracy"]
        print(f"{str(d):<48} {100 * r['full_depth_test_accuracy']:>9.2f}% "
              f"{100 * e['F']:>5.1f}/{100 * e['T']:.1f}%  " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
