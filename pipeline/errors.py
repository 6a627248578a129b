"""How the `pipeline` command reports failures (docs/errors.md).

A *user error* -- something the user caused and can fix: a wrong config value, a missing file,
an unknown device, a corrupt bundle -- is printed as one ``Error: <message>`` line on stderr
with exit status 1 (click's own usage errors: exit 2). Everything else is a programming error
and keeps its traceback: a bare ``KeyError('cfg')`` from a bug must not read as
``Error: 'cfg'``.

User errors are:

* :class:`runtime.errors.PipelineError` and its subclasses (ConfigError, BundleError and its
  family, the data loaders' DataError, the checkpoint's CheckpointError, ProfileError, ...);
* the OSErrors that mean a path the user gave is wrong: FileNotFoundError, NotADirectoryError,
  IsADirectoryError, PermissionError;
* a third-party module that is not installed (``train`` on a device's base install): one line
  naming the module and the ``build`` extra.

A plain ValueError, KeyError or LookupError is a bug.

``pipeline --debug ...`` (or ``PIPELINE_DEBUG=1``) shows the traceback of every error,
user errors included.
"""
from __future__ import annotations

import os
from typing import Optional

import click

__all__ = ["PipelineGroup", "PATH_ERRORS", "DEBUG_ENV", "debug_enabled", "is_user_error",
           "missing_dependency", "set_debug"]

#: Environment variable that turns on tracebacks for every error (like ``--debug``).
DEBUG_ENV = "PIPELINE_DEBUG"
_DEBUG_KEY = "pipeline.debug"

#: OSErrors that mean a path the user gave is wrong (not e.g. a full disk or a broken pipe).
PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, NotADirectoryError,
                                          IsADirectoryError, PermissionError)

def set_debug(ctx: click.Context, on: bool = True) -> None:
    """Show tracebacks for every error raised under ``ctx`` (the ``--debug`` switch)."""
    ctx.meta[_DEBUG_KEY] = on


def debug_enabled(ctx: Optional[click.Context] = None) -> bool:
    """``--debug`` was given (on ``ctx``'s command tree) or ``PIPELINE_DEBUG`` is set (not 0)."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off"):
        return True
    return bool(ctx is not None and ctx.meta.get(_DEBUG_KEY))


def is_user_error(exc: BaseException) -> bool:
    """True if ``exc`` is an error the user caused and can fix (see the module docstring)."""
    from runtime.errors import PipelineError

    return isinstance(exc, (PipelineError, *PATH_ERRORS))


_OWN_PACKAGES = ("runtime", "devices", "export", "train", "pipeline")


def missing_dependency(exc: BaseException) -> Optional[str]:
    """The one-line message for a third-party module that is not installed (a device install
    without the build extra running a build-side command), else None."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    if exc.name.split(".")[0] in _OWN_PACKAGES:
        return None  # part of this project: a broken install or a bug, keep the traceback
    return (f"{exc}: this command needs the build side of the project: "
            "pip install 'adaptive-depth-pipeline[build]'")


class PipelineGroup(click.Group):
    """A click group whose commands report user errors as one ``Error: <message>`` line and let
    every other exception (a bug) through with its traceback; ``--debug`` shows all tracebacks."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if debug_enabled(ctx):
                raise
            missing = missing_dependency(exc)
            if missing is not None:
                raise click.ClickException(missing) from None
            if not is_user_error(exc):
                raise
            message = str(exc) or type(exc).__name__
            raise click.ClickException(message) from None
