"""`pipeline build`: train -> export -> compile -> profile -> calibrate -> package -> evaluate ->
report for one device profile, with cached stages (docs/build.md).

    pipeline build --device jetson                       # everything, default recipe
    pipeline build --device jetson --checkpoint runs/x/model.pt
    pipeline build --config recipe.toml --dry-run        # the plan: what is reused / rebuilt
    pipeline build --device host --force                 # rebuild every stage
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click

__all__ = ["build"]


def _split_backends(values: tuple[str, ...]) -> Optional[list[str]]:
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    if not out:
        return None
    if out == ["auto"]:
        return "auto"  # type: ignore[return-value]
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _stage_table(result) -> list[str]:
    if result.dry_run:
        rows = [f"{'stage':<10} {'action':<9} why"]
        for r in result.stages:
            why = r.why
            if r.status == "reuse" and r.built_seconds is not None:
                why += f" (built in {r.built_seconds:.1f} s)"
            rows.append(f"{r.name:<10} {r.status:<9} {why}")
        return rows
    rows = [f"{'stage':<10} {'status':<9} {'seconds':>8}  note"]
    for r in result.stages:
        note = r.why
        if r.status in ("reused", "reuse") and r.built_seconds is not None:
            note = f"built earlier in {r.built_seconds:.1f} s"
        rows.append(f"{r.name:<10} {r.status:<9} {r.seconds:8.1f}  {note}")
    return rows


@click.command("build")
@click.option("--device", "-d", default=None,
              help="Device profile: name, alias or .toml path (see `pipeline devices`); "
                   "several, comma-separated, share one training (jetson,raspberry-pi-5,host). "
                   "[x86-host, or the config file's]")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Build config (TOML/YAML/JSON): [build], [train] (any TrainConfig "
                                 "field), [export], [profile], [calibrate], [evaluate], [acceptance].")
@click.option("--checkpoint", "-c", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Skip training: build from this checkpoint (model.pt).")
@click.option("--out", "-o", default=None, help="Output root; the build writes OUT/<device>/. [build]")
@click.option("--backends", multiple=True, metavar="B[,B...]",
              help="Backends to compile (onnxruntime, tvm, tensorrt; comma-separated or repeated). "
                   "Default 'auto': the profile's backends that compile here, without untuned TVM.")
@click.option("--model", default=None, help="Model to train (train.model).")
@click.option("--data", default=None, help="Data set (train.data).")
@click.option("--data-root", default=None, help="Where the data set lives (train.data_root).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Training epochs.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None,
              help="Stop training after N steps (smoke builds).")
@click.option("--rule", default=None, help="Stopping rule to calibrate (calibrate.rule).")
@click.option("--max-drop", type=click.FloatRange(min=0, max=100), default=None,
              help="Allowed validation accuracy drop vs full depth, in points. [0.5]")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N test images only (smoke builds).")
@click.option("--threads", type=click.IntRange(min=0), default=None,
              help="ONNX Runtime intra-op threads of the bundle measured on this machine "
                   "(0: the profile's, all usable cores). [1]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "int8"]), default=None,
              help="Piece precision: int8 quantizes each piece (static QDQ) and keeps it where it "
                   "measures faster and agrees with fp32; auto: the device profile's. [auto]")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages reused / rebuilt) and exit; "
                                              "writes nothing.")
@click.option("--force", is_flag=True, help="Rebuild every stage.")
def build(device: Optional[str], config_file: Optional[Path], checkpoint: Optional[Path],
          out: Optional[str], backends: tuple[str, ...], model: Optional[str], data: Optional[str],
          data_root: Optional[str], epochs: Optional[int], max_steps: Optional[int],
          rule: Optional[str], max_drop: Optional[float], eval_limit: Optional[int],
          threads: Optional[int], precision: Optional[str], dry_run: bool,
          force: bool) -> None:
    """Train, export, compile, calibrate, profile and evaluate for a device; write
    OUT/<device>/ with the bundle, report.md, report.json and plots. Stages whose inputs are
    unchanged are reused, and the builds of several devices share one training."""
    from pipeline.build_config import build_config

    devices = [d.strip() for d in device.split(",") if d.strip()] if device else [None]
    for i, dev in enumerate(devices):
        if len(devices) > 1:
            click.echo(f"\n=== device {i + 1} of {len(devices)}: {dev} ===")
        overrides = {
            "build.device": dev, "build.checkpoint": str(checkpoint) if checkpoint else None,
            "build.out": out, "build.backends": _split_backends(backends), "build.threads": threads,
            "build.precision": precision,
            "train.model": model, "train.data": data, "train.data_root": data_root,
            "train.epochs": epochs, "train.max_steps": max_steps, "calibrate.rule": rule,
            "calibrate.max_drop": max_drop, "evaluate.limit": eval_limit,
        }
        _build_one(build_config(config_file, overrides), force=force, dry_run=dry_run)


def _build_one(cfg, *, force: bool, dry_run: bool) -> None:
    """Run one device's build and print its stages, summary and the steps left on the device."""
    from export.onnx_export import ExportError
    from pipeline.build import BuildError, run_build
    from pipeline.report import summary_lines

    try:
        result = run_build(cfg, force=force, dry_run=dry_run, log=click.echo)
    except (BuildError, ExportError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    if dry_run:
        click.echo(f"\nplan for {result.root}:")
        for line in _stage_table(result):
            click.echo("  " + line)
        click.echo("nothing written (--dry-run)")
        return
    click.echo(f"\nbuild {result.root} done in {result.seconds:.1f} s")
    for line in _stage_table(result):
        click.echo("  " + line)
    if result.report:
        click.echo("")
        for line in summary_lines(result.report):
            click.echo(line)
        steps = result.report.get("finish_on_device") or []
        if steps:
            click.echo(f"\nto finish on the device ({result.device}):")
            for line in steps:
                click.echo("  " + line)
        click.echo(f"\nreport: {result.root / 'report.md'} (and report.json, plots/); "
                   f"bundle: {result.root / 'bundle'}")
