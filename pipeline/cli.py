"""The `pipeline` command: train, export, compile, profile, calibrate, run, build."""
from __future__ import annotations

import click

from pipeline.build_cmd import build
from pipeline.device_cmd import benchmark_cmd, doctor_cmd, inspect_cmd
from pipeline.devices_cli import devices
from pipeline.errors import DEBUG_ENV, PipelineGroup, set_debug
from pipeline.export_cmd import compile_cmd, engines_cmd, export_cmd
from pipeline.models_cmd import models
from pipeline.profile_cmd import profile
from pipeline.runtime_cmd import calibrate_cmd, predict_cmd, run_cmd
from pipeline.train_cmd import train


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptive-depth-pipeline")
@click.option("--debug", is_flag=True,
              help=f"Show the traceback of every error, user errors included (or {DEBUG_ENV}=1).")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """One network, many depths, every device.

    Train early-exit adaptive-depth networks, cut them into exit segments, compile each for a
    device profile, and run them with a deadline-aware stopping rule.
    """
    if debug:
        set_debug(ctx)


cli.add_command(train)
cli.add_command(models)
cli.add_command(export_cmd)
cli.add_command(compile_cmd)
cli.add_command(engines_cmd)
cli.add_command(profile)
cli.add_command(devices)
cli.add_command(predict_cmd)
cli.add_command(run_cmd)
cli.add_command(calibrate_cmd)
cli.add_command(benchmark_cmd)
cli.add_command(inspect_cmd)
cli.add_command(doctor_cmd)
cli.add_command(build)


def main() -> None:
    cli(prog_name="pipeline")
