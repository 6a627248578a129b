"""The `pipeline` command: train, export, compile, profile, calibrate, run, build."""
from __future__ import annotations

import click

from pipeline.errors import PipelineGroup
from pipeline.export_cmd import compile_cmd, engines_cmd, export_cmd
from pipeline.models_cmd import models
from pipeline.train_cmd import train


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptive-depth-pipeline")
def cli() -> None:
    """One network, many depths, every device.

    Train early-exit adaptive-depth networks, cut them into exit segments, compile each for a
    device profile, and run them with a deadline-aware stopping rule.
    """


cli.add_command(train)
cli.add_command(models)
cli.add_command(export_cmd)
cli.add_command(compile_cmd)
cli.add_command(engines_cmd)


def _add_optional_commands() -> None:
    try:
        from pipeline.devices_cli import devices
    except ImportError:  # pragma: no cover - until the devices commands exist
        return
    cli.add_command(devices)


_add_optional_commands()


def main() -> None:
    cli(prog_name="pipeline")
