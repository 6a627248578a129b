"""Atomic file and directory writes (stdlib only).

* ``atomic_writer(path)``: context manager yielding a file object for a temp file in the
  *same directory* as ``path``; on normal exit it is flushed, fsync'ed and ``os.replace``d
  onto ``path`` (then the directory is fsync'ed). On any exception the temp file is removed
  and ``path`` is untouched: readers see either the complete old file or the complete new one.
* ``atomic_write_bytes / atomic_write_text / atomic_write_json``: one-shot wrappers.
* ``atomic_directory(final_path, overwrite=False)``: yields a fresh temp directory next to
  ``final_path``; fill it, and on normal exit it is fsync'ed and renamed into place. On any
  exception (including KeyboardInterrupt) the temp directory is removed and ``final_path``
  is untouched.

Permissions: new files/dirs get the usual ``0o666``/``0o777`` minus the process umask (not
the ``0o600`` of ``tempfile.mkstemp``); when replacing an existing file its permission bits
are kept. If ``path`` is a symlink, the link itself is replaced (not its target).

Limits (POSIX): replacing an existing *directory* (``overwrite=True``) is two renames
(old -> backup, temp -> final); a reader can observe ``final_path`` missing for that
instant, never half-written. If the second rename fails the old directory is restored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import IO, Any, Iterator

__all__ = [
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_directory",
    "fsync_dir",
]

_TMP_TAG = ".tmp-"


def fsync_dir(path: os.PathLike | str) -> None:
    """fsync a directory so that a rename inside it is durable (best effort off POSIX)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(final: Path) -> str:
    return f".{final.name}{_TMP_TAG}{secrets.token_hex(6)}"


def _create_tmp_file(final: Path) -> tuple[int, Path]:
    """Create an exclusive temp file next to ``final`` (mode 0o666 & ~umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | \
        getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = final.parent / _tmp_name(final)
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "could not create a unique temp file", str(final))


@contextlib.contextmanager
def atomic_writer(path: os.PathLike | str, mode: str = "wb", *, encoding: str | None = None,
                  newline: str | None = None, fsync: bool = True) -> Iterator[IO[Any]]:
    """Write ``path`` atomically through a file object: ``with atomic_writer(p) as f: ...``.

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to utf-8). The parent directory
    must exist. Nothing is visible at ``path`` until the block exits normally.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer: mode must be 'wb' or 'w', got {mode!r}")
    final = Path(path)
    try:
        old_mode = stat.S_IMODE(os.stat(final).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        old_mode = None
    fd, tmp = _create_tmp_file(final)
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        if old_mode is not None:
            os.chmod(tmp, old_mode)
        os.replace(tmp, final)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    if fsync:
        fsync_dir(final.parent)


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def atomic_write_bytes(path: os.PathLike | str, data: bytes, *, fsync: bool = True) -> Path:
    """Atomically replace ``path`` with ``data``. Returns ``Path(path)``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: expected bytes, got {type(data).__name__}")
    with atomic_writer(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: os.PathLike | str, text: str, *, encoding: str = "utf-8",
                      fsync: bool = True) -> Path:
    """Atomically replace ``path`` with ``text`` in ``encoding`` (no newline translation)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text: expected str, got {type(text).__name__}")
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(path: os.PathLike | str, obj: Any, *, indent: int | None = 2,
                      sort_keys: bool = False, fsync: bool = True) -> Path:
    """Atomically write ``obj`` as strict JSON (NaN/Infinity refused) + trailing newline.

    The object is fully serialised before anything touches the disk, so a serialisation
    error leaves ``path`` untouched.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, allow_nan=False,
                      ensure_ascii=False)
    return atomic_write_text(path, text + "\n", fsync=fsync)


def _fsync_tree(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                if stat.S_ISREG(os.lstat(p).st_mode):
                    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            except OSError:
                pass
        fsync_dir(dirpath)


def _remove_path(p: Path) -> None:
    """Remove a file, symlink or directory tree without following symlinks."""
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)
    else:
        _unlink_quiet(p)


@contextlib.contextmanager
def atomic_directory(final_path: os.PathLike | str, overwrite: bool = False, *,
                     fsync: bool = True) -> Iterator[Path]:
    """Build a directory atomically: ``with atomic_directory(dst) as tmp: <write into tmp>``.

    The temp directory is created next to ``final_path`` (same filesystem, so the final
    rename is atomic) as ``.<name>.tmp-<random>``. Missing parent directories are created.

    * ``final_path`` exists and ``overwrite`` is false: ``FileExistsError`` before anything
      is created.
    * the block raises: the temp directory is removed, ``final_path`` untouched, the
      exception propagates.
    * the block exits normally: the tree is fsync'ed and renamed to ``final_path``; an
      existing ``final_path`` (``overwrite=True``) is moved aside first and removed after.
    """
    final = Path(final_path)
    if final.name in ("", ".", ".."):
        raise ValueError(f"atomic_directory: invalid target {os.fspath(final_path)!r}")
    if not overwrite and os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "target already exists (overwrite=False)",
                              os.fspath(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    for _ in range(100):
        cand = final.parent / _tmp_name(final)
        try:
            os.mkdir(cand, 0o777)
        except FileExistsError:
            continue
        tmp = cand
        break
    if tmp is None:
        raise FileExistsError(errno.EEXIST, "could not create a unique temp directory",
                              os.fspath(final))
    try:
        yield tmp
        if fsync:
            _fsync_tree(tmp)
        if os.path.lexists(final):
            if not overwrite:
                raise FileExistsError(errno.EEXIST, "target appeared while writing "
                                      "(overwrite=False)", os.fspath(final))
            backup = final.parent / f".{final.name}.old-{secrets.token_hex(6)}"
            os.rename(final, backup)
            try:
                os.rename(tmp, final)
            except BaseException:
                os.rename(backup, final)
                raise
            _remove_path(backup)
        else:
            os.rename(tmp, final)
    except BaseException:
        _remove_path(tmp)
        raise
    if fsync:
        fsync_dir(final.parent)
