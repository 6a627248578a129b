"""PNG plots of a build report (matplotlib Agg canvas, no pyplot state; written atomically).

* :func:`plot_tradeoff` - accuracy against mean latency (measured latency table of this host) and
  against the MACs fraction, for the adaptive model across rules and targets, under budgets, the
  deployed rule, every static sub-network, the monolithic session, and the measured headline
  points. One can see whether the adaptive curves dominate the static sub-networks.
* :func:`plot_exit_histogram` - where the samples leave: measured runs (adaptive, budget) and,
  for a device not at hand, the shipped rule on the device's (estimated) costs.
* :func:`plot_pareto` - accuracy against mean latency: every static sub-network (and their Pareto
  frontier), the MEASURED adaptive operating points (calibrated rule, budgets of the sweep), full
  depth and the monolithic session, with the gain at equal accuracy written on it.
* :func:`plot_budget_sweep` - the MEASURED budget sweep: accuracy and deadline-miss rate against
  the budget, with the best static sub-network that fits each budget and the 1 % miss line.
* :func:`plot_latency_cdf` - the CDF (and its tail) of the per-call times of every measured
  variant, with the budget marked.
* the latency per exit comes from :func:`devices.plots.plot_latency`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_tradeoff", "plot_exit_histogram", "plot_pareto", "plot_budget_sweep",
           "plot_latency_cdf", "static_frontier", "RULE_STYLES", "VARIANT_STYLES"]

RULE_STYLES = {"max_prob": ("tab:blue", "o"), "entropy": ("tab:orange", "s"),
               "patience": ("tab:green", "^"), "lookahead": ("tab:red", "v")}


#: colour and label of each measured variant (monolithic, full_depth, adaptive, budget)
VARIANT_STYLES = {"monolithic": ("k", "monolithic ONNX Runtime session"),
                  "full_depth": ("tab:blue", "segmented runtime, full depth"),
                  "adaptive": ("tab:red", "adaptive (calibrated rule)"),
                  "budget": ("tab:brown", "adaptive + budget")}


def _save(fig, path: os.PathLike | str) -> Path:
    from runtime.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _figure(w: float, h: float, dpi: int = 110):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def plot_tradeoff(results: dict[str, Any], path: os.PathLike | str, *, title: str = "",
                  ratio: float = 0.55) -> Path:
    """Accuracy (%) vs mean latency (ms) and vs MACs fraction; see the module docstring.
    ``ratio``: the acceptance target, drawn as a vertical line at ratio x the monolithic mean."""
    fig = _figure(13.0, 6.4)
    axes = [fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)]
    meas = (results.get("measured") or {}).get("variants") or {}
    mono = meas.get("monolithic") or {}
    host = results.get("host") or {}
    for ax, xkey, xlabel in ((axes[0], "mean_latency_ms",
                              f"mean latency per image, batch 1 (ms, {host.get('latency_kind', '')} "
                              f"on this host)"),
                             (axes[1], "macs_fraction", "MACs spent / MACs of the monolithic model")):
        static = results.get("static") or []
        if static:
            ax.scatter([p[xkey] for p in static], [100 * p["accuracy"] for p in static], s=22,
                       c="0.6", marker="o", label="static sub-network (config prefix, exit)",
                       zorder=2)
            for p in static:
                ax.annotate(f"{p['prefix']}", (p[xkey], 100 * p["accuracy"]), fontsize=6,
                            color="0.4", xytext=(3, -3), textcoords="offset points")
        by_rule: dict[str, list] = {}
        for p in results.get("rule_curves") or []:
            by_rule.setdefault(p["rule"], []).append(p)
        for rule, pts in by_rule.items():
            pts = sorted(pts, key=lambda p: p[xkey])
            color, marker = RULE_STYLES.get(rule, ("tab:purple", "o"))
            ax.plot([p[xkey] for p in pts], [100 * p["accuracy"] for p in pts], marker=marker,
                    color=color, lw=1.3, ms=5, label=f"{rule} on {pts[0]['skip_config']} (max-drop "
                    + "/".join(f"{p['max_drop']:g}" for p in sorted(pts, key=lambda q: q["max_drop"]))
                    + ")", zorder=3)
        budgets = sorted(results.get("budgets") or [], key=lambda p: p["budget_ms"])
        if budgets:
            ax.plot([p[xkey] for p in budgets], [100 * p["accuracy"] for p in budgets], ls=":",
                    marker="D", color="tab:brown", ms=5, zorder=3,
                    label="calibrated rule + budget " + ", ".join(f"{p['budget_ms']:g}"
                                                                  for p in budgets) + " ms")
        dep = results.get("deployed")
        if dep:
            ax.scatter([dep[xkey]], [100 * dep["accuracy"]], s=130, facecolors="none",
                       edgecolors="k", marker="*", zorder=4,
                       label=f"deployed: {dep.get('rule')} on {dep.get('skip_config')} (simulated)")
        # measured end to end
        for name, style in (("adaptive", ("*", "tab:red", 180)), ("full_depth", ("P", "tab:blue", 90)),
                            ("budget", ("*", "tab:brown", 140))):
            v = meas.get(name)
            if not v:
                continue
            x = v["mean_ms"] if xkey == "mean_latency_ms" else v.get("macs_fraction")
            if x is None:
                continue
            label = {"adaptive": "MEASURED adaptive", "full_depth": "MEASURED full depth (segmented)",
                     "budget": f"MEASURED budget {v.get('budget_ms', 0):g} ms"}[name]
            ax.scatter([x], [100 * v["accuracy"]], marker=style[0], s=style[2], c=style[1],
                       edgecolors="k", linewidths=0.6, zorder=5, label=label)
        if mono:
            x = mono["mean_ms"] if xkey == "mean_latency_ms" else 1.0
            ax.scatter([x], [100 * mono["accuracy"]], marker="X", s=90, c="k", zorder=5,
                       label="MEASURED monolithic ONNX Runtime session")
            if xkey == "mean_latency_ms" and ratio:
                ax.axvline(ratio * mono["mean_ms"], color="k", lw=0.7, ls="--", alpha=0.5,
                           label=f"{ratio:g}x the monolithic mean (acceptance target)")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, alpha=0.3)
    # y range: every point, unless the shallow static exits are far below the adaptive ones;
    # then zoom on the interesting part and say how many static points are below it
    main = [100 * p["accuracy"] for p in (results.get("rule_curves") or [])]
    main += [100 * v["accuracy"] for v in meas.values() if "accuracy" in v]
    main += [100 * p["accuracy"] for p in (results.get("budgets") or [])]
    static_y = [100 * p["accuracy"] for p in (results.get("static") or [])]
    if main:
        hi = max(main + static_y) + 1.0
        lo = min(main + static_y) - 1.0
        floor = min(main) - 12.0
        if lo < floor:
            lo = floor
            below = sum(1 for y in static_y if y < lo)
            axes[0].text(0.01, 0.01, f"{below} static sub-network(s) below this range (see the "
                         "report table)", transform=axes[0].transAxes, fontsize=7, color="0.4")
        for ax in axes:
            ax.set_ylim(max(0.0, lo), min(100.5, hi))
    axes[0].set_title("accuracy vs latency (curves simulated over measured segment costs; "
                      "filled markers measured end to end)", fontsize=8)
    axes[1].set_title("accuracy vs compute (MACs incl. every exit head passed)", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle(title or "accuracy / cost trade-off", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.30, wspace=0.18)
    return _save(fig, path)


def plot_exit_histogram(results: dict[str, Any], path: os.PathLike | str, *,
                        title: str = "") -> Path:
    """Share of test images leaving at each exit."""
    series: list[tuple[str, list[int]]] = []
    meas = (results.get("measured") or {}).get("variants") or {}
    for name, label in (("adaptive", "MEASURED adaptive (this host)"),
                        ("budget", "MEASURED with budget (this host)")):
        v = meas.get(name)
        if v and v.get("exit_histogram"):
            if name == "budget":
                label = f"MEASURED with budget {v.get('budget_ms', 0):g} ms (this host)"
            series.append((label, v["exit_histogram"]))
    est = results.get("device_estimate") or {}
    for backend, pt in (est.get("backends") or {}).items():
        series.append((f"{est.get('device')} {backend}: shipped rule on ESTIMATED costs "
                       "(simulated)", pt["exit_histogram"]))
        break
    if not series:
        raise ValueError("no exit histogram to plot")
    S = len(series[0][1])
    fig = _figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(series)
    for j, (label, hist) in enumerate(series):
        total = max(1, sum(hist))
        xs = [k + (j - (len(series) - 1) / 2) * width for k in range(S)]
        bars = ax.bar(xs, [100 * h / total for h in hist], width=width, label=label)
        for b, h in zip(bars, hist):
            ax.annotate(f"{100 * h / total:.0f}%", (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(S))
    ax.set_xticklabels([f"exit {k}" for k in range(S)])
    ax.set_ylabel("test images (%)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or "exit histogram", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def static_frontier(static: list[dict[str, Any]], xkey: str = "mean_latency_ms") -> list[dict]:
    """The static sub-networks no other one beats (faster and at least as accurate), by ``xkey``."""
    out: list[dict] = []
    best = -1.0
    for p in sorted(static, key=lambda p: (p[xkey], -p["accuracy"])):
        if p["accuracy"] > best:
            out.append(p)
            best = p["accuracy"]
    return out


def plot_pareto(results: dict[str, Any], path: os.PathLike | str, *, title: str = "") -> Path:
    """Accuracy (%) vs mean latency (ms, batch 1): static sub-networks and their frontier, the
    MEASURED adaptive operating points, full depth and the monolithic session. The text box gives
    the gain at equal accuracy: adaptive mean / monolithic mean (the monolithic session is at
    least as accurate as the adaptive point when its accuracy is), and adaptive mean / the
    fastest static sub-network at least as accurate as the adaptive point."""
    meas = (results.get("measured") or {}).get("variants") or {}
    static = results.get("static") or []
    if not static and not meas:
        raise ValueError("nothing to plot: no static sub-networks and no measured variants")
    fig = _figure(9.5, 6.4)
    ax = fig.add_subplot(1, 1, 1)
    if static:
        ax.scatter([p["mean_latency_ms"] for p in static], [100 * p["accuracy"] for p in static],
                   s=24, c="0.6", zorder=2,
                   label="static sub-network (config prefix, exit): latency-table mean")
        for p in static:
            ax.annotate(p["prefix"], (p["mean_latency_ms"], 100 * p["accuracy"]), fontsize=6,
                        color="0.4", xytext=(3, -3), textcoords="offset points")
        front = static_frontier(static)
        ax.plot([p["mean_latency_ms"] for p in front], [100 * p["accuracy"] for p in front],
                drawstyle="steps-post", color="0.45", lw=1.0, ls="--", zorder=2,
                label="static Pareto frontier")
    sweep = (results.get("budget_sweep") or {}).get("points") or []
    if sweep:
        pts = sorted(sweep, key=lambda p: p["budget_ms"])
        ax.plot([p["mean_ms"] for p in pts], [100 * p["accuracy"] for p in pts], ls=":",
                marker="D", ms=4, color="tab:brown", zorder=3,
                label="MEASURED adaptive + budget (sweep, one point per budget)")
    for name, marker, size in (("adaptive", "*", 220), ("budget", "*", 140),
                               ("full_depth", "P", 100), ("monolithic", "X", 100)):
        v = meas.get(name)
        if not v:
            continue
        color, label = VARIANT_STYLES[name]
        if name == "budget":
            label += f" {v.get('budget_ms', 0):g} ms"
        ax.scatter([v["mean_ms"]], [100 * v["accuracy"]], marker=marker, s=size, c=color,
                   edgecolors="k", linewidths=0.6, zorder=5, label=f"MEASURED {label}")
    ad, mono = meas.get("adaptive"), meas.get("monolithic")
    lines = []
    if ad and mono and mono.get("mean_ms"):
        ratio = ad["mean_ms"] / mono["mean_ms"]
        lines.append(f"adaptive {ad['mean_ms']:.3f} ms / monolithic {mono['mean_ms']:.3f} ms = "
                     f"{ratio:.2f}x latency ({1 / ratio:.2f}x speed-up) at "
                     f"{100 * ad['accuracy']:.2f}% vs {100 * mono['accuracy']:.2f}% accuracy")
        y0 = 100 * ad["accuracy"]
        ax.annotate("", xy=(ad["mean_ms"], y0), xytext=(mono["mean_ms"], y0),
                    arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 1.0}, zorder=4)
    if ad and static:
        ok = [p for p in static if p["accuracy"] >= ad["accuracy"]]
        if ok:
            best = min(ok, key=lambda p: p["mean_latency_ms"])
            lines.append(f"fastest static at >= that accuracy: {best['prefix']} (exit "
                         f"{best['exit']}) {best['mean_latency_ms']:.3f} ms: adaptive = "
                         f"{ad['mean_ms'] / best['mean_latency_ms']:.2f}x of it")
        else:
            lines.append("no static sub-network is as accurate as the adaptive point")
    if lines:
        ax.text(0.99, 0.02, "gain at equal accuracy (x-ratio):\n" + "\n".join(lines),
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9}, zorder=6)
    ax.set_xlabel("mean latency per image, batch 1 (ms, this host; static: latency table, "
                  "segments only)", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title or "Pareto frontier: accuracy vs latency", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_budget_sweep(results: dict[str, Any], path: os.PathLike | str, *, title: str = "",
                      max_miss_rate: float = 0.01) -> Path:
    """Two panels against the budget (log scale): accuracy (MEASURED, with the best static
    sub-network that fits each budget as a step line) and the deadline-miss rate (with the
    ``max_miss_rate`` line)."""
    sweep = results.get("budget_sweep") or {}
    pts = sorted(sweep.get("points") or [], key=lambda p: p["budget_ms"])
    if not pts:
        raise ValueError("no budget sweep to plot")
    b = [p["budget_ms"] for p in pts]
    fig = _figure(12.0, 5.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.plot(b, [100 * p["accuracy"] for p in pts], marker="o", color="tab:brown",
             label="MEASURED predict(img, budget_ms=B)")
    stat = [100 * p["best_static"]["accuracy"] if p.get("best_static") else float("nan")
            for p in pts]
    ax1.plot(b, stat, drawstyle="steps-post", color="0.4", ls="--",
             label="best static sub-network whose p99 fits B")
    for p in pts:
        if p.get("best_static"):
            ax1.annotate(p["best_static"]["prefix"], (p["budget_ms"],
                                                      100 * p["best_static"]["accuracy"]),
                         fontsize=6, color="0.4", xytext=(2, 3), textcoords="offset points")
    if "monolithic_accuracy" in pts[0]:
        ax1.axhline(100 * pts[0]["monolithic_accuracy"], color="k", lw=0.8, ls=":",
                    label="monolithic session accuracy")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("accuracy vs budget", fontsize=9)
    ax2.plot(b, [100 * p["miss_rate"] for p in pts], marker="o", color="tab:red",
             label="MEASURED miss rate (wall time > B)")
    ax2.axhline(100 * max_miss_rate, color="k", lw=0.9, ls="--",
                label=f"{100 * max_miss_rate:g}% miss line")
    ax2.set_yscale("symlog", linthresh=0.1)
    ax2.set_ylim(0, 100)
    ax2.set_ylabel("calls over the budget (%)")
    ax2.set_title("deadline-miss rate vs budget", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("budget B (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle((title or "budget sweep") + f" - {sweep.get('n')} test images, batch 1, "
                 "interleaved", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_latency_cdf(results: dict[str, Any], path: os.PathLike | str, *,
                     title: str = "") -> Path:
    """The CDF of the per-call times of every measured variant (left) and its tail,
    P(time > t) on a log scale (right), with the headline budget as a vertical line."""
    meas = results.get("measured") or {}
    cdf = meas.get("cdf") or {}
    q = cdf.get("percentiles") or []
    series = [(name, cdf["ms"][name]) for name in VARIANT_STYLES if (cdf.get("ms") or {}).get(name)]
    series += [(name, v) for name, v in (cdf.get("ms") or {}).items()
               if name not in VARIANT_STYLES and v]
    if not q or not series:
        raise ValueError("no latency CDF to plot (measured.cdf)")
    budget = ((meas.get("variants") or {}).get("budget") or {}).get("budget_ms")
    fig = _figure(12.0, 5.0)
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    hi = 0.0
    for name, ms in series:
        color, label = VARIANT_STYLES.get(name, (None, name))
        if name == "budget" and budget is not None:
            label += f" {budget:g} ms"
        ax1.plot(ms, [v / 100 for v in q], color=color, lw=1.3, label=label)
        tail = [(t, 1 - v / 100) for t, v in zip(ms, q) if v < 100]
        ax2.plot([t for t, _ in tail], [s for _, s in tail], color=color, lw=1.3, label=label)
        hi = max(hi, ms[q.index(99.9)] if 99.9 in q else ms[-1])
    for ax in (ax1, ax2):
        if budget is not None:
            ax.axvline(budget, color="tab:brown", lw=1.0, ls="--", label=f"budget {budget:g} ms")
        ax.set_xlabel("wall time per call, batch 1 (ms)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_xlim(0, 1.05 * max(hi, budget or 0.0))
    ax1.set_ylabel("fraction of calls <= t")
    ax1.set_title("CDF (to the p99.9)", fontsize=9)
    ax2.set_yscale("log")
    n = int(meas.get("n") or 0)
    ax2.set_ylim(max(1e-4, 1.0 / n) if n else 1e-4, 1.0)  # below 1/n it is interpolation
    ax2.axhline(0.01, color="0.5", lw=0.8, ls=":", label="1% of calls")
    ax2.set_ylabel("fraction of calls > t")
    ax2.set_title("tail (log scale)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle((title or "latency CDF") + f" - MEASURED, {meas.get('n')} images per variant, "
                 "interleaved", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
