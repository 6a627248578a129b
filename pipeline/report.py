"""The build report: ``report.md`` (for people), ``report.json`` (the same numbers, for tools) and
``plots/*.png``, written from the evaluate stage's results (pipeline/evaluate.py).

Every number says how it was obtained: MEASURED end to end on this host at batch 1, SIMULATED
(a rule run over precomputed per-exit probabilities with the measured segment costs), or
ESTIMATED (roofline, for a device not at hand). :func:`summarize` computes the key numbers and
the acceptance checks; :func:`write_report` writes everything atomically.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["REPORT_SCHEMA", "summarize", "acceptance_checks", "finish_on_device",
           "render_markdown", "write_report", "summary_lines", "sweep_verdicts",
           "SWEEP_MAX_MISS_RATE", "SWEEP_STATIC_MARGIN_POINTS"]

REPORT_SCHEMA = 1

#: budget sweep targets per budget (``[acceptance]`` may override them with
#: ``sweep_max_miss_rate`` / ``sweep_static_margin_points`` where its section has them)
SWEEP_MAX_MISS_RATE = 0.01
SWEEP_STATIC_MARGIN_POINTS = 0.3


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------

def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """The key numbers, all MEASURED end to end on this host at batch 1 in one interleaved run."""
    v = results["measured"]["variants"]
    mono, full, ad = v["monolithic"], v["full_depth"], v["adaptive"]
    bud = v.get("budget")
    out = {
        "measured_on": "this host, batch 1, one interleaved run",
        "n_measured": results["measured"]["n"],
        "full_depth_accuracy": full["accuracy"],
        "adaptive_accuracy": ad["accuracy"],
        # against the better of full depth and the monolithic session: the two agree in an
        # fp32 build; in an int8 build the monolithic session is the fp32 network
        "accuracy_drop_points": 100.0 * (max(full["accuracy"], mono["accuracy"])
                                         - ad["accuracy"]),
        "drop_reference": ("monolithic session" if mono["accuracy"] > full["accuracy"]
                           else "full depth"),
        "monolithic_accuracy": mono["accuracy"],
        "mean_latency_ms": ad["mean_ms"],
        "p99_latency_ms": ad["p99_ms"],
        "full_depth_mean_latency_ms": full["mean_ms"],
        "full_depth_p99_latency_ms": full["p99_ms"],
        "monolithic_mean_latency_ms": mono["mean_ms"],
        "monolithic_p99_latency_ms": mono["p99_ms"],
        "speedup_vs_monolithic": mono["mean_ms"] / ad["mean_ms"] if ad["mean_ms"] > 0 else None,
        "latency_ratio_vs_monolithic": (ad["mean_ms"] / mono["mean_ms"]
                                        if mono["mean_ms"] > 0 else None),
        "full_depth_ratio_vs_monolithic": (full["mean_ms"] / mono["mean_ms"]
                                           if mono["mean_ms"] > 0 else None),
        "macs_fraction": ad["macs_fraction"],
        "mean_depth": ad.get("mean_depth"),
        "exit_histogram": ad.get("exit_histogram"),
        "rule": (results.get("calibration") or {}).get("rule"),
        "skip_config": (results.get("calibration") or {}).get("skip_config"),
    }
    if bud:
        out.update(budget_ms=bud["budget_ms"], budget_accuracy=bud["accuracy"],
                   budget_mean_latency_ms=bud["mean_ms"], budget_p99_latency_ms=bud["p99_ms"],
                   budget_deadline_missed=bud.get("deadline_missed"))
    return out


def acceptance_checks(results: dict[str, Any], acceptance: dict[str, Any]) -> list[dict[str, Any]]:
    """Pass/fail lines for the acceptance targets (docs/build.md)."""
    s = summarize(results)
    data = results.get("data") or {}
    scope = (f"{data.get('name')} test set, {s['n_measured']} images, measured on this host in one run"
             + ("" if not data.get("limited") and s["n_measured"] == data.get("n")
                else " (a subset: indicative only)"))
    checks = []
    drop_ok = s["accuracy_drop_points"] <= acceptance["max_drop"] + 1e-9
    ratio = s["latency_ratio_vs_monolithic"]
    ratio_ok = ratio is not None and ratio <= acceptance["latency_ratio"] + 1e-12
    checks.append({
        "name": "adaptive_speedup",
        "target": (f"adaptive within {acceptance['max_drop']:g} points of full-depth accuracy "
                   f"and of the monolithic session's, mean latency <= "
                   f"{acceptance['latency_ratio']:g}x the monolithic ONNX Runtime session"),
        "passed": bool(drop_ok and ratio_ok),
        "value": {"accuracy_drop_points": s["accuracy_drop_points"], "latency_ratio": ratio},
        "detail": (f"accuracy {100 * s['adaptive_accuracy']:.2f}% vs {s['drop_reference']} "
                   f"{100 * max(s['full_depth_accuracy'], s['monolithic_accuracy']):.2f}% "
                   f"(drop {s['accuracy_drop_points']:.2f} "
                   f"points {'<=' if drop_ok else '>'} {acceptance['max_drop']:g}); mean "
                   f"{s['mean_latency_ms']:.3f} ms vs monolithic "
                   f"{s['monolithic_mean_latency_ms']:.3f} ms = {ratio:.2f}x "
                   f"({'<=' if ratio_ok else '>'} {acceptance['latency_ratio']:g}x)"),
        "scope": scope})
    fr = s["full_depth_ratio_vs_monolithic"]
    fr_ok = fr is not None and fr <= acceptance["full_depth_overhead"] + 1e-12
    checks.append({
        "name": "full_depth_overhead",
        "target": (f"segmented runtime at full depth <= {acceptance['full_depth_overhead']:g}x the "
                   "monolithic session"),
        "passed": bool(fr_ok), "value": {"ratio": fr},
        "detail": (f"full depth {s['full_depth_mean_latency_ms']:.3f} ms vs monolithic "
                   f"{s['monolithic_mean_latency_ms']:.3f} ms = {fr:.3f}x"),
        "scope": scope})
    bud = results["measured"]["variants"].get("budget")
    if bud:
        q = float(acceptance["budget_percentile"])
        # the measured per-image times are not stored; the percentiles we have are exact ones
        key = {99.0: "p99_ms", 95.0: "p95_ms", 90.0: "p90_ms", 50.0: "p50_ms", 100.0: "max_ms"}.get(q)
        val = bud.get(key) if key else None
        ok = val is not None and val <= bud["budget_ms"]
        checks.append({
            "name": "budget_tail",
            "target": f"with a budget, p{q:g} latency stays within it",
            "passed": bool(ok), "value": {f"p{q:g}_ms": val, "budget_ms": bud["budget_ms"]},
            "detail": (f"budget {bud['budget_ms']:g} ms: p{q:g} {val:.3f} ms, max "
                       f"{bud['max_ms']:.3f} ms, {bud.get('over_budget', 0)} of "
                       f"{s['n_measured']} over the budget; accuracy {100 * bud['accuracy']:.2f}%"
                       if val is not None else "percentile not available"),
            "scope": scope})
    sweep = results.get("budget_sweep")
    if sweep and sweep.get("points"):
        checks.append(_sweep_check(sweep, acceptance, data))
    return checks


def sweep_verdicts(sweep: dict[str, Any], acceptance: Optional[dict[str, Any]] = None
                   ) -> list[dict[str, Any]]:
    """Per budget of the measured sweep: ``miss_ok`` (measured miss rate <= 1 %), ``accuracy_ok``
    (accuracy >= the best static sub-network that fits the budget - 0.3 points), ``passed``
    (both), or ``feasible`` False (``passed`` None) where no static sub-network fits the budget
    (below the fastest exit's p99: no deployment meets the miss target there)."""
    acceptance = acceptance or {}
    max_miss = float(acceptance.get("sweep_max_miss_rate", SWEEP_MAX_MISS_RATE))
    margin = float(acceptance.get("sweep_static_margin_points", SWEEP_STATIC_MARGIN_POINTS))
    out = []
    for p in sweep.get("points") or []:
        best = p.get("best_static")
        miss_ok = p["miss_rate"] <= max_miss + 1e-12
        v: dict[str, Any] = {"budget_ms": p["budget_ms"], "miss_ok": bool(miss_ok),
                             "max_miss_rate": max_miss, "margin_points": margin,
                             "feasible": best is not None}
        if best is None:
            v.update(accuracy_ok=None, passed=None)
        else:
            gap = 100.0 * (p["accuracy"] - best["accuracy"])
            acc_ok = gap >= -margin - 1e-9
            v.update(accuracy_ok=bool(acc_ok), points_vs_static=gap,
                     passed=bool(miss_ok and acc_ok))
        out.append(v)
    return out


def _sweep_check(sweep: dict[str, Any], acceptance: dict[str, Any], data: dict) -> dict[str, Any]:
    verdicts = sweep_verdicts(sweep, acceptance)
    feasible = [v for v in verdicts if v["feasible"]]
    failed = [v for v in feasible if not v["passed"]]
    max_miss = verdicts[0]["max_miss_rate"]
    margin = verdicts[0]["margin_points"]
    n_inf = len(verdicts) - len(feasible)
    detail = (f"{len(feasible) - len(failed)} of {len(feasible)} budgets pass"
              + (" (failing: " + ", ".join(
                  f"{v['budget_ms']:g} ms [" + ", ".join(
                      (["miss rate"] if not v["miss_ok"] else [])
                      + (["accuracy"] if not v["accuracy_ok"] else [])) + "]"
                  for v in failed) + ")" if failed else "")
              + (f"; {n_inf} budget(s) below every static sub-network's p99 not counted"
                 if n_inf else "")
              + f"; budgets {sweep['spacing']} from {sweep['from']['ms']:.3g} to "
              f"{sweep['to']['ms']:.3g} ms")
    return {
        "name": "budget_sweep",
        "target": (f"at each budget of the sweep that some static sub-network fits (p99), "
                   f"miss rate <= {100 * max_miss:g}% and accuracy >= the best static sub-network "
                   f"that fits - {margin:g} points"),
        "passed": bool(feasible) and not failed,
        "value": {"budgets": verdicts},
        "detail": detail,
        "scope": (f"{data.get('name')} test set, first {sweep['n']} images, MEASURED on this host "
                  "at batch 1 in one interleaved run"
                  + ("" if sweep["n"] == data.get("n") and not data.get("limited")
                     else " (a subset: indicative only)"))}


def finish_on_device(root: Path, device: str, model_name: str, backends: list[str],
                     archive: Optional[str], is_jetson: bool) -> list[str]:
    """How to finish on the device: copy, build TensorRT engines there, measure there."""
    from export.backends import artifact_id

    name = f"{artifact_id(model_name)}-{device}"  # a "module:factory" spec has no ':' here
    host = "jetson" if is_jetson else device
    bundle = root / "bundle"
    lines = [f"scp -r {shlex.quote(str(bundle))} {host}:{name}"]
    if archive:
        lines.append(f"# or: scp {shlex.quote(str(root / archive))} {host}: && ssh {host} "
                     f"tar xzf {archive}")
    if "tensorrt" in backends:
        lines.append(f"pipeline engines --bundle {name}    # on the device: TensorRT engines "
                     "(not portable, so built there)")
    lines.append(f"pipeline profile --bundle {name}    # on the device: MEASURED latency replaces "
                 "the estimates")
    return lines


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------

def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _ms(x: Optional[float]) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    r = report
    s = r["summary"]
    res = r["results"]
    dev = r["device"]
    host = res.get("host") or {}
    L: list[str] = []
    L.append(f"# Build report: {r['model']['name']} on {r['data']['name']} for {dev['name']}")
    L.append("")
    L.append(f"Written {r['created']} by `pipeline build` ({r['tool_version']}). Device "
             f"`{dev['name']}` ({dev['arch']}): "
             + ("**this machine** - the shipped bundle is measured here." if dev["is_host"] else
                "**not this machine** - the shipped bundle's latency table is ESTIMATED (roofline); "
                "every MEASURED number below comes from `host/`, the same weights compiled for this "
                "machine."))
    L.append("")
    L.append("## Key numbers (MEASURED end to end on this host, batch 1, one interleaved run)")
    L.append("")
    rows = [
        ["full-depth accuracy (segmented runtime)", _pct(s["full_depth_accuracy"])],
        [f"adaptive accuracy ({s['rule']} on {s['skip_config']})", _pct(s["adaptive_accuracy"])],
        ["accuracy drop", f"{s['accuracy_drop_points']:.2f} points"],
        ["adaptive latency mean / p99",
         f"{_ms(s['mean_latency_ms'])} / {_ms(s['p99_latency_ms'])} ms"],
        ["full depth (segmented) mean / p99",
         f"{_ms(s['full_depth_mean_latency_ms'])} / {_ms(s['full_depth_p99_latency_ms'])} ms"],
        ["monolithic ONNX Runtime session mean / p99",
         f"{_ms(s['monolithic_mean_latency_ms'])} / {_ms(s['monolithic_p99_latency_ms'])} ms"],
        ["speed-up vs monolithic", f"{s['speedup_vs_monolithic']:.2f}x"],
        ["full depth vs monolithic", f"{s['full_depth_ratio_vs_monolithic']:.3f}x"],
        ["MACs fraction spent (heads passed included)", f"{s['macs_fraction']:.3f}"],
        ["mean depth / exit histogram", f"{s['mean_depth']:.2f} / {s['exit_histogram']}"],
    ]
    if "budget_ms" in s:
        rows.append([f"budget {s['budget_ms']:g} ms: accuracy, mean / p99",
                     f"{_pct(s['budget_accuracy'])}, {_ms(s['budget_mean_latency_ms'])} / "
                     f"{_ms(s['budget_p99_latency_ms'])} ms ({s['budget_deadline_missed']} deadline "
                     "misses)"])
    L += _table(["", "value"], rows)
    L.append("")
    meas = res["measured"]
    machine = host.get("machine") or {}
    L.append(f"{meas['n']} test images, each through every variant in rotating order "
             f"({meas['seconds']:.0f} s); {host.get('backend')} ({host.get('target')}) on "
             f"{machine.get('cpu_model')}, {machine.get('cpu_cores')} cores; session options of the "
             "monolithic session = the bundle's: "
             f"`{json.dumps(host.get('threads'))}`.")
    L.append("")
    L.append("## Acceptance")
    L.append("")
    for c in r["acceptance"]:
        L.append(f"- **{'PASS' if c['passed'] else 'FAIL'}** {c['target']}: {c['detail']} "
                 f"[{c['scope']}]")
    L.append("")
    L.append("## What ships")
    L.append("")
    b = r["bundle"]
    L.append(f"- `{b['path']}/`: compiled for `{dev['name']}` with {', '.join(b['backends'])}"
             + (f" (left out: {'; '.join(f'{k}: {v}' for k, v in b['skipped'].items())})"
                if b.get("skipped") else "") + ".")
    if b.get("archive"):
        L.append(f"- `{b['archive']}`: the same bundle as one deterministic archive.")
    L.append(f"- stopping rule `{b['rule']}` on skip config `{b['skip_config']}`, calibrated on "
             f"{r['calibration'].get('n')} validation images to a {b['target']} with "
             f"{b['cost_source']}.")
    L.append(f"- latency table: {b['latency_kind']}.")
    if not dev["is_host"]:
        L.append(f"- `host/`: the same pieces compiled for this machine ({host.get('device')}); "
                 "its rule is calibrated on this machine's measured costs.")
        L.append("- The validation and test predictions were computed on this machine with the "
                 "ONNX Runtime artifacts of the same ONNX pieces (fp32): the device's ONNX Runtime "
                 "artifacts give the same predictions. TensorRT engines built with reduced "
                 "precision (the profile asks for "
                 f"{dev.get('tensorrt_precision') or 'n/a'}) may flip a few borderline predictions.")
    L.append("")
    if r.get("finish_on_device"):
        L.append(f"## Finish on the device ({dev['name']})")
        L.append("")
        L.append("```bash")
        L += r["finish_on_device"]
        L.append("```")
        L.append("")
        L.append("Until the engines are built the runtime falls back to ONNX Runtime (and says so). "
                 "The lookahead rule reads the device's latency table, so it adapts to the measured "
                 "table; the threshold rules keep their thresholds.")
        L.append("")
    est = res.get("device_estimate")
    if est:
        L.append(f"## On {est['device']} (ESTIMATED, roofline)")
        L.append("")
        rows = []
        for backend, pt in est["backends"].items():
            rows.append([backend, _pct(pt["accuracy"]), _ms(pt["mean_latency_ms"]),
                         _ms(pt["full_depth_latency_ms"]), f"{pt['speedup_vs_full_depth']:.2f}x",
                         f"{pt['mean_depth']:.2f}", str(pt["exit_histogram"])])
        L += _table(["backend", "test accuracy (exact)", "mean ms (estimated)",
                     "full depth ms (estimated)", "speed-up vs full depth", "mean depth", "exits"],
                    rows)
        L.append("")
        L.append(f"The shipped rule (`{est['rule']}` on `{est['skip_config']}`, calibrated with "
                 f"{est['calibrated_with']}) over the test-set exit probabilities; latency = the "
                 "ESTIMATED cumulative latency to the exit taken. Replace with measurements on the "
                 "device (above).")
        L.append("")
    L.append("## Measured on this host")
    L.append("")
    rows = []
    for name, label in (("monolithic", "monolithic ONNX Runtime session"),
                        ("full_depth", "segmented runtime, full depth"),
                        ("adaptive", "adaptive (calibrated rule)"), ("budget", "adaptive + budget")):
        v = meas["variants"].get(name)
        if not v:
            continue
        if name == "budget":
            label += f" {v['budget_ms']:g} ms"
        rows.append([label, _pct(v["accuracy"]), _ms(v["mean_ms"]), _ms(v["p50_ms"]),
                     _ms(v["p95_ms"]), _ms(v["p99_ms"]), _ms(v["max_ms"]),
                     "1.000" if name == "monolithic" else f"{v['macs_fraction']:.3f}",
                     "-" if name == "monolithic" else str(v.get("exit_histogram"))])
    L += _table(["variant", "accuracy", "mean ms", "p50", "p95", "p99", "max", "MACs fraction",
                 "exits"], rows)
    L.append("")
    L.append("![trade-off](plots/tradeoff.png)")
    L.append("")
    if "plots/pareto.png" in r.get("plots", []):
        L.append("![Pareto frontier](plots/pareto.png)")
        L.append("")
    if "plots/cdf.png" in r.get("plots", []):
        L.append("![latency CDF](plots/cdf.png)")
        L.append("")
    L += _sweep_markdown(r)
    L.append("## Trade-off curves (SIMULATED over measured segment costs)")
    L.append("")
    cal_cfg = (res.get("calibration") or {}).get("skip_config")
    L.append(f"Each rule, on the deployed skip configuration `{cal_cfg}`, is calibrated on the "
             "validation split at each max-drop target (points below the validation accuracy of "
             "full depth FF..F, as the deployed rule), then run over the test set's per-exit "
             "probabilities; a sample's latency is the measured mean cumulative latency to the "
             "exit it takes. Exact for accuracy and exits.")
    L.append("")
    rows = []
    for p in res.get("rule_curves") or []:
        rows.append([p["rule"], f"{p['max_drop']:g}", _pct(p["val_accuracy"]), _pct(p["accuracy"]),
                     _ms(p["mean_latency_ms"]), f"{p['macs_fraction']:.3f}", f"{p['mean_depth']:.2f}"])
    L += _table(["rule", "max-drop", "val accuracy", "test accuracy", "mean ms", "MACs fraction",
                 "mean depth"], rows)
    L.append("")
    if res.get("budgets"):
        rows = [[f"{p['budget_ms']:g}", p["skip_config"], str(p["deepest_exit_allowed"]),
                 _pct(p["accuracy"]), _ms(p["mean_latency_ms"]), f"{p['macs_fraction']:.3f}",
                 str(p["exit_histogram"])] for p in res["budgets"]]
        L.append("Budgets (calibrated rule + deadline; budgets between the first-exit p95 and the "
                 "full-depth p95):")
        L.append("")
        L += _table(["budget ms", "skip config", "deepest exit", "test accuracy", "mean ms",
                     "MACs fraction", "exits"], rows)
        L.append("")
    rows = [[p["prefix"], str(p["exit"]), _pct(p["accuracy"]), _ms(p["mean_latency_ms"]),
             _ms(p["p99_latency_ms"]), f"{p['macs_fraction']:.3f}"] for p in res.get("static") or []]
    L.append("Static sub-networks (each skip configuration prefix at each exit, fixed depth):")
    L.append("")
    L += _table(["config prefix", "exit", "test accuracy", "mean ms", "p99 ms", "MACs fraction"], rows)
    L.append("")
    L.append("![exits](plots/exits.png)")
    L.append("")
    L.append("## Latency per exit")
    L.append("")
    for p in r["plots"]:
        if "latency" in p:
            L.append(f"![{p}]({p})")
    L.append("")
    L.append("## Calibration")
    L.append("")
    cal = r["calibration"]
    for role, rec in (cal.get("bundles") or {}).items():
        L.append(f"- {role} bundle: `{rec['rule']}` on `{rec['skip_config']}`, validation accuracy "
                 f"{_pct(rec['val_accuracy'])} (full depth {_pct(rec['full_depth_accuracy'])}), "
                 f"mean depth {rec['mean_exit']:.2f}, costs "
                 + (f"{[round(c, 4) for c in rec['segment_ms']]} ms "
                    if rec.get("segment_ms") is not None else "")  # None: a rule without them
                 + f"({rec['cost_source']}).")
    L.append("")
    for role, rec in (cal.get("bundles") or {}).items():
        if not rec.get("search"):
            continue
        L.append(f"Skip configuration search ({role} bundle; the target is relative to the full "
                 "depth of FF..F, so a configuration whose own full depth is less accurate has less "
                 "room; the fastest eligible one on the validation split wins):")
        L.append("")
        rows = []
        for c in rec["search"]:
            acc = cal.get("skip_accuracy", {}).get(c["skip_config"])
            rows.append([c["skip_config"], _pct(acc), "yes" if c.get("eligible") else "no",
                         _pct(c.get("val_accuracy")) if c.get("eligible") else "",
                         _ms(c.get("mean_latency_ms")) if c.get("eligible") else "",
                         "**chosen**" if c["skip_config"] == rec["skip_config"] else ""])
        L += _table(["config", "full-depth val accuracy", "eligible", "rule val accuracy",
                     "rule mean ms", ""], rows)
        L.append("")
    L.append("## Stages")
    L.append("")
    rows = [[st["name"], st["status"], f"{st['seconds']:.1f}",
             "" if st.get("built_seconds") is None else f"{st['built_seconds']:.1f}"]
            for st in r["stages"]]
    L += _table(["stage", "status", "seconds", "seconds when built"], rows)
    L.append("")
    L.append("(The report stage wrote this file; the build's summary lists its time.)")
    L.append("")
    L.append(f"Effective config: `build.toml`. Regenerate: `pipeline build --config "
             f"{r['paths']['build_toml']}`.")
    L.append("")
    return "\n".join(L)


def _sweep_markdown(r: dict[str, Any]) -> list[str]:
    sweep = r["results"].get("budget_sweep")
    if not sweep or not sweep.get("points"):
        return []
    verdicts = sweep_verdicts(sweep, (r.get("config") or {}).get("acceptance"))
    L = ["## Budget sweep (MEASURED end to end on this host, batch 1, one interleaved run)", ""]
    L.append(f"`model.predict(img, budget_ms=B)` for {len(sweep['points'])} budgets "
             f"({sweep['spacing']} spacing) from the {sweep['from']['what']} "
             f"({sweep['from']['ms']:.3g} ms) to the {sweep['to']['what']} "
             f"({sweep['to']['ms']:.3g} ms) of this host's latency table, on the first "
             f"{sweep['n']} test images: every image through every budget"
             + (" and the monolithic session" if sweep.get("with_monolithic") else "")
             + f" in a random order per image ({sweep['seconds']:.1f} s). Miss rate = calls whose "
             "measured wall time exceeded B. Best static = the most accurate static sub-network "
             f"(configuration prefix, exit) whose p99 fits B; {sweep['static_latency']}.")
    L.append("")
    p0 = sweep["points"][0]
    if "monolithic_mean_ms" in p0:
        L.append(f"Monolithic session in the same run: accuracy {_pct(p0['monolithic_accuracy'])}, "
                 f"mean {_ms(p0['monolithic_mean_ms'])} ms, p99 {_ms(p0['monolithic_p99_ms'])} ms.")
        L.append("")
    rows = []
    for p, v in zip(sweep["points"], verdicts):
        best = p.get("best_static")
        verdict = ("n/a (nothing static fits)" if v["passed"] is None else
                   "PASS" if v["passed"] else
                   "FAIL (" + ", ".join((["miss"] if not v["miss_ok"] else [])
                                            + (["accuracy"] if not v["accuracy_ok"] else [])) + ")")
        rows.append([f"{p['budget_ms']:g}", _pct(p["accuracy"]),
                     f"{100 * p['miss_rate']:.2f}% ({p['misses']}/{p['n']})", _ms(p["mean_ms"]),
                     _ms(p["p99_ms"]), f"{p['mean_depth']:.2f}",
                     "-" if best is None else
                     f"{best['prefix']} (exit {best['exit']}, measured p99 "
                     f"{_ms(best.get('measured_p99_ms', best['p99_latency_ms']))})",
                     "-" if best is None else _pct(best["accuracy"]), verdict])
    L += _table(["budget ms", "accuracy", "miss rate", "mean ms", "p99 ms", "mean depth",
                 "best static that fits", "its accuracy",
                 f"miss <= {100 * verdicts[0]['max_miss_rate']:g}%, accuracy >= static - "
                 f"{verdicts[0]['margin_points']:g}"], rows)
    L.append("")
    if "plots/budget-sweep.png" in r.get("plots", []):
        L.append("![budget sweep](plots/budget-sweep.png)")
        L.append("")
    return L


def _target_text(target: dict) -> str:
    if target.get("max_drop") is not None:
        return f"max-drop of {target['max_drop']:g} points"
    return f"mean budget of {target.get('mean_budget_ms')} ms"


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The key numbers and acceptance lines printed at the end of a build."""
    s = report["summary"]
    out = [f"full-depth accuracy {_pct(s['full_depth_accuracy'])}, adaptive "
           f"{_pct(s['adaptive_accuracy'])} ({s['rule']} on {s['skip_config']}, drop "
           f"{s['accuracy_drop_points']:.2f} points)",
           f"latency (MEASURED here, batch 1): adaptive mean {_ms(s['mean_latency_ms'])} ms, p99 "
           f"{_ms(s['p99_latency_ms'])} ms; monolithic {_ms(s['monolithic_mean_latency_ms'])} ms; "
           f"speed-up {s['speedup_vs_monolithic']:.2f}x; full depth "
           f"{s['full_depth_ratio_vs_monolithic']:.3f}x monolithic; MACs fraction "
           f"{s['macs_fraction']:.3f}"]
    est = report["results"].get("device_estimate")
    if est:
        for backend, pt in est["backends"].items():
            out.append(f"on {est['device']} ({backend}, ESTIMATED): mean "
                       f"{_ms(pt['mean_latency_ms'])} ms vs full depth "
                       f"{_ms(pt['full_depth_latency_ms'])} ms "
                       f"({pt['speedup_vs_full_depth']:.2f}x)")
            break
    for c in report["acceptance"]:
        out.append(f"{'PASS' if c['passed'] else 'FAIL'}  {c['target']}: {c['detail']}")
    return out


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def write_report(root: Path, *, results: dict[str, Any], cfg, profile, is_host: bool,
                 stages: list[dict], archive: Optional[str] = None,
                 train_summary: Optional[dict] = None,
                 log: Optional[Callable[[str], None]] = None) -> dict[str, Path]:
    """Write ``plots/``, ``report.json`` and ``report.md`` under ``root``; returns
    ``{relative name: path}`` of everything written."""
    from devices.plots import plot_latency
    from runtime.atomic import atomic_directory, atomic_write_json, atomic_write_text
    from runtime.bundle import Bundle
    from runtime.manifest import utc_now_iso

    from pipeline.report_plots import (plot_budget_sweep, plot_exit_histogram, plot_latency_cdf,
                                       plot_pareto, plot_tradeoff)

    root = Path(root)
    bundle = Bundle.open(root / "bundle", verify=False).manifest
    host_dir = root / "bundle" if is_host else root / "host"
    host_m = Bundle.open(host_dir, verify=False).manifest
    cal = json.loads((root / "work" / "calibrated" / "calibration.json").read_text())
    compile_ann = bundle.annotations.get("compile") or {}
    dev_cal = (cal.get("bundles") or {}).get("device") or {}
    written: dict[str, Path] = {}
    title = f"{bundle.model.name} on {results['data']['name']} for {profile.name}"
    plots: list[str] = []
    with atomic_directory(root / "plots", overwrite=True) as tmp:
        plot_tradeoff(results, tmp / "tradeoff.png", title=f"{title}: accuracy / cost",
                      ratio=float(cfg.acceptance.latency_ratio))
        plots.append("plots/tradeoff.png")
        plot_exit_histogram(results, tmp / "exits.png", title=f"{title}: exit histogram")
        plots.append("plots/exits.png")
        if results.get("static") and ((results.get("measured") or {}).get("variants") or {}):
            plot_pareto(results, tmp / "pareto.png", title=f"{title}: Pareto frontier")
            plots.append("plots/pareto.png")
        if (results.get("budget_sweep") or {}).get("points"):
            plot_budget_sweep(results, tmp / "budget-sweep.png", title=f"{title}: budget sweep")
            plots.append("plots/budget-sweep.png")
        if (results.get("measured") or {}).get("cdf"):
            plot_latency_cdf(results, tmp / "cdf.png", title=f"{title}: latency CDF")
            plots.append("plots/cdf.png")
        plot_latency(host_m, tmp / "latency-host.png",
                     title=f"{bundle.model.name}: cumulative latency per exit, MEASURED on this host")
        plots.append("plots/latency-host.png")
        if not is_host:
            plot_latency(bundle, tmp / f"latency-{profile.name}.png",
                         title=f"{bundle.model.name}: cumulative latency per exit, ESTIMATED for "
                               f"{profile.name}")
            plots.append(f"plots/latency-{profile.name}.png")
    for p in plots:
        written[p] = root / p
    trt = profile.backend("tensorrt")
    backends = list(bundle.deployment.backend_order) if bundle.deployment else []
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA,
        "created": utc_now_iso(),
        "tool_version": bundle.tool_version,
        "device": {"name": profile.name, "arch": profile.arch, "is_host": is_host,
                   "latency_budget_ms": profile.latency_budget_ms,
                   "tensorrt_precision": trt.options.get("precision") if trt else None},
        "model": {"name": bundle.model.name, "family": bundle.model.family,
                  "params": bundle.model.params, "stages": bundle.stages,
                  "monolithic_macs": results["monolithic"]["macs"]},
        "data": results["data"],
        "summary": summarize(results),
        "acceptance": acceptance_checks(results, cfg.section_dict("acceptance")),
        "bundle": {"path": "bundle", "archive": archive, "backends": backends,
                   "skipped": compile_ann.get("skipped") or {},
                   "rule": bundle.stopping.rule, "params": bundle.stopping.params,
                   "skip_config": dev_cal.get("skip_config"),
                   "target": _target_text(dev_cal.get("target") or {}),
                   "cost_source": dev_cal.get("cost_source"),
                   "latency_kind": ("MEASURED on this machine" if is_host else
                                    f"ESTIMATED (roofline) for {profile.name}; replace it on the "
                                    "device with `pipeline profile`")},
        "host_bundle": None if is_host else {"path": "host", "device": host_m.device},
        "calibration": cal,
        "finish_on_device": [] if is_host else finish_on_device(
            root, profile.name, bundle.model.name, backends, archive,
            profile.name.startswith("jetson")),
        "training": train_summary,
        "stages": stages,
        "plots": plots,
        "paths": {"root": str(root), "bundle": str(root / "bundle"),
                  "host": None if is_host else str(root / "host"),
                  "build_toml": str(root / "build.toml")},
        "config": cfg.to_dict(),
        "results": results,
    }
    atomic_write_json(root / "report.json", report)
    written["report.json"] = root / "report.json"
    atomic_write_text(root / "report.md", render_markdown(report))
    written["report.md"] = root / "report.md"
    if log:
        log(f"wrote {root / 'report.md'}, {root / 'report.json'}, {len(plots)} plots in "
            f"{root / 'plots'}")
    return written
