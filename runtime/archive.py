"""Unpack a bundle .tar.gz safely (stdlib only). Packing is the build side's
(export/archive.py).

Archive layout: see export/archive.py (one top-level directory, ``manifest.json`` first).

``unpack_bundle`` refuses, with :class:`ArchiveError` naming the archive and the member,
and *before writing anything*: absolute names, ``..`` components, backslashes, control
characters, symlinks, hard links, device files, FIFOs and any other non-regular,
non-directory member, members outside the single top-level directory, duplicate names, a
name used both as a file and as a directory, and more members/bytes than the limits. It
extracts (our own code, not ``TarFile.extract``: files created with O_EXCL|O_NOFOLLOW,
modes/owners/mtimes from the archive ignored) into a temp directory next to the
destination, verifies the bundle there, and only then renames it into place: on any
failure nothing is left at (or next to) the destination.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Optional

from .atomic import atomic_directory
from .bundle import Bundle
from .errors import ArchiveError, BundleIntegrityError, ManifestError
from .manifest import MANIFEST_NAME

__all__ = ["unpack_bundle", "unpacked_bundle", "is_archive", "default_cache_dir", "name_problem",
           "DEFAULT_MAX_MEMBERS", "DEFAULT_MAX_BYTES"]

DEFAULT_MAX_MEMBERS = 100_000
DEFAULT_MAX_BYTES = 64 * 1024 ** 3  # 64 GiB of uncompressed content
_CHUNK = 1 << 20
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def name_problem(name: str) -> Optional[str]:
    """Why a '/'-separated archive name is unsafe, else None. Allows './' and a trailing '/'."""
    if not name:
        return "empty name"
    if name.startswith("/") or name.startswith("\\") or re.match(r"[A-Za-z]:", name):
        return "absolute path"
    if "\\" in name:
        return "backslash in name"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "control character in name"
    parts = name.split("/")
    if ".." in parts:
        return "'..' component escapes the destination"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    return None


def _parts(name: str) -> list[str]:
    return [p for p in name.split("/") if p not in ("", ".")]


# ------------------------------------------------------------------------------------------
# unpack
# ------------------------------------------------------------------------------------------

def _plan(arc: Path, members: list[tarfile.TarInfo], max_members: int,
          max_bytes: int) -> tuple[str, list[tuple[tarfile.TarInfo, str, bool]]]:
    """Validate all members; return (top, [(member, relpath_in_bundle, is_dir)])."""
    if not members:
        raise ArchiveError(arc, "empty archive")
    if len(members) > max_members:
        raise ArchiveError(arc, f"too many members ({len(members)} > {max_members})")
    top: Optional[str] = None
    plan = []
    kinds: dict[str, bool] = {}  # relpath -> is_dir (members and implied ancestors)
    explicit: set[str] = set()  # relpaths named by a member
    explicit_top: set[str] = set()
    total = 0
    for m in members:
        name = m.name
        why = name_problem(name)
        if why:
            raise ArchiveError(arc, why, member=name)
        if m.issym():
            raise ArchiveError(arc, f"symlink (-> {m.linkname!r}) not allowed in a bundle",
                               member=name)
        if m.islnk():
            raise ArchiveError(arc, f"hard link (-> {m.linkname!r}) not allowed in a bundle",
                               member=name)
        if m.ischr() or m.isblk():
            raise ArchiveError(arc, "device file not allowed in a bundle", member=name)
        if m.isfifo():
            raise ArchiveError(arc, "FIFO not allowed in a bundle", member=name)
        is_dir = m.isdir()
        if not is_dir and m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise ArchiveError(arc, f"unsupported member type {m.type!r} (only regular files "
                                    "and directories)", member=name)
        parts = _parts(name)
        if not parts:
            if not is_dir:
                raise ArchiveError(arc, "empty name", member=name)
            continue  # "./": the archive root itself
        if top is None:
            top = parts[0]
        if parts[0] != top:
            raise ArchiveError(arc, f"outside the bundle directory {top!r} (an archive holds "
                                    "exactly one top-level directory)", member=name)
        if len(parts) == 1:
            if not is_dir:
                raise ArchiveError(arc, "regular file at the top level is outside the bundle "
                                        "directory", member=name)
            if top in explicit_top:
                raise ArchiveError(arc, "duplicate member name", member=name)
            explicit_top.add(top)
            continue
        rel = "/".join(parts[1:])
        if rel in explicit:
            raise ArchiveError(arc, "duplicate member name", member=name)
        # every ancestor must be (or become) a directory, never a file
        for i in range(1, len(parts) - 1):
            anc = "/".join(parts[1:i + 1])
            if kinds.get(anc) is False:
                raise ArchiveError(arc, f"{anc!r} is both a file and a directory", member=name)
            kinds[anc] = True
        if kinds.get(rel) is True and not is_dir:
            raise ArchiveError(arc, f"{rel!r} is both a file and a directory", member=name)
        kinds[rel] = is_dir
        explicit.add(rel)
        if not is_dir:
            if m.size < 0:
                raise ArchiveError(arc, "negative size", member=name)
            total += m.size
            if total > max_bytes:
                raise ArchiveError(arc, f"more than {max_bytes} bytes of content", member=name)
        plan.append((m, rel, is_dir))
    if top is None:
        raise ArchiveError(arc, "empty archive")
    if kinds.get(MANIFEST_NAME) is not False:
        raise ArchiveError(arc, f"no {top}/{MANIFEST_NAME} in the archive (not a bundle?)")
    return top, plan


def unpack_bundle(tar_gz: os.PathLike | str, dest_dir: os.PathLike | str, *,
                  overwrite: bool = False, verify: bool = True,
                  max_members: int = DEFAULT_MAX_MEMBERS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Extract the bundle in ``tar_gz`` so that ``dest_dir`` becomes the bundle directory.

    The archive's single top-level directory is stripped: ``<top>/manifest.json`` becomes
    ``dest_dir/manifest.json``. Atomic: extraction and verification happen in a temp dir
    next to ``dest_dir``, renamed into place only on success. ``dest_dir`` must not exist
    unless ``overwrite``. Raises ArchiveError (naming the archive, and the member where
    one is at fault). Returns ``Path(dest_dir)``.
    """
    arc = Path(tar_gz)
    dest = Path(dest_dir)
    if not overwrite and os.path.lexists(dest):
        raise ArchiveError(arc, f"destination {os.fspath(dest)!r} already exists "
                                "(overwrite=False)")
    try:
        tf = tarfile.open(arc, mode="r:gz", encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise ArchiveError(arc, "archive not found") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(arc, f"not a readable .tar.gz: {e}") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise ArchiveError(arc, f"corrupt archive: {e}") from None
        top, plan = _plan(arc, members, max_members, max_bytes)
        try:
            with atomic_directory(dest, overwrite=overwrite) as tmp:
                for m, rel, is_dir in plan:
                    _extract_one(arc, tf, m, rel, is_dir, tmp)
                try:
                    Bundle.open(tmp, verify=verify)
                except ManifestError as e:
                    where = f"{e.json_path}: " if e.json_path else ""
                    raise ArchiveError(arc, f"invalid manifest: {where}{e.reason}",
                                       member=f"{top}/{MANIFEST_NAME}") from e
                except BundleIntegrityError as e:
                    raise ArchiveError(arc, f"bundle verification failed: {e.reason}",
                                       member=f"{top}/{e.relpath}" if e.relpath else None) from e
        except FileExistsError:
            raise ArchiveError(arc, f"destination {os.fspath(dest)!r} already exists "
                                    "(overwrite=False)") from None
    return dest


def _extract_one(arc: Path, tf: tarfile.TarFile, m: tarfile.TarInfo, rel: str, is_dir: bool,
                 tmp: Path) -> None:
    target = os.path.join(tmp, *rel.split("/"))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)  # parents are all dirs we created (no symlinks exist)
    if is_dir:
        os.makedirs(target, exist_ok=True)
        return
    try:
        src = tf.extractfile(m)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(arc, f"cannot read member: {e}", member=m.name) from None
    if src is None:  # pragma: no cover - only regular files reach here
        raise ArchiveError(arc, "member has no data", member=m.name)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW |
                 getattr(os, "O_BINARY", 0), 0o666)
    with os.fdopen(fd, "wb") as out, src:
        left = m.size
        try:
            while left > 0:
                b = src.read(min(_CHUNK, left))
                if not b:
                    raise ArchiveError(arc, "unexpected end of data", member=m.name)
                out.write(b)
                left -= len(b)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise ArchiveError(arc, f"corrupt member data: {e}", member=m.name) from None
        except OSError as e:
            raise ArchiveError(arc, f"cannot extract member: {e}", member=m.name) from None


