"""Errors of the build side's export and compile steps (user-fixable: one CLI line)."""
from __future__ import annotations

from runtime.errors import PipelineError


class ExportError(PipelineError, RuntimeError):
    """The export produced something unusable (a checker failure, a static batch axis...)."""


class CompileError(ExportError):
    """A backend failed to compile a piece."""
