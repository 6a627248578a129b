"""`pipeline train`: train an adaptive-depth model (single process, or DDP under torchrun)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import click


@click.command("train")
@click.option("--model", default=None, help="Registered model name (see `pipeline models`), an installed "
              "plugin, or your own 'package.module:factory' (imported: see docs/models.md). [resnet20_adn]")
@click.option("--model-kwargs", default=None, callback=lambda ctx, param, value: _json_object(value),
              help="JSON object of extra keyword arguments for the model's factory, e.g. '{\"width\": 32}'.")
@click.option("--data", default=None, help="fashion-mnist | mnist | cifar10 | cifar100 | imagefolder | "
              "mnist5k | digits | synthetic | PATH to an image folder. [fashion-mnist]")
@click.option("--data-root", default=None, help="Where the dataset files are.")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--lr", type=float, default=None)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default=None)
@click.option("--depth-lambda", type=click.FloatRange(min=0), default=None,
              help="Weight of L_depth (0 disables it).")
@click.option("--mixed-subnets", type=click.IntRange(min=0), default=None,
              help="Mixed skip configurations (some stages skipped) trained per step besides the "
                   "super-net and the base-net, drawn at random. [1 with self-distillation and "
                   "the whole model training, else 0]")
@click.option("--bf16/--no-bf16", default=None, help="bf16 autocast.")
@click.option("--ema/--no-ema", default=None, help="Keep an EMA of the weights (used for eval/export).")
@click.option("--seed", type=int, default=None)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after N steps (smoke runs).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads.")
@click.option("--out", default=None, help="Run directory. [runs/train]")
@click.option("--init-weights", default=None, type=click.Path(dir_okay=False),
              help="Start from these weights: a checkpoint or state dict of the same architecture, or "
                   "torchvision-format weights (ResNet-ADN / ViT-ADN).")
@click.option("--trainable", type=click.Choice(["all", "exits", "exits+last"]), default=None,
              help="What trains: everything, only the exit heads (backbone frozen, its norms in eval "
                   "mode), or the exit heads and the last stage. [all]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="TOML/YAML/JSON file with training options (CLI options override it).")
@click.option("--resume", is_flag=True, help="Continue exactly from OUT/checkpoint.pt.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Data-parallel processes on this machine (re-launches itself through torchrun).")
def train(nproc: int, resume: bool, config_file: str | None, **options) -> None:
    """Train an early-exit adaptive-depth network (ADN self-distillation, optional L_depth)."""
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch_with_torchrun(nproc)
        return
    from train.config import build_config
    from train.trainer import Trainer

    cfg = build_config(config_file, **options)
    summary = Trainer(cfg, log=click.echo).fit(resume=resume)
    if summary:
        _print_summary(summary, Path(cfg.out))


def _json_object(value: str | None) -> dict | None:
    if value is None:
        return None
    import json

    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise click.BadParameter("expected a JSON object, e.g. '{\"width\": 32}'")
    return data


def _relaunch_with_torchrun(nproc: int) -> None:
    """Run this same command under torchrun with ``nproc`` processes (gloo on CPU, nccl on GPU)."""
    args = [a for a in sys.argv[1:]]
    i = args.index("--nproc") if "--nproc" in args else -1
    if i >= 0:
        del args[i:i + 2]
    args = [a for a in args if not a.startswith("--nproc=")]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", "-m", "pipeline", *args]
    click.echo("launching: " + " ".join(cmd))
    result = subprocess.run(cmd)
    if result.returncode:
        raise click.ClickException(f"torchrun exited with status {result.returncode}")


def _print_summary(summary: dict, out: Path) -> None:
    click.echo(f"\nTest accuracy of every exit ({summary['model']} on {summary['data']}, "
               f"{summary['epochs']} epochs):")
    exits = len(next(iter(summary["test"].values()))["accuracy_per_exit"])
    click.echo(f"{'skip':<8}" + "".join(f"{'exit ' + str(k + 1):>9}" for k in range(exits))
               + f"{'MMACs':>9}")
    for skip, res in summary["test"].items():
        click.echo(f"{skip:<8}" + "".join(f"{100 * a:>8.2f}%" for a in res["accuracy_per_exit"])
                   + f"{summary['macs_per_exit'][skip][-1] / 1e6:>9.2f}")
    click.echo(f"full depth {100 * summary['full_depth_accuracy']:.2f}%, base-net "
               f"{100 * summary['base_accuracy']:.2f}%; checkpoint {out / 'model.pt'}, "
               f"metrics {out / 'metrics.jsonl'}, plot {out / 'exits.png'}")
