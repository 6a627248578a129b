"""Fidelity of the skippable sub-paths: relative residual increment ||F(h)|| / ||h|| per block.

The ADN design assumes that the blocks of a stage's skippable sub-path only *refine* features: their
residual branch adds little to what arrives on the identity path. This measures it. For every
residual block of every stage (ResNet-ADN: ``BasicBlock`` / ``Bottleneck``) and every test image, in
eval mode, through the super-net (nothing skipped, config FF..F):

    ratio = ||F(h)||_2 / ||h||_2        (norms over C, H, W of one image)

with ``F(h)`` the block's residual branch output (the output of its last norm, before the addition)
and ``h`` the tensor on its identity path that ``F(h)`` is added to: the block input, or the
projected shortcut ``downsample(x)`` in a block that changes shape (the strided first block of a
stage). Also recorded per block: ``ratio_out = ||y - h|| / ||h||`` with ``y`` the block output after
its ReLU (the definition ``model(x, return_increments=True)`` uses per skippable sub-path; the script
checks that the two agree for the sub-paths), and per stage the mean ratio of the mandatory and of
the skippable blocks and their quotient.

Reproduce (the numbers in docs/fidelity.md; a few seconds on 2 cores):

    .venv/bin/python bench/fidelity.py --checkpoint build/x86-host/train/model.pt --init \\
        --images 1000 --json runs/fidelity.json --plot docs/fidelity.png

``--init`` alone measures a freshly built model (seeded; resnet20_adn for Fashion-MNIST unless a
checkpoint gives the architecture). With the default ``zero_init_residual=True`` every block's last
norm starts at gamma = 0, so F(h) = 0 and every ratio is exactly 0 at initialisation; the init
reference is therefore built with ``zero_init_residual=False`` (Kaiming convs, BN gamma 1, BN in eval
mode with its initial running statistics) unless ``--init-zero-residual`` asks for the literal one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

MANDATORY, SKIPPABLE = "mandatory", "skippable"


def _per_image_norm(t: Tensor) -> Tensor:
    return t.detach().float().flatten(1).norm(dim=1)


def block_layout(model) -> list[dict[str, Any]]:
    """(stage, index, role, module) of every residual block, roles from the model's own split."""
    from train.models.resnet import ResNetADN

    if not isinstance(model, ResNetADN):
        raise TypeError(f"fidelity is measured for ResNet-ADN models, got {type(model).__name__}")
    layout = []
    for k in range(model.num_stages):
        n_mand, n_skip = model.splits[k]
        blocks = list(model.stage(k))
        if len(blocks) != n_mand + n_skip:
            raise ValueError(f"stage {k}: {len(blocks)} blocks but split {n_mand}+{n_skip}")
        for i, block in enumerate(blocks):
            layout.append({"stage": k, "block": i, "role": MANDATORY if i < n_mand else SKIPPABLE,
                           "downsample": block.downsample is not None, "module": block})
    return layout


