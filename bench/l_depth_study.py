"""L_depth and exit-distillation study: arms x seeds, same training budget, paired comparisons.

Reproduce (18 trainings of 2 epochs; about 75 min on 2 cores with AVX-512-BF16):
    .venv/bin/python bench/l_depth_study.py --epochs 2 --seeds 0 1 2 --out runs/l_depth_study

Arms (everything else is the default recipe, label smoothing 0.1 on every arm; "lambda" is the
recipe before this study, "final-distill" the recipe after it):
  none              no L_depth at all
  no-cost           L_depth's stopping-weighted cross-entropy, lambda = 0 (the cost removed)
  lambda            lambda = 0.5 (the default recipe)
  final-distill     lambda = 0.5, every exit distilled from the super-net's final exit
  final+base-depth  as final-distill, and L_depth on the base-net as well
  final-no-ldepth   every exit distilled from the super-net's final exit, no L_depth

Per trained model, with the exit-head norms re-estimated per stage variant (what a build ships):
  * accuracy of every exit, super-net (FF..F) and base-net (TT..T), on the test set;
  * AUROC of each exit's max-probability for "this exit is right" (test);
  * the calibrated router (export/routing_fit.py, the build's rule) with MACs as the cost: fitted
    and certified on the validation split for a drop of at most 0.5 (and 1.0) points below FF..F,
    its held-out validation cost, and its test accuracy and cost. Cost = MACs fraction of FF..F.
Paired differences against ``none`` and ``lambda`` (same seed), mean and 95% t-interval over seeds.
Every run's result is cached in ``<out>/<arm>/seed<s>/study.json``: rerunning continues.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

ARMS: dict[str, dict] = {
    "none": {"depth_loss": False, "distill_from": "same-exit"},
    "no-cost": {"depth_lambda": 0.0, "distill_from": "same-exit"},
    "lambda": {"depth_lambda": 0.5, "distill_from": "same-exit"},
    "final-distill": {"depth_lambda": 0.5, "distill_from": "final"},
    "final+base-depth": {"depth_lambda": 0.5, "distill_from": "final", "depth_on": "super+base"},
    "final-no-ldepth": {"depth_loss": False, "distill_from": "final"},
}
DROPS = (0.5, 1.0)
#: two-sided 95% t quantiles by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for ``positive`` (ties count one half)."""
    pos = np.asarray(positive, bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = np.asarray(score)[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def mac_span_cost(model, img_size: int):
    """``cost(first, last, variant)`` in fractions of FF..F's MACs (heads of the span's last exit)."""
    from train.models.macs import piece_macs

    p = piece_macs(model, img_size)
    S = model.num_stages
    full = p["stem"] + sum(p["mandatory"]) + sum(p["skippable"]) + p["head"][-1]

    def cost(first: int, last: int, variant: str) -> float:
        macs = p["stem"] if first == 0 else 0
        for k, letter in zip(range(first, last + 1), variant):
            macs += p["mandatory_skipping"][k] if letter == "T" else p["mandatory"][k] + p["skippable"][k]
        return float(macs + p["head"][last]) / full
    del S
    return cost


def frontier(val, test, cost, seed: int) -> list[dict]:
    """The calibrated accuracy-vs-cost frontier: per price of compute ``lam``, the router
    policy over every exit fitted on the validation split and scored on the test split
    (``test_cost``, ``test_accuracy``), and fitted on one half of the validation split, scored
    on the other, both ways (``val_cost``, ``val_accuracy``)."""
    from export.routing_fit import DEFAULT_LAMS, fit_policy, simulate

    S = val.S
    perm = np.random.default_rng(seed).permutation(val.N)
    halves = (np.sort(perm[: val.N // 2]), np.sort(perm[val.N // 2:]))
    rows = []
    for lam in DEFAULT_LAMS[::3]:
        pol = fit_policy(val, cost, list(range(S)), lam, np.arange(val.N))
        t = simulate(pol, test, cost, np.arange(test.N))
        corr, lat = [], []
        for a, b in (halves, halves[::-1]):
            v = simulate(fit_policy(val, cost, list(range(S)), lam, a), val, cost, b)
            corr.append(v.correct)
            lat.append(v.latency_ms)
        rows.append({"lam": float(lam), "test_cost": t.mean_latency_ms, "test_accuracy": t.accuracy,
                     "val_cost": float(np.concatenate(lat).mean()),
                     "val_accuracy": float(np.concatenate(corr).mean())})
    return rows


def accuracy_at(rows: list[dict], budget: float, split: str = "test") -> float:
    """The best accuracy among frontier points whose mean cost is at most ``budget``."""
    ok = [r[f"{split}_accuracy"] for r in rows if r[f"{split}_cost"] <= budget]
    return max(ok) if ok else float("nan")


def load_trained(run_dir: Path):
    """The trained model of a run directory (``model.pt``) and its dataset."""
    from train.checkpoint import model_from_checkpoint
    from train.data import load_dataset

    model, state = model_from_checkpoint(run_dir / "model.pt")
    cfg = state["config"]
    data = load_dataset(cfg["data"], cfg["data_root"], val_fraction=cfg["val_fraction"],
                        split_seed=cfg["split_seed"], img_size=cfg["img_size"])
    return model.eval(), data


def evaluate_run(model, data, seed: int) -> dict:
    """The study's measurements of one trained model (see the module docstring)."""
    import torch

    from export.routing_fit import RoutingData, fit_router, simulate
    from train.evaluate import exit_probabilities_by_config
    from train.exit_norms import recalibrate_exit_norms, supports_exit_norm_twins
    from train.models.base import all_skip_configs, skip_to_str

    torch.set_num_threads(2)
    if supports_exit_norm_twins(model):
        idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))[:4000]
        images, _ = data.train.get_batch(idx.sort().values)
        model = recalibrate_exit_norms(model.eval(), images, data.mean, data.std)
    S = model.num_stages
    configs = all_skip_configs(S)
    out: dict = {}
    probs_split = {}
    for split, ds in (("val", data.val), ("test", data.test)):
        probs, labels = exit_probabilities_by_config(model, ds, data.mean, data.std, configs)
        probs_split[split] = ({skip_to_str(c): p for c, p in probs.items()}, labels)
    probs, labels = probs_split["test"]
    for name, cfg in (("super", "F" * S), ("base", "T" * S)):
        p = probs[cfg]
        correct = p.argmax(axis=2) == labels[None]
        out[f"acc_{name}"] = [float(c.mean()) for c in correct]
        out[f"auroc_{name}"] = [auroc(p[k].max(axis=1), correct[k]) for k in range(S)]
    cost = mac_span_cost(model, data.img_size)
    test_data = RoutingData(probs, labels)
    val_probs, val_labels = probs_split["val"]
    out["frontier"] = frontier(RoutingData(val_probs, val_labels), test_data, cost, seed)
    for drop in DROPS:
        fit = fit_router(val_probs, val_labels, cost, max_drop=drop, exit_cost_ms=0.0, seed=seed)
        sim = simulate(fit.rule.policies[0], test_data, cost, np.arange(test_data.N))
        full = float(test_data.correct[test_data.full].mean())
        out[f"router@{drop:g}"] = {
            "exits": fit.exits, "lam": fit.lam,
            "val_heldout_cost": fit.heldout_latency_ms, "val_heldout_drop": fit.heldout_drop_points,
            "test_cost": sim.mean_latency_ms, "test_accuracy": sim.accuracy,
            "test_drop": 100 * (full - sim.accuracy),
            "test_exit_histogram": np.bincount(sim.exit, minlength=S).tolist()}
    return out


def run_one(arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train (or load the cached result of) one arm at one seed."""
    run_dir = Path(args.out) / arm / f"seed{seed}"
    cached = run_dir / "study.json"
    from runtime.atomic import atomic_write_json

    if cached.is_file():
        result = json.loads(cached.read_text())
        if "frontier" not in result:  # measured before the frontier was: re-evaluate the model
            model, data = load_trained(run_dir)
            result.update(evaluate_run(model, data, seed))
            atomic_write_json(cached, result)
        return result
    from train.config import TrainConfig
    from train.trainer import Trainer

    cfg = TrainConfig(epochs=args.epochs, seed=seed, out=str(run_dir), **ARMS[arm])
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    trainer.fit()
    train_s = time.perf_counter() - t0
    result = {"arm": arm, "seed": seed, "epochs": args.epochs, "train_seconds": train_s,
              **evaluate_run(trainer.eval_model(), trainer.data, seed)}
    atomic_write_json(cached, result)
    return result


def paired(results: dict, metric, arm: str, ref: str, seeds) -> tuple[float, float, list[float]]:
    """Mean and 95% t half-width of ``metric(arm) - metric(ref)`` over the seeds both have."""
    diffs = [metric(results[(arm, s)]) - metric(results[(ref, s)]) for s in seeds
             if (arm, s) in results and (ref, s) in results]
    if not diffs:
        return float("nan"), float("nan"), []
    m = float(np.mean(diffs))
    hw = T975.get(len(diffs) - 1, 1.96) * float(np.std(diffs, ddof=1)) / math.sqrt(len(diffs)) \
        if len(diffs) > 1 else float("nan")
    return m, hw, diffs


BUDGETS = (0.45, 0.55, 0.65)

METRICS = {
    "full depth FF..F acc (pt)": lambda r: 100 * r["acc_super"][-1],
    "base TT..T acc (pt)": lambda r: 100 * r["acc_base"][-1],
    "exit 0 super acc (pt)": lambda r: 100 * r["acc_super"][0],
    "exit 0 base acc (pt)": lambda r: 100 * r["acc_base"][0],
    "exit 1 super acc (pt)": lambda r: 100 * r["acc_super"][1],
    "exit 1 base acc (pt)": lambda r: 100 * r["acc_base"][1],
    "AUROC exit 0 base": lambda r: r["auroc_base"][0],
    "AUROC exit 1 base": lambda r: r["auroc_base"][1],
    "router@0.5 val cost (% MACs)": lambda r: 100 * r["router@0.5"]["val_heldout_cost"],
    "router@0.5 test cost (% MACs)": lambda r: 100 * r["router@0.5"]["test_cost"],
    "router@0.5 test drop (pt)": lambda r: r["router@0.5"]["test_drop"],
    "router@1 val cost (% MACs)": lambda r: 100 * r["router@1"]["val_heldout_cost"],
    "router@1 test cost (% MACs)": lambda r: 100 * r["router@1"]["test_cost"],
    **{f"val acc at ≤{100 * b:.0f}% MACs (pt)": (lambda r, b=b: 100 * accuracy_at(r["frontier"], b, "val"))
       for b in BUDGETS},
    **{f"test acc at ≤{100 * b:.0f}% MACs (pt)": (lambda r, b=b: 100 * accuracy_at(r["frontier"], b))
       for b in BUDGETS},
}


def report(results: dict, arms, seeds) -> str:
    """A markdown table per arm (mean over seeds) and the paired differences."""
    lines = ["| metric | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
    for name, f in METRICS.items():
        cells = []
        for arm in arms:
            vals = [f(results[(arm, s)]) for s in seeds if (arm, s) in results]
            cells.append(f"{np.mean(vals):.4g} ± {np.std(vals, ddof=1):.2g}" if len(vals) > 1
                         else (f"{vals[0]:.4g}" if vals else "-"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same seed), mean [95% t-interval] over seeds:", "",
              "| metric | comparison | difference | per seed |", "|---|---|---|---|"]
    wanted = [(a, "none") for a in arms if a != "none"] + [("lambda", "no-cost")] + \
             [(a, "lambda") for a in arms if a.startswith("final")] + \
             [("final-no-ldepth", "final-distill")]
    comparisons = [(a, b) for a, b in wanted if a in arms and b in arms]
    for name, f in METRICS.items():
        for arm, ref in comparisons:
            m, hw, diffs = paired(results, f, arm, ref, seeds)
            if diffs:
                lines.append(f"| {name} | {arm} − {ref} | {m:+.3g} [{m - hw:+.3g}, {m + hw:+.3g}] | "
                             + ", ".join(f"{d:+.3g}" for d in diffs) + " |")
    return "\n".join(lines)


def plot(results: dict, arms, seeds, path: Path) -> None:
    """The calibrated router frontier on the test split, and the base-net exits' AUROC, per arm
    (means over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for arm in arms:
        rs = [results[(arm, s)] for s in seeds if (arm, s) in results]
        if not rs:
            continue
        # mean over seeds of each price's (cost, accuracy), then the upper envelope
        pts = sorted(zip(np.mean([[100 * f["test_cost"] for f in r["frontier"]] for r in rs], axis=0),
                         np.mean([[100 * f["test_accuracy"] for f in r["frontier"]] for r in rs],
                                 axis=0)))
        env, best = [], -1.0
        for x, y in pts:
            if y > best:
                env.append((x, y))
                best = y
        axes[0].plot(*zip(*env), "o-", ms=3, label=f"{arm} ({len(rs)} seeds)")
        S = len(rs[0]["auroc_base"])
        axes[1].plot(range(S), [np.mean([r["auroc_base"][k] for r in rs]) for k in range(S)],
                     "o-", label=arm)
    axes[0].set(xlabel="test cost, % of FF..F MACs", ylabel="test accuracy (%)",
                title="router frontier (fitted on validation, scored on test)")
    axes[1].set(xlabel="exit", ylabel="AUROC (max prob -> correct)", title="base-net exits")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", default="runs/l_depth_study")
    ap.add_argument("--plot", default=None, help="PNG path (default <out>/l_depth_study.png)")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: report the runs already in --out")
    args = ap.parse_args()
    results = {}
    total = len(args.arms) * len(args.seeds)
    for i, (seed, arm) in enumerate((s, a) for s in args.seeds for a in args.arms):
        if args.report_only:
            cached = Path(args.out) / arm / f"seed{seed}" / "study.json"
            if cached.is_file():
                results[(arm, seed)] = json.loads(cached.read_text())
            continue
        print(f"[{i + 1}/{total}] arm {arm}, seed {seed}", flush=True)
        results[(arm, seed)] = run_one(arm, seed, args)
    table = report(results, args.arms, args.seeds)
    print(table)
    out = Path(args.out)
    (out / "study.md").write_text(table + "\n")
    plot(results, args.arms, args.seeds, Path(args.plot) if args.plot else out / "l_depth_study.png")


if __name__ == "__main__":
    main()
