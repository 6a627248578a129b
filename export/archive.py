"""Pack a bundle directory into a deterministic .tar.gz (stdlib only); runtime/archive.py
unpacks one safely on the device.

Archive layout: one top-level directory (default: the bundle directory's name) holding the
bundle: ``<top>/``, ``<top>/manifest.json`` first, then every other directory and regular
file under the bundle, sorted by path. Determinism: fixed order, mtime 0 (or the given
``mtime``), uid/gid 0, empty user/group names, modes normalised to 0644 / 0755 (0755 for
files with the owner-exec bit), gzip header without file name and with mtime 0. The same
bundle contents and top-level name give byte-identical archives.
"""
from __future__ import annotations

import gzip
import os
import stat
import tarfile
from pathlib import Path
from typing import Optional

from runtime.archive import name_problem
from runtime.atomic import atomic_writer
from runtime.bundle import Bundle
from runtime.errors import ArchiveError
from runtime.manifest import MANIFEST_NAME

__all__ = ["pack_bundle"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)



def pack_bundle(bundle_dir: os.PathLike | str, out_tar_gz: os.PathLike | str, *,
                arcname: Optional[str] = None, verify: bool = True, mtime: int = 0,
                compresslevel: int = 6) -> Path:
    """Write ``bundle_dir`` as a deterministic ``.tar.gz`` at ``out_tar_gz`` (atomically).

    The bundle is opened (and with ``verify`` fully verified) first; every regular file and
    directory under it is packed. Symlinks, device files etc. in the bundle directory are
    refused (ArchiveError naming the path). Returns ``Path(out_tar_gz)``.
    """
    bundle = Bundle.open(bundle_dir, verify=verify)
    root = bundle.root
    out = Path(out_tar_gz)
    out_abs = Path(os.path.abspath(out))
    try:
        out_parent = out_abs.parent.resolve()
    except OSError:
        out_parent = out_abs.parent
    if out_parent == root or root in out_parent.parents:
        raise ArchiveError(out, f"output archive must not be inside the bundle directory {root}")
    top = root.name if arcname is None else arcname
    if "/" in top or name_problem(top) or top in (".", ".."):
        raise ArchiveError(out, f"invalid top-level directory name {top!r}")

    dirs: list[str] = []
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            why = name_problem(rel)
            if why:
                raise ArchiveError(full, f"cannot pack: {why}")
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                raise ArchiveError(full, "cannot pack a symlink (bundles hold regular files "
                                         "and directories only)")
            if stat.S_ISDIR(st.st_mode):
                dirs.append(rel)
            elif stat.S_ISREG(st.st_mode):
                files.append(rel)
            else:
                raise ArchiveError(full, "cannot pack: not a regular file or directory")
        dirnames[:] = [d for d in dirnames if os.path.isdir(os.path.join(dirpath, d))
                       and not os.path.islink(os.path.join(dirpath, d))]
    entries = sorted([(r, True) for r in dirs] + [(r, False) for r in files if r != MANIFEST_NAME])

    def info(name: str, is_dir: bool, size: int = 0, exe: bool = False) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type = tarfile.DIRTYPE if is_dir else tarfile.REGTYPE
        ti.mode = 0o755 if (is_dir or exe) else 0o644
        ti.size = 0 if is_dir else size
        ti.mtime = int(mtime)
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def add_file(tf: tarfile.TarFile, rel: str) -> None:
        full = os.path.join(root, rel)
        fd = os.open(full, os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ArchiveError(full, "cannot pack: not a regular file")
            try:
                tf.addfile(info(f"{top}/{rel}", False, st.st_size,
                                bool(st.st_mode & stat.S_IXUSR)), f)
            except OSError as e:  # file shrank while packing
                raise ArchiveError(full, f"cannot pack: {e}") from None

    with atomic_writer(out, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel,
                           mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT,
                              encoding="utf-8") as tf:
                tf.addfile(info(top, True))
                add_file(tf, MANIFEST_NAME)
                for rel, is_dir in entries:
                    if is_dir:
                        tf.addfile(info(f"{top}/{rel}", True))
                    else:
                        add_file(tf, rel)
    return out
