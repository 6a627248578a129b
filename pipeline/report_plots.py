"""PNG plots of a build report (matplotlib Agg canvas, no pyplot state; written atomically).

* :func:`plot_tradeoff` - accuracy against mean latency (measured latency table of this host) and
  against the MACs fraction, for the adaptive model across rules and targets, under budgets, the
  deployed rule, every static sub-network, the monolithic session, and the measured headline
  points. One can see whether the adaptive curves dominate the static sub-networks.
* :func:`plot_exit_histogram` - where the samples leave: measured runs (adaptive, budget) and,
  for a device not at hand, the shipped rule on the device's (estimated) costs.
* the latency per exit comes from :func:`devices.plots.plot_latency`.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_tradeoff", "plot_exit_histogram", "RULE_STYLES"]

RULE_STYLES = {"max_prob": ("tab:blue", "o"), "entropy": ("tab:orange", "s"),
               "patience": ("tab:green", "^"), "lookahead": ("tab:red", "v")}


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
                  ratio: float = 0.6) -> Path:
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