@torch.no_grad()
def measure_increments(model, images: Tensor, batch_size: int = 250) -> dict[str, Any]:
    """Per block relative increments over ``images`` (normalised, NCHW) through the super-net.

    Returns ``{"blocks": [...], "stages": [...], "subpath_increments": [...]}``; every block entry
    has ``stage``, ``block``, ``role``, ``downsample``, ``ratios`` (per image, numpy),
    ``ratios_out`` (||y - h|| / ||h||), ``mean``, ``std``, ``mean_out``, ``std_out``; every stage
    entry the mean over its mandatory / skippable blocks and ``skippable_over_mandatory``.
    ``subpath_increments`` holds the model's own ``return_increments`` per stage (per image).
    """
    was_training = model.training
    model.eval()
    layout = block_layout(model)
    S = model.num_stages
    acc: list[dict[str, list[Tensor]]] = [{"r": [], "r_out": []} for _ in layout]
    subpath: list[list[Tensor]] = [[] for _ in range(S)]
    handles = []
    scratch: dict[int, dict[str, Tensor]] = {}

    def hooks(j: int, block):
        def on_branch(_m, _inp, out):          # output of the block's last norm = F(h)
            scratch.setdefault(j, {})["F"] = out.detach()

        def on_shortcut(_m, _inp, out):         # projected shortcut = h of a downsampling block
            scratch.setdefault(j, {})["h"] = out.detach()

        def on_block(_m, inp, out):
            s = scratch.pop(j, {})
            if "F" not in s:
                raise RuntimeError(f"block {j}: the last norm did not run")
            h = s.get("h", inp[0].detach())
            if h.shape != s["F"].shape:
                raise RuntimeError(f"block {j}: identity path {tuple(h.shape)} vs branch {tuple(s['F'].shape)}")
            h_norm = _per_image_norm(h).clamp_min(1e-12)
            acc[j]["r"].append(_per_image_norm(s["F"]) / h_norm)
            acc[j]["r_out"].append(_per_image_norm(out.detach().float() - h.float()) / h_norm)

        handles.append(block.last_norm().register_forward_hook(on_branch))
        if block.downsample is not None:
            handles.append(block.downsample.register_forward_hook(on_shortcut))
        handles.append(block.register_forward_hook(on_block))

    for j, entry in enumerate(layout):
        hooks(j, entry["module"])
    try:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size]
            _, increments = model(x, skip=None, return_increments=True)
            for k, inc in enumerate(increments):
                if inc is not None:
                    subpath[k].append(inc.detach().float())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    blocks = []
    for entry, a in zip(layout, acc):
        r = torch.cat(a["r"]).numpy().astype(np.float64)
        r_out = torch.cat(a["r_out"]).numpy().astype(np.float64)
        blocks.append({k: v for k, v in entry.items() if k != "module"} | {
            "ratios": r, "ratios_out": r_out, "mean": float(r.mean()), "std": float(r.std()),
            "mean_out": float(r_out.mean()), "std_out": float(r_out.std())})
    stages = []
    for k in range(S):
        mine = [b for b in blocks if b["stage"] == k]
        mand = [b["mean"] for b in mine if b["role"] == MANDATORY]
        mand_plain = [b["mean"] for b in mine if b["role"] == MANDATORY and not b["downsample"]]
        skip = [b["mean"] for b in mine if b["role"] == SKIPPABLE]
        m, s = float(np.mean(mand)), float(np.mean(skip))
        stages.append({"stage": k, "n_mandatory": len(mand), "n_skippable": len(skip),
                       "mandatory_mean": m, "skippable_mean": s,
                       "mandatory_plain_mean": float(np.mean(mand_plain)) if mand_plain else None,
                       "skippable_over_mandatory": s / m if m > 0 else math.nan})
    sub = [torch.cat(v).numpy().astype(np.float64) if v else None for v in subpath]
    return {"blocks": blocks, "stages": stages, "subpath_increments": sub}


def to_json(result: dict[str, Any]) -> dict[str, Any]:
    """The measurement without the per-image arrays (mean/std kept)."""
    return {"blocks": [{k: v for k, v in b.items() if k not in ("ratios", "ratios_out")}
                       for b in result["blocks"]],
            "stages": [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()}
                       for s in result["stages"]],
            "subpath_increments": [None if v is None else {"mean": float(v.mean()), "std": float(v.std())}
                                   for v in result["subpath_increments"]]}


def format_table(label: str, result: dict[str, Any]) -> str:
    lines = [f"## {label}", "",
             "| stage | block | role | shortcut | mean ‖F(h)‖/‖h‖ | std | mean ‖y−h‖/‖h‖ |",
             "|---|---|---|---|---|---|---|"]
    for b in result["blocks"]:
        lines.append(f"| {b['stage']} | {b['block']} | {b['role']} | {'1x1 proj' if b['downsample'] else 'identity'} "
                     f"| {b['mean']:.4f} | {b['std']:.4f} | {b['mean_out']:.4f} |")
    lines += ["", "| stage | mandatory mean (n) | mandatory, identity shortcut only | skippable mean (n) "
                  "| skippable / mandatory |", "|---|---|---|---|---|"]
    for s in result["stages"]:
        plain = "-" if s["mandatory_plain_mean"] is None else f"{s['mandatory_plain_mean']:.4f}"
        lines.append(f"| {s['stage']} | {s['mandatory_mean']:.4f} ({s['n_mandatory']}) | {plain} "
                     f"| {s['skippable_mean']:.4f} ({s['n_skippable']}) | {s['skippable_over_mandatory']:.3f} |")
    return "\n".join(lines)


