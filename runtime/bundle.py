"""Open and verify a bundle directory (stdlib only).

A bundle is a directory with ``manifest.json`` at its root and every artifact file the
manifest lists, at the relative path it gives. ``Bundle.open(path)`` reads and validates
the manifest and (by default) verifies every artifact:

* the path is a safe relative path (no absolute path, no ``..``; checked when the
  manifest is parsed, and again here for manifests built in memory);
* no component of the path below the bundle root is a symlink (a symlink leading outside
  the bundle is reported as such; one staying inside is refused too: bundles contain
  regular files and directories only, like the archives ``runtime.archive`` writes);
* it is a regular file, of ``size_bytes`` bytes, with the manifest's ``sha256``.

Any failure raises :class:`BundleIntegrityError` naming the file. Verification is a
snapshot: to load *exactly* the bytes that were checked, use :meth:`Bundle.read_artifact`
(reads once, hashes what it read, returns those bytes).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ArtifactNotFoundError, BundleIntegrityError, UnsafePathError
from .manifest import (MANIFEST_NAME, Artifact, Manifest, check_relpath, load_manifest,
                       sha256_file)

__all__ = ["Bundle", "sha256_file", "MANIFEST_NAME"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CHUNK = 1 << 20


def _is_within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:
        return False


@dataclass
class Bundle:
    """A bundle directory: ``root`` (absolute, resolved) and its parsed ``manifest``."""
    root: Path
    manifest: Manifest

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @classmethod
    def open(cls, path: os.PathLike | str, verify: bool = True) -> "Bundle":
        """Open the bundle directory ``path``; with ``verify`` check every artifact.

        Raises ManifestError (unreadable/invalid manifest) or BundleIntegrityError.
        """
        given = Path(path)
        try:
            root = given.resolve(strict=True)
        except (OSError, RuntimeError) as e:
            raise BundleIntegrityError(given, f"bundle directory not found: {e}",
                                       bundle=given) from None
        if not root.is_dir():
            raise BundleIntegrityError(given, "not a directory (expected a bundle directory "
                                              f"containing {MANIFEST_NAME})", bundle=root)
        mpath = root / MANIFEST_NAME
        try:
            st = os.lstat(mpath)
        except FileNotFoundError:
            raise BundleIntegrityError(mpath, "missing manifest (not a bundle directory?)",
                                       relpath=MANIFEST_NAME, bundle=root) from None
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(mpath, "manifest is a symlink (not allowed in a bundle)",
                                  relpath=MANIFEST_NAME, bundle=root)
        if not stat.S_ISREG(st.st_mode):
            raise BundleIntegrityError(mpath, "manifest is not a regular file",
                                       relpath=MANIFEST_NAME, bundle=root)
        b = cls(root=root, manifest=load_manifest(mpath))
        if verify:
            b.verify()
        return b

    # -- lookup -----------------------------------------------------------------------------

    def artifact(self, piece_id: str, backend: str, target: Optional[str] = None) -> Artifact:
        """The manifest entry for (piece, backend[, target]).

        With ``target=None`` the backend must have exactly one target for that piece.
        Raises ArtifactNotFoundError (naming the manifest) otherwise.
        """
        try:
            piece = self.manifest.piece(piece_id)
        except KeyError as e:
            raise ArtifactNotFoundError(self.manifest_path, e.args[0]) from None
        found = piece.find_artifacts(backend, target)
        if not found:
            have = ", ".join(f"{a.backend}/{a.target}" for a in piece.artifacts) or "none"
            want = backend if target is None else f"{backend}/{target}"
            raise ArtifactNotFoundError(self.manifest_path, f"piece {piece_id!r} has no "
                                        f"artifact for {want} (available: {have})")
        if len(found) > 1:
            raise ArtifactNotFoundError(self.manifest_path, f"piece {piece_id!r} has several "
                                        f"{backend} artifacts (targets: "
                                        f"{', '.join(a.target for a in found)}); pass target=")
        return found[0]

    def artifact_path(self, piece_id: str, backend: str, target: Optional[str] = None) -> Path:
        """Safe absolute path of the artifact file (exists, regular, inside the bundle).

        Does not re-hash the file (``verify()`` / ``read_artifact()`` do).
        """
        return self.resolve(self.artifact(piece_id, backend, target).file)

    def resolve(self, relpath: str) -> Path:
        """Resolve a bundle-relative path safely; the result is a regular file in the bundle.

        Raises UnsafePathError (absolute, '..', symlink) or BundleIntegrityError (missing,
        not a regular file).
        """
        full = self._full(relpath)
        why = check_relpath(relpath)
        if why:
            raise UnsafePathError(full, why, relpath=str(relpath), bundle=self.root)
        cur = str(self.root)
        parts = relpath.split("/")
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                raise BundleIntegrityError(full, "missing file", relpath=relpath,
                                           bundle=self.root) from None
            except NotADirectoryError:
                raise BundleIntegrityError(full, "missing file (a parent is not a directory)",
                                           relpath=relpath, bundle=self.root) from None
            if stat.S_ISLNK(st.st_mode):
                dest = os.path.realpath(cur)
                if not _is_within(dest, str(self.root)):
                    raise UnsafePathError(full, f"symlink pointing outside the bundle "
                                                f"({cur} -> {dest})", relpath=relpath,
                                          bundle=self.root)
                raise UnsafePathError(full, f"symlink in path ({cur}); bundles may contain "
                                            "regular files only", relpath=relpath,
                                      bundle=self.root)
            last = i == len(parts) - 1
            if not last and not stat.S_ISDIR(st.st_mode):
                raise BundleIntegrityError(full, f"missing file ({cur} is not a directory)",
                                           relpath=relpath, bundle=self.root)
            if last and not stat.S_ISREG(st.st_mode):
                raise BundleIntegrityError(full, "not a regular file", relpath=relpath,
                                           bundle=self.root)
        return Path(cur)

    def _full(self, relpath: object) -> str:
        return os.path.join(str(self.root), str(relpath))

    # -- verification -------------------------------------------------------------------------

    def _select(self, backend: Optional[str], target: Optional[str]) -> list[Artifact]:
        seen: dict[str, Artifact] = {}
        for p in self.manifest.pieces:
            for a in p.artifacts:
                if (backend is None or a.backend == backend) and \
                        (target is None or a.target == target):
                    seen.setdefault(a.file, a)
        return list(seen.values())

    def check(self, *, backend: Optional[str] = None, target: Optional[str] = None,
              checksums: bool = True) -> list[BundleIntegrityError]:
        """All integrity problems (empty list = OK), optionally only for one backend/target."""
        problems: list[BundleIntegrityError] = []
        for a in self._select(backend, target):
            try:
                self._check_artifact(a, checksums=checksums)
            except BundleIntegrityError as e:
                problems.append(e)
        return problems

    def verify(self, *, backend: Optional[str] = None, target: Optional[str] = None,
               checksums: bool = True) -> None:
        """Raise BundleIntegrityError (naming the file) on the first problem found.

        The message says how many further problems there are. ``checksums=False`` checks
        existence/type/size only.
        """
        problems = self.check(backend=backend, target=target, checksums=checksums)
        if problems:
            first = problems[0]
            if len(problems) > 1:
                more = f" (and {len(problems) - 1} more problem(s): " + "; ".join(
                    str(p) for p in problems[1:4]) + (" ..." if len(problems) > 4 else "") + ")"
                first.reason += more
                first.args = (str(first) + more,)
            raise first

    def _check_artifact(self, a: Artifact, *, checksums: bool) -> None:
        self._read(a, keep=False, checksums=checksums)

    def _read(self, a: Artifact, *, keep: bool, checksums: bool = True) -> Optional[bytes]:
        path = self.resolve(a.file)
        full = str(path)
        try:
            fd = os.open(full, os.O_RDONLY | _O_NOFOLLOW | getattr(os, "O_BINARY", 0))
        except OSError as e:
            raise BundleIntegrityError(full, f"cannot open: {e.strerror or e}", relpath=a.file,
                                       bundle=self.root) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleIntegrityError(full, "not a regular file", relpath=a.file,
                                           bundle=self.root)
            if st.st_size != a.size_bytes:
                kind = "truncated" if st.st_size < a.size_bytes else "size mismatch"
                raise BundleIntegrityError(full, f"{kind}: manifest says {a.size_bytes} bytes, "
                                                 f"file has {st.st_size}", relpath=a.file,
                                           bundle=self.root)
            if not checksums and not keep:
                return None
            h = hashlib.sha256()
            chunks: list[bytes] = []
            n = 0
            while True:
                b = os.read(fd, _CHUNK)
                if not b:
                    break
                n += len(b)
                h.update(b)
                if keep:
                    chunks.append(b)
        except OSError as e:
            raise BundleIntegrityError(full, f"cannot read: {e.strerror or e}", relpath=a.file,
                                       bundle=self.root) from None
        finally:
            os.close(fd)
        if n != a.size_bytes:
            raise BundleIntegrityError(full, f"size changed while reading: manifest says "
                                             f"{a.size_bytes} bytes, read {n}", relpath=a.file,
                                       bundle=self.root)
        digest = h.hexdigest()
        if digest != a.sha256:
            raise BundleIntegrityError(full, f"sha256 mismatch: manifest says {a.sha256}, "
                                             f"file has {digest}", relpath=a.file,
                                       bundle=self.root)
        return b"".join(chunks) if keep else None

    def read_artifact(self, piece_id: str, backend: str, target: Optional[str] = None) -> bytes:
        """Read the artifact once and return its bytes after checking size and sha256 of
        exactly those bytes (no check/use race). E.g. ``onnxruntime.InferenceSession(data)``."""
        data = self._read(self.artifact(piece_id, backend, target), keep=True)
        assert data is not None
        return data

    # -- misc -------------------------------------------------------------------------------

    def files(self) -> list[str]:
        """Bundle-relative paths of the manifest and every listed artifact (sorted)."""
        return [MANIFEST_NAME] + sorted({a.file for a in self.manifest.artifact_files()})

    def unlisted_files(self) -> list[str]:
        """Regular files under the root that the manifest does not list (sorted)."""
        listed = set(self.files())
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames.sort()
            for name in filenames:
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel not in listed:
                    out.append(rel)
        return sorted(out)

    def __repr__(self) -> str:
        m = self.manifest
        return (f"Bundle(root={str(self.root)!r}, model={m.model.name!r}, "
                f"device={m.device!r}, pieces={len(m.pieces)})")

