"""Turn expected failures into one clear line and a non-zero exit (no traceback)."""
from __future__ import annotations

import click

# Failures a user can fix: bad arguments, missing files, corrupt bundles or checkpoints.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError,
                                                PermissionError, KeyError, LookupError)


def user_error_types() -> tuple[type[BaseException], ...]:
    types = list(USER_ERRORS)
    try:
        from runtime.errors import BundleError
        types.append(BundleError)
    except ImportError:  # pragma: no cover - runtime is part of this package
        pass
    return tuple(types)


class PipelineGroup(click.Group):
    """A click group whose commands report user errors as ``Error: <message>``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except user_error_types() as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            raise click.ClickException(str(message) or type(exc).__name__) from None