def summary_lines(label: str, result: dict[str, Any]) -> list[str]:
    return [f"{label} stage {s['stage']}: mandatory {s['mandatory_mean']:.4f} vs skippable "
            f"{s['skippable_mean']:.4f} -> skippable/mandatory {s['skippable_over_mandatory']:.3f}"
            for s in result["stages"]]


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {MANDATORY: "tab:blue", SKIPPABLE: "tab:orange"}
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), dpi=120, squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items()):
        blocks = res["blocks"]
        xs = np.arange(len(blocks))
        ax.bar(xs, [b["mean"] for b in blocks], yerr=[b["std"] for b in blocks], capsize=3,
               color=[colours[b["role"]] for b in blocks],
               hatch=None, edgecolor=["black" if b["downsample"] else "none" for b in blocks])
        ax.set_xticks(xs, [f"s{b['stage']}.b{b['block']}" + ("*" if b["downsample"] else "") for b in blocks],
                      rotation=45, fontsize=8)
        for k in range(1, max(b["stage"] for b in blocks) + 1):
            first = next(i for i, b in enumerate(blocks) if b["stage"] == k)
            ax.axvline(first - 0.5, color="grey", lw=0.8, ls=":")
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("||F(h)|| / ||h||  (mean ± std over images)")
        ax.grid(axis="y", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    axes[0][-1].legend(handles, list(colours), fontsize=8)
    fig.suptitle(title + "   (* = block with 1x1 projection shortcut)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a model.pt / checkpoint.pt written by pipeline train")
    ap.add_argument("--init", action="store_true", help="also (or only) measure the model at initialisation")
    ap.add_argument("--init-zero-residual", action="store_true",
                    help="keep zero_init_residual=True for the init model (every ratio is then 0)")
    ap.add_argument("--model", default="resnet20_adn", help="architecture for --init without --checkpoint")
    ap.add_argument("--data", default=None, help="dataset (default: the checkpoint's, else fashion-mnist)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--images", type=int, default=1000, help="first N test images (default 1000)")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0, help="seed of the --init model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--json", type=Path, help="write the measurement here")
    ap.add_argument("--plot", type=Path, help="write the PNG plot here")
    args = ap.parse_args(argv)
    if not args.checkpoint and not args.init:
        ap.error("give --checkpoint PATH, --init, or both")

    from train.checkpoint import model_from_checkpoint
    from train.data import load_dataset, normalize_batch
    from train.models import checkpoint_model_config, create_model

    torch.set_num_threads(args.threads)
    models: dict[str, Any] = {}
    state: dict[str, Any] = {}
    if args.checkpoint:
        model, state = model_from_checkpoint(args.checkpoint)
        models["trained"] = model.float().eval()
    cfg = state.get("config") or {}
    info = state.get("dataset") or {}
    data = load_dataset(args.data or info.get("name") or cfg.get("data") or "fashion-mnist",
                        args.data_root or cfg.get("data_root"), img_size=cfg.get("img_size"))
    mean, std = (info["mean"], info["std"]) if "mean" in info else (data.mean, data.std)
    if args.init:
        if state:
            name = state["model_name"]
            kwargs = checkpoint_model_config(name, state["model_config"])
        else:
            name, kwargs = args.model, {"num_classes": data.num_classes, "in_chans": data.in_chans,
                                        "img_size": data.img_size}
        kwargs["zero_init_residual"] = bool(args.init_zero_residual)
        torch.manual_seed(args.seed)
        models["init"] = create_model(name, **kwargs).float().eval()
        init_note = f"init (seed {args.seed}, zero_init_residual={kwargs['zero_init_residual']})"
    n = min(args.images, len(data.test))
    images, _ = data.test.get_batch(torch.arange(n))
    x = normalize_batch(images, mean, std)

    results, out = {}, {"images": n, "split": "test", "data": data.name, "skip": "F" * next(
        iter(models.values())).num_stages, "metric": "||F(h)||_2 / ||h||_2 per image, norms over C,H,W",
        "checkpoint": args.checkpoint, "models": {}}
    labels = {}
    for key, model in models.items():
        res = measure_increments(model, x, args.batch_size)
        label = f"trained ({Path(args.checkpoint).name}, epoch {state.get('epoch')})" if key == "trained" \
            else init_note
        labels[key] = label
        results[label] = res
        print(format_table(label, res))
        print()
        for line in summary_lines(key, res):
            print(line)
        for s, sub in zip(res["stages"], res["subpath_increments"]):
            skip_blocks = [b for b in res["blocks"] if b["stage"] == s["stage"] and b["role"] == SKIPPABLE]
            if sub is not None and len(skip_blocks) == 1:
                diff = float(np.abs(sub - skip_blocks[0]["ratios_out"]).max())
                if diff > 1e-4:
                    raise RuntimeError(f"stage {s['stage']}: return_increments and the hooks disagree by {diff:.3g}")
        print()
        out["models"][key] = {"label": label, **to_json(res)}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, f"{next(iter(models.values())).model_name} on {data.name}, {n} test images, "
                                  "eval mode, super-net")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
