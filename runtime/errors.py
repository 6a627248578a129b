"""Error hierarchy for bundles, manifests and bundle archives.

Every error names the file it concerns: ``str(err)`` always starts with ``"<file>: "``
and the file is also available as ``err.file``. ``err.reason`` is the message without
the file prefix.

    PipelineError(Exception)     an error a user caused and can fix: the CLI prints it as one line
    +-- ConfigError (also ValueError)  a config/profile/rule value is wrong; has .field
    +-- UsageError (also ValueError)   a bad argument or an output that already exists
    +-- LatencyTableError (also LookupError)  no latency table/entry for what was asked
    +-- FileError (also ValueError)    an image or calibration set that cannot be used
    +-- BundleError
    +-- ManifestError            manifest.json is unreadable / invalid; has .json_path
    |   +-- UnsafePathError      (also a BundleIntegrityError, see below)
    +-- BundleIntegrityError     an artifact is missing, truncated, altered or unsafe
    |   +-- UnsafePathError      a path escapes the bundle (absolute, "..", symlink)
    +-- ArchiveError             a .tar.gz is unreadable or has an unsafe member; has .member
    +-- ArtifactNotFoundError    no artifact for the requested (piece, backend, target)

``UnsafePathError`` derives from both ``ManifestError`` and ``BundleIntegrityError``: an
artifact path like ``../x`` or ``/etc/passwd`` is refused already when the manifest is
validated (so it is a ``ManifestError`` naming the JSON path), and the same condition
found later while resolving a path inside a bundle (an in-memory manifest that was never
validated, or a symlink that leads outside) is an integrity failure. Catch whichever
you mean; both catch it.

Stdlib only.
"""

from __future__ import annotations

import os

__all__ = [
    "PipelineError",
    "BundleError",
    "ManifestError",
    "BundleIntegrityError",
    "UnsafePathError",
    "ArchiveError",
    "ArtifactNotFoundError",
    "ConfigError",
    "UsageError",
    "LatencyTableError",
    "FileError",
]


def _name(file: object) -> str:
    if file is None:
        return "<unknown file>"
    try:
        return os.fspath(file)  # type: ignore[arg-type]
    except TypeError:
        return str(file)


class PipelineError(Exception):
    """Base of the errors a user causes and can fix (bad file, bad field, missing artifact).

    The ``pipeline`` command prints these as one ``Error: ...`` line; every other exception is
    a programming error and keeps its traceback. Other packages derive their domain errors
    from it (export's ``ExportError``, the data loaders' ``DataError``, ...).
    """


class BundleError(PipelineError):
    """Base class. ``str(err) == f"{err.file}: {err.reason}"``."""

    def __init__(self, file: object, reason: str):
        self.file: str = _name(file)
        self.reason: str = reason
        super().__init__(f"{self.file}: {reason}")

    def __reduce__(self):  # keep errors picklable (multiprocessing, pytest-xdist)
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


def _rebuild(cls, state, args):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ManifestError(BundleError):
    """The manifest is unreadable or invalid.

    ``json_path`` is the location inside the manifest, e.g. ``pieces[2].artifacts[0].sha256``
    (empty for file-level problems such as invalid JSON). The message reads
    ``manifest.json: pieces[2].artifacts[0].sha256: expected 64 hex chars ...``.
    """

    def __init__(self, file: object, json_path: str, reason: str):
        self.json_path: str = json_path
        BundleError.__init__(self, file, f"{json_path}: {reason}" if json_path else reason)
        self.reason = reason


class BundleIntegrityError(BundleError):
    """An artifact (or the manifest file) of a bundle directory is not what the manifest says.

    ``file`` is the full path of the offending file, ``relpath`` its path relative to the
    bundle root as written in the manifest (or ``None``), ``bundle`` the bundle root.
    """

    def __init__(self, file: object, reason: str, *, relpath: str | None = None,
                 bundle: object = None):
        self.relpath = relpath
        self.bundle = None if bundle is None else _name(bundle)
        BundleError.__init__(self, file, reason)


class UnsafePathError(ManifestError, BundleIntegrityError):
    """A path would escape the bundle directory (absolute, ``..``, symlink leading outside...)."""

    def __init__(self, file: object, reason: str, *, json_path: str = "",
                 relpath: str | None = None, bundle: object = None):
        self.json_path = json_path
        self.relpath = relpath
        self.bundle = None if bundle is None else _name(bundle)
        BundleError.__init__(self, file, f"{json_path}: {reason}" if json_path else reason)
        self.reason = reason


class ArchiveError(BundleError):
    """A bundle archive cannot be written or read safely. ``member`` names the tar member."""

    def __init__(self, file: object, reason: str, *, member: str | None = None):
        self.member = member
        BundleError.__init__(self, file, f"member {member!r}: {reason}" if member is not None
                             else reason)
        self.reason = reason


class ArtifactNotFoundError(BundleError):
    """The manifest has no artifact for the requested piece/backend/target."""


class ConfigError(PipelineError, ValueError):
    """A configuration value a user wrote is wrong: ``"<file>: <field>: <reason>"``.

    Raised for build/train config files, device profiles and rule parameters (through
    :class:`runtime.validate.Validator`). ``file``, ``field`` and ``reason`` are attributes.
    """

    def __init__(self, file: object, field: str, reason: str):
        self.file: str = _name(file)
        self.field = field
        self.reason = reason
        super().__init__(f"{self.file}: {field}: {reason}" if field else f"{self.file}: {reason}")

    def __reduce__(self):
        return (type(self), (self.file, self.field, self.reason))


class UsageError(PipelineError, ValueError):
    """A request the user can fix: a bad argument, an output that already exists, a value out
    of range. The message says what to change."""


class LatencyTableError(PipelineError, LookupError):
    """The bundle has no latency table (or entry) for what was asked: device, backend, target,
    batch or skip configuration. ``pipeline profile`` (measured) or ``--estimate-only`` fills it."""


class FileError(PipelineError, ValueError):
    """A file a user gave cannot be used (an image, a calibration set): ``"<file>: <reason>"``;
    ``file`` and ``reason`` are attributes."""

    def __init__(self, file: object, reason: str):
        self.file: str = _name(file)
        self.reason = reason
        super().__init__(f"{self.file}: {reason}")

    def __reduce__(self):
        return (type(self), (self.file, self.reason))