def default_cache_dir() -> Path:
    """Where archives given to the runtime are unpacked: ``$ADAPTIVE_DEPTH_CACHE``, else
    ``$XDG_CACHE_HOME/adaptive-depth-pipeline/bundles`` (``~/.cache/...``)."""
    explicit = os.environ.get("ADAPTIVE_DEPTH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adaptive-depth-pipeline" / "bundles"


def unpacked_bundle(tar_gz: os.PathLike | str,
                    cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """The bundle directory of ``tar_gz``, unpacked once through :func:`unpack_bundle` into
    ``cache_dir`` (default :func:`default_cache_dir`) under the archive's sha256, so the same
    archive is unpacked once and a changed archive never reuses an old directory. The caller
    still opens (and verifies) the directory as a bundle."""
    from .manifest import sha256_file

    arc = Path(tar_gz)
    if not arc.is_file():
        raise ArchiveError(arc, "archive not found")
    dest = Path(cache_dir or default_cache_dir()) / sha256_file(arc)[:32]
    if not (dest / MANIFEST_NAME).is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        unpack_bundle(arc, dest, overwrite=os.path.lexists(dest))
    return dest


def is_archive(path: os.PathLike | str) -> bool:
    """Whether ``path`` names a bundle archive (a ``.tar.gz`` / ``.tgz`` file)."""
    p = Path(path)
    return p.is_file() and p.name.endswith((".tar.gz", ".tgz"))
