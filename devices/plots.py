"""PNG plot of a bundle's latency tables: cumulative latency per exit, one line per skip config.

    from devices.plots import plot_latency, default_plot_path
    plot_latency(manifest, default_plot_path(bundle_dir))

One panel per (device, backend, batch) group, titled MEASURED or ESTIMATED (roofline) with
the device: x = exit, y = cumulative p50 in ms, the p50..p95 range as an error bar for
measured tables (an estimate is a single number, so it has none).

The default path is **next to** the bundle (``<parent>/<bundle-name>.latency.png``), not
inside it: the manifest does not list the plot, so inside the bundle it would be an
unverified file that ``pack_bundle`` ships along. Written atomically.

matplotlib is imported lazily inside :func:`plot_latency` (Agg canvas, no pyplot state), so
importing this module costs nothing on a device without matplotlib.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence

from runtime.atomic import atomic_write_bytes
from runtime.manifest import Manifest

__all__ = ["default_plot_path", "plot_latency"]

#: Use a log y axis when a panel's largest p95 exceeds its smallest p50 this many times.
LOG_SCALE_RATIO = 20.0


def default_plot_path(bundle_dir: os.PathLike | str) -> Path:
    """``<parent>/<bundle-name>.latency.png``: outside the bundle, so it stays verifiable."""
    root = Path(os.path.abspath(bundle_dir))
    return root.with_name(root.name + ".latency.png")


def plot_latency(manifest: Manifest, path: os.PathLike | str,
                 groups: Optional[Sequence[tuple[str, str, int]]] = None, *,
                 title: Optional[str] = None, dpi: int = 110) -> Path:
    """Write the PNG for ``groups`` ((device, backend, batch); default: every latency group
    of the manifest) to ``path`` atomically and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from devices.latency import cumulative_table, latency_groups

    if groups is None:
        groups = [(d, b, n) for d, b, n, _k in latency_groups(manifest)]
    groups = list(groups)
    if not groups:
        raise ValueError("the manifest has no latency table to plot")
    n = len(groups)
    ncols = 1 if n == 1 else 2
    nrows = (n + ncols - 1) // ncols
    configs = list(manifest.skip_configs)
    S = manifest.stages
    legend_w = 1.3 if len(configs) <= 16 else 2.4
    fig = Figure(figsize=(5.6 * ncols + legend_w, 4.0 * nrows + 0.4), dpi=dpi)
    FigureCanvasAgg(fig)
    width = 0.5 / max(1, len(configs))
    handles = []
    for i, (device, backend, batch) in enumerate(groups):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        kind = manifest.latency_kind(device, backend, batch)
        table = cumulative_table(manifest, device, backend, batch, stats=("p50", "p95"))
        targets = sorted({e.target for e in manifest.latency_group(device, backend, batch)})
        lo = min(r["p50"] for rows in table.values() for r in rows)
        hi = max(r["p95"] for rows in table.values() for r in rows)
        log = lo > 0 and hi / lo > LOG_SCALE_RATIO
        handles = []
        for j, cfg in enumerate(configs):
            xs = [k + (j - (len(configs) - 1) / 2) * width for k in range(S)]
            p50 = [r["p50"] for r in table[cfg]]
            if kind == "measured":
                up = [max(0.0, r["p95"] - r["p50"]) for r in table[cfg]]
                h = ax.errorbar(xs, p50, yerr=[[0.0] * S, up], marker="o", ms=3, lw=1.2,
                                capsize=2, elinewidth=0.8, label=cfg)
            else:
                (h,) = ax.plot(xs, p50, marker="o", ms=3, lw=1.2, ls="--", label=cfg)
            handles.append(h)
        label = ("MEASURED on" if kind == "measured" else "ESTIMATED (roofline) for")
        ax.set_title(f"{label} {device}\n{backend} ({', '.join(targets)}), batch {batch}"
                     + (": p50, bar to p95" if kind == "measured" else ""), fontsize=9)
        ax.set_xlabel("exit")
        ax.set_ylabel("cumulative latency to exit (ms" + (", log)" if log else ")"))
        ax.set_xticks(range(S))
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3, which="both" if log else "major")
    fig.legend(handles, configs, title="skip config", fontsize=7, title_fontsize=7,
               loc="center right", ncol=1 if len(configs) <= 16 else 2)
    fig.suptitle(title or f"{manifest.model.name}: cumulative latency per exit", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - legend_w / fig.get_figwidth(), 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())
