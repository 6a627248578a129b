"""L_depth ablation: the same recipe trained with lambda = 0 and lambda > 0, side by side.

Reproduce (about 2 x epochs x 1.5 min on 2 cores):
    .venv/bin/python bench/l_depth_ablation.py --epochs 2 --lam 0.5 --out runs/l_depth

Reports, on the Fashion-MNIST test set, full-depth accuracy and the early-exit outcome (mean exit
depth, accuracy, realised MACs fraction) at fixed confidence thresholds, and plots accuracy
against mean MACs for a sweep of thresholds (PNG).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from export.simulate import max_prob_exits, outcome_at_exits
from train.config import TrainConfig
from train.evaluate import exit_probabilities
from train.models.macs import macs_per_exit, piece_macs
from train.trainer import Trainer

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.999)


def train_variant(args: argparse.Namespace, lam: float) -> dict:
    cfg = TrainConfig(model=args.model, data=args.data, epochs=args.epochs, seed=args.seed,
                      depth_lambda=lam, depth_halting=args.halting, out=str(Path(args.out) / f"lam{lam:g}"))
    trainer = Trainer(cfg)
    summary = trainer.fit()
    model, data = trainer.eval_model(), trainer.data
    S = model.num_stages
    probs, labels = exit_probabilities(model, data.test, data.mean, data.std, (False,) * S)
    pieces = piece_macs(model, data.img_size)
    # Cost of stopping at exit k: the trunk to k plus every head evaluated on the way.
    trunk = macs_per_exit(model, (False,) * S, pieces=pieces)
    heads = np.cumsum(pieces["head"])
    cost = [trunk[k] - pieces["head"][k] + heads[k] for k in range(S)]
    sweep = []
    for t in THRESHOLDS:
        exits = max_prob_exits(probs, t)
        out = outcome_at_exits(probs, labels, exits)
        out["threshold"] = t
        out["macs_fraction"] = float(np.mean([cost[e] for e in exits]) / trunk[-1])
        sweep.append(out)
    return {"lambda": lam, "full_depth_accuracy": summary["full_depth_accuracy"],
            "base_accuracy": summary["base_accuracy"],
            "accuracy_per_exit": summary["test"]["F" * S]["accuracy_per_exit"], "sweep": sweep}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    for r in results:
        xs = [s["macs_fraction"] for s in r["sweep"]]
        ys = [100 * s["accuracy"] for s in r["sweep"]]
        ax.plot(xs, ys, marker="o", label=f"lambda = {r['lambda']:g}")
        ax.axhline(100 * r["full_depth_accuracy"], ls=":", lw=1, color=ax.lines[-1].get_color())
    ax.set_xlabel("MACs spent / full-depth MACs (max-prob threshold sweep)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("L_depth ablation: early-exit accuracy vs compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20_adn")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--halting", default="confidence", choices=["confidence", "learned"])
    ap.add_argument("--out", default="runs/l_depth")
    args = ap.parse_args()
    results = [train_variant(args, 0.0), train_variant(args, args.lam)]
    out = Path(args.out)
    (out / "l_depth_ablation.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "l_depth_ablation.png")
    print(f"\n{'lambda':>7} {'full acc':>9} {'base acc':>9} | " + " | ".join(
        f"t={t:<5} exit/acc/MACs" for t in (0.9, 0.99)))
    for r in results:
        cells = []
        for t in (0.9, 0.99):
            s = next(s for s in r["sweep"] if s["threshold"] == t)
            cells.append(f"{s['mean_exit']:.2f}/{100 * s['accuracy']:.2f}%/{s['macs_fraction']:.2f}")
        print(f"{r['lambda']:>7g} {100 * r['full_depth_accuracy']:>8.2f}% {100 * r['base_accuracy']:>8.2f}% | "
              + " | ".join(f"{c:>20}" for c in cells))
    print(f"\nwritten: {out / 'l_depth_ablation.json'}, {out / 'l_depth_ablation.png'}")


if __name__ == "__main__":
    main()
