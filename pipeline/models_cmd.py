"""`pipeline models`: the registered models and their cost per skip config and exit."""
from __future__ import annotations

import json

import click

from pipeline.errors import PipelineGroup


@click.group("models", cls=PipelineGroup, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List registered adaptive-depth models and installed plugin models (entry-point group
    adaptive_depth_pipeline.models). A model of your own needs no registration: pass
    'package.module:factory' wherever a model name goes (see docs/models.md)."""
    if ctx.invoked_subcommand is not None:
        return
    from train.models import list_models

    infos = list_models()
    if as_json:
        click.echo(json.dumps([{"name": m.name, "family": m.family, "stages": m.num_stages,
                                "default_img_size": m.default_img_size,
                                "description": m.description} for m in infos], indent=2))
        return
    click.echo(f"{'name':<16} {'family':<14} {'stages':>6} {'input':>6}  description")
    for m in infos:
        click.echo(f"{m.name:<16} {m.family:<14} {m.num_stages:>6} {m.default_img_size:>6}  {m.description}")


@models.command("show")
@click.argument("name")
@click.option("--input-size", type=click.IntRange(min=8), default=None,
              help="Square input size in pixels (default: the model's).")
@click.option("--in-chans", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(name: str, input_size: int | None, in_chans: int, num_classes: int, as_json: bool) -> None:
    """Parameters and MACs per skip config and per exit of model NAME (a registered or plugin
    name, or 'package.module:factory', which imports that module)."""
    from train.models import model_summary

    summary = model_summary(name, input_size=input_size, in_chans=in_chans, num_classes=num_classes)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    shape = "x".join(str(d) for d in summary["input_size"])
    click.echo(f"{summary['name']}: {summary['params'] / 1e6:.3f} M params, {summary['stages']} stages, "
               f"input {shape} (CxHxW), {num_classes} classes")
    exits = len(summary["skip_configs"][0]["macs_per_exit"])
    click.echo("MMACs to reach each exit (T = that stage's skippable sub-path skipped):")
    click.echo(f"{'skip':<8}" + "".join(f"{'exit ' + str(k + 1):>12}" for k in range(exits)))
    for entry in summary["skip_configs"]:
        label = "".join("T" if s else "F" for s in entry["skip"])
        click.echo(f"{label:<8}" + "".join(f"{m / 1e6:>12.2f}" for m in entry["macs_per_exit"]))
