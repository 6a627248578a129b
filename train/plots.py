"""PNG plots of training results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_exit_accuracy(summary: dict[str, Any], path: str | Path) -> Path:
    """Test accuracy against cumulative GMACs, one line per skip config, a point per exit."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for skip, res in summary["test"].items():
        macs = [m / 1e6 for m in summary["macs_per_exit"][skip]]
        acc = [100 * a for a in res["accuracy_per_exit"]]
        ax.plot(macs, acc, marker="o", label=skip, linewidth=2 if set(skip) == {"F"} else 1)
    ax.set_xlabel("MMACs to reach the exit (batch 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary['model']} on {summary['data']}: every exit of every skip config")
    ax.grid(alpha=0.3)
    ax.legend(title="skip", fontsize=8, ncol=2)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
