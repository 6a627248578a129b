"""Hardening: corrupt, tampered and hostile bundles, archives, checkpoints and arrays.

Every file of a real (tiny) device bundle is flipped, truncated, extended and deleted in turn;
each case must be refused by ``Bundle.open`` *and* ``AdaptiveModel.load`` with an error naming
that file. Manifests that are malformed or from a future schema are refused naming the manifest.
Paths in manifests and archives cannot leave the bundle directory, and nothing on the load path
unpickles (a source scan plus behavioural checks with pickle payloads that would leave a marker
file if they ever ran). See docs/security.md.

The bundle fixtures come from tests/test_runtime.py (``build_bundles``, about 3 s) and
tests/test_bundle.py (``make_bundle``, a synthetic 2-stage bundle for the archive fuzzing).
"""
from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import AdaptiveModel
from export.archive import pack_bundle
from runtime.archive import unpack_bundle
from runtime.bundle import Bundle
from runtime.errors import (ArchiveError, BundleError, BundleIntegrityError, ManifestError,
                            UnsafePathError)
from runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION
from test_bundle import make_bundle
from test_runtime import THREADS, build_bundles

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(portable, x86-host onnxruntime) bundles of a tiny resnet20_adn, built once."""
    return build_bundles(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def work(built, tmp_path_factory) -> Path:
    """A private copy of the host bundle that tests corrupt *and restore* in place."""
    dst = tmp_path_factory.mktemp("work") / "b"
    shutil.copytree(built[1], dst)
    return dst


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class _Restore:
    """Context manager: snapshot one file's bytes (or absence) and put them back afterwards."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes() if path.exists() else None

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path)
        elif self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        if self.data is not None:
            self.path.write_bytes(self.data)


def _refusals(root: Path) -> list[BundleError]:
    """The error raised by Bundle.open and by AdaptiveModel.load (both must refuse)."""
    errors = []
    for opener in (lambda: Bundle.open(root),
                   lambda: AdaptiveModel.load(root, runner_options=THREADS)):
        with pytest.raises(BundleError) as ei:
            opener()
        errors.append(ei.value)
    return errors


def _flip(data: bytes, pos: int, mask: int = 0xFF) -> bytes:
    b = bytearray(data)
    b[pos] ^= mask
    return bytes(b)


# ---------------------------------------------------------------------------------------------
# every file of a real bundle: flips, truncation, extension, deletion
# ---------------------------------------------------------------------------------------------

def test_real_bundle_lists_every_file_it_contains(work):
    """So 'every listed file' below really is every file of the bundle."""
    b = Bundle.open(work)
    assert b.files() == _all_files(work)
    assert b.unlisted_files() == []
    assert len(b.files()) == 13  # manifest + 6 portable ONNX + 6 compiled ONNX


ARTIFACT_CORRUPTIONS = {
    "flip-first-byte": (lambda d: _flip(d, 0), "sha256 mismatch"),
    "flip-middle-byte": (lambda d: _flip(d, len(d) // 2, 0x01), "sha256 mismatch"),
    "flip-last-byte": (lambda d: _flip(d, len(d) - 1, 0x80), "sha256 mismatch"),
    "truncate-half": (lambda d: d[: len(d) // 2], "truncated"),
    "truncate-empty": (lambda d: b"", "truncated"),
    "append-byte": (lambda d: d + b"\0", "size mismatch"),
    "delete": (None, "missing file"),
    "replace-by-directory": ("dir", "not a regular file"),
}


@pytest.mark.parametrize("kind", list(ARTIFACT_CORRUPTIONS))
def test_every_artifact_corruption_is_refused_naming_the_file(work, kind):
    how, reason = ARTIFACT_CORRUPTIONS[kind]
    rels = [r for r in Bundle.open(work).files() if r != MANIFEST_NAME]
    assert len(rels) == 12
    for rel in rels:
        path = work / rel
        with _Restore(path):
            if how is None:
                path.unlink()
            elif how == "dir":
                path.unlink()
                path.mkdir()
            else:
                path.write_bytes(how(path.read_bytes()))
            for err in _refusals(work):
                assert isinstance(err, BundleIntegrityError), (rel, err)
                assert err.file == str(path) and str(err).startswith(f"{path}: "), (rel, err)
                assert err.relpath == rel and reason in err.reason, (rel, err)
    Bundle.open(work)  # restored


MANIFEST_CORRUPTIONS = {
    "flip-first-byte": (lambda d: _flip(d, 0, 0x01), ManifestError, "invalid JSON"),
    "truncate-half": (lambda d: d[: len(d) // 2], ManifestError, "invalid JSON"),
    "truncate-empty": (lambda d: b"", ManifestError, "invalid JSON"),
    "garbage-bytes": (lambda d: b"\x80\x81\xfe" + d, ManifestError, "not valid UTF-8"),
    "trailing-garbage": (lambda d: d + b"}", ManifestError, "invalid JSON"),
    "delete": (None, BundleIntegrityError, "missing manifest"),
    "replace-by-directory": ("dir", BundleIntegrityError, "not a regular file"),
}


@pytest.mark.parametrize("kind", list(MANIFEST_CORRUPTIONS))
def test_manifest_corruption_is_refused_naming_the_manifest(work, kind):
    how, etype, reason = MANIFEST_CORRUPTIONS[kind]
    path = work / MANIFEST_NAME
    with _Restore(path):
        if how is None:
            path.unlink()
        elif how == "dir":
            path.unlink()
            path.mkdir()
        else:
            path.write_bytes(how(path.read_bytes()))
        for err in _refusals(work):
            assert isinstance(err, etype), err
            assert err.file == str(path) and str(err).startswith(f"{path}: "), err
            assert reason in str(err), err


def test_manifest_flip_inside_a_checksum_is_refused(work):
    """A flipped hex digit of an artifact's sha256: invalid hex (manifest error) or a
    different valid hash (integrity error naming that artifact) - never accepted."""
    path = work / MANIFEST_NAME
    text = path.read_text()
    d = json.loads(text)
    art = d["pieces"][3]["artifacts"][0]
    start = text.index(art["sha256"])
    for offset, mask in ((0, 0x01), (10, 0x02), (63, 0x04), (31, 0x40)):
        with _Restore(path):
            path.write_bytes(_flip(text.encode(), start + offset, mask))
            for err in _refusals(work):
                assert str(err).startswith((str(path), str(work / art["file"]))), err


def _artifact_triples(m) -> list[tuple[str, str, int]]:
    return sorted((a.file, a.sha256, a.size_bytes) for p in m.pieces for a in p.artifacts)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
@given(st.data())
def test_property_manifest_bit_flips_refused_or_harmless_to_artifacts(work, data):
    """Any single bit flip anywhere in a real manifest: Bundle.open either refuses it with a
    BundleError naming a file of the bundle (never another exception), or accepts it - the
    manifest has no checksum of its own (docs/security.md) - but then every artifact still
    resolves to exactly the same verified bytes (same file, sha256 and size)."""
    path = work / MANIFEST_NAME
    orig = path.read_bytes()
    ref = _artifact_triples(Bundle.open(work).manifest)
    pos = data.draw(st.integers(0, len(orig) - 1), label="pos")
    bit = data.draw(st.integers(0, 7), label="bit")
    with _Restore(path):
        path.write_bytes(_flip(orig, pos, 1 << bit))
        try:
            b = Bundle.open(work)
        except BundleError as e:
            assert e.file.startswith(str(work) + os.sep), e
            return
        assert _artifact_triples(b.manifest) == ref


def test_future_schema_version_refused_by_open_load_and_cli(work, pipeline_env, tmp_path):
    path = work / MANIFEST_NAME
    with _Restore(path):
        d = json.loads(path.read_text())
        d["schema_version"] = SCHEMA_VERSION + 1
        d["field_from_the_future"] = {"x": 1}
        path.write_text(json.dumps(d))
        for err in _refusals(work):
            assert isinstance(err, ManifestError)
            assert str(err).startswith(f"{path}: schema_version: {SCHEMA_VERSION + 1}: written "
                                       "by a newer version of the tool: upgrade"), str(err)
        np.save(tmp_path / "x.npy", np.zeros((28, 28), np.uint8))
        proc = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--bundle", str(work),
                               str(tmp_path / "x.npy")], capture_output=True, text=True,
                              env=pipeline_env, cwd=ROOT, timeout=120)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith(f"Error: {path}: schema_version: {SCHEMA_VERSION + 1}: "
                                      "written by a newer version of the tool: upgrade")


def _edit(d: dict, what: str) -> str:
    """Malform the manifest dict ``d`` in place; return the text to write."""
    if what == "unknown-key":
        d["pieces"][0]["shape_hint"] = 1
    elif what == "missing-key":
        del d["input"]["mean"]
    elif what == "wrong-type":
        d["stages"] = "3"
    elif what == "dangling-piece":
        d["execution"]["FFF"][1] = ["stage9.full"]
    elif what == "bad-sha":
        d["pieces"][0]["artifacts"][0]["sha256"] = "abc"
    elif what == "negative-size":
        d["pieces"][0]["artifacts"][0]["size_bytes"] = -1
    elif what == "std-zero":
        d["input"]["std"] = [0.0]
    elif what == "nan":
        return json.dumps(d).replace('"params": ', '"params": NaN, "x": ', 1)
    elif what == "duplicate-key":
        return json.dumps(d).replace('"stages": ', '"stages": 3, "stages": ', 1)
    elif what == "top-level-list":
        return json.dumps([d])
    else:  # pragma: no cover
        raise AssertionError(what)
    return json.dumps(d)


@pytest.mark.parametrize("what, expect", [
    ("unknown-key", "pieces[0].shape_hint: unknown key"),
    ("missing-key", "input.mean: missing required field"),
    ("wrong-type", "stages: expected an integer"),
    ("dangling-piece", "execution.FFF[1][0]: piece 'stage9.full' is not defined in pieces"),
    ("bad-sha", "pieces[0].artifacts[0].sha256: expected 64 hex chars"),
    ("negative-size", "pieces[0].artifacts[0].size_bytes"),
    ("std-zero", "input.std"),
    ("nan", "NaN is not valid JSON"),
    ("duplicate-key", "duplicate key 'stages'"),
    ("top-level-list", "expected a JSON object at top level"),
])
def test_malformed_manifest_refused_naming_file_and_json_path(work, what, expect):
    path = work / MANIFEST_NAME
    with _Restore(path):
        path.write_text(_edit(json.loads(path.read_text()), what))
        for err in _refusals(work):
            assert isinstance(err, ManifestError), err
            assert str(err).startswith(f"{path}: ") and expect in str(err), str(err)


def test_oversized_manifest_refused_before_parsing(work):
    path = work / MANIFEST_NAME
    with _Restore(path):
        text = path.read_bytes()
        with open(path, "wb") as f:  # valid JSON, made 1 byte too long by leading whitespace
            f.write(b" " * (64 * 1024 * 1024 + 1 - len(text)) + text)
        with pytest.raises(ManifestError, match="manifest larger than") as ei:
            Bundle.open(work)
        assert ei.value.file == str(path)


def _evil_artifact_bundle(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of ``src`` whose compiled stage0.full artifact is a pickle (that would create
    ``marker`` if unpickled), re-hashed into the manifest: checksums match, contents are junk."""
    import runtime.manifest as rm

    shutil.copytree(src, dst)
    payload = pickle.dumps(_Marker(marker))
    man = Bundle.open(dst).manifest.copy()
    art = man.piece("stage0.full").find_artifacts("onnxruntime")[0]
    (dst / art.file).write_bytes(payload)
    art.sha256, art.size_bytes = rm.sha256_file(dst / art.file), len(payload)
    rm.save_manifest(man, dst / MANIFEST_NAME)
    Bundle.open(dst)  # checksums match: integrity is not the problem
    return dst


def test_valid_checksum_but_unloadable_artifact_is_never_unpickled(work, tmp_path):
    marker = tmp_path / "PWNED"
    b = _evil_artifact_bundle(work, tmp_path / "evil", marker)
    with pytest.raises(Exception) as ei:
        AdaptiveModel.load(b, runner_options=THREADS)
    assert not marker.exists()
    assert "stage0.full.onnx" in str(ei.value)


def test_valid_checksum_but_unloadable_artifact_is_one_cli_line(work, tmp_path, pipeline_env):
    marker = tmp_path / "PWNED"
    b = _evil_artifact_bundle(work, tmp_path / "evil", marker)
    np.save(tmp_path / "x.npy", np.zeros((28, 28), np.uint8))
    proc = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--bundle", str(b),
                           str(tmp_path / "x.npy")], capture_output=True, text=True,
                          env=pipeline_env, cwd=ROOT, timeout=120)
    assert not marker.exists()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-600:]
    assert proc.stderr.startswith("Error: ") and "stage0.full.onnx" in proc.stderr


class _Marker:
    """Pickle payload: unpickling it creates ``path`` (so a test can see that it never ran)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# ---------------------------------------------------------------------------------------------
# checks happen at the right time
# ---------------------------------------------------------------------------------------------

def _altered_but_valid_onnx(src: Path, dst: Path) -> None:
    """A valid ONNX with the same I/O as ``src`` but different weights (logits scaled)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    biggest = max(m.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(biggest) * -3.0
    biggest.CopyFrom(numpy_helper.from_array(arr.astype(np.float32), biggest.name))
    onnx.save(m, str(dst))


def test_artifacts_are_checked_before_first_use_when_loaded_warm(work, tmp_path):
    """load() (warm=True, the default) opens every session right after verifying, so a file
    changed afterwards is never read; a change before load is refused."""
    b = tmp_path / "warm"
    shutil.copytree(work, b)
    x = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    m = AdaptiveModel.load(b, runner_options=THREADS)
    ref = m.predict(x, skip_config="FFF")
    f = b / m.bundle.artifact("stage2.full", "onnxruntime").file
    _altered_but_valid_onnx(f, f)
    again = m.predict(x, skip_config="FFF")
    np.testing.assert_array_equal(again.probabilities, ref.probabilities)
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        AdaptiveModel.load(b, runner_options=THREADS)


def test_lazily_opened_artifact_changed_after_load_is_refused(work, tmp_path):
    b = tmp_path / "lazy"
    shutil.copytree(work, b)
    x = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
    ref = AdaptiveModel.load(b, runner_options=THREADS).predict(x, skip_config="FFF")
    m = AdaptiveModel.load(b, runner_options=THREADS, warm=False)
    f = b / m.bundle.artifact("stage2.full", "onnxruntime").file
    _altered_but_valid_onnx(f, f)
    try:
        got = m.predict(x, skip_config="FFF")
    except BundleIntegrityError:
        return  # the fixed behaviour
    assert not np.allclose(got.probabilities, ref.probabilities)  # ran the altered graph
    raise AssertionError("an artifact changed after load() was run without a checksum check")


# ---------------------------------------------------------------------------------------------
# path containment: manifests
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["../outside.onnx", "/etc/hostname", "onnx/../../outside.onnx",
                                 "onnx/./stage0.full.onnx", "onnx\\..\\..\\outside.onnx",
                                 "C:/outside.onnx", "onnx//stage0.full.onnx", MANIFEST_NAME])
def test_manifest_paths_cannot_escape_the_real_bundle(work, bad):
    path = work / MANIFEST_NAME
    outside = work.parent / "outside.onnx"
    with _Restore(path):
        shutil.copyfile(work / "onnx" / "stage0.full.onnx", outside)
        d = json.loads(path.read_text())
        d["pieces"][0]["artifacts"][0]["file"] = bad  # same bytes outside: only the path is bad
        path.write_text(json.dumps(d))
        for err in _refusals(work):
            assert isinstance(err, UnsafePathError), err
            assert str(err).startswith(f"{path}: pieces[0].artifacts[0].file: "), err
    outside.unlink()


@pytest.mark.parametrize("where", ["file", "directory", "inside"])
def test_symlinks_in_a_real_bundle_are_refused(work, tmp_path, where):
    compiled = work / "onnxruntime" / "x86_64-cpu"
    target = compiled / "stage1.skip.onnx"
    with _Restore(target):
        if where == "file":  # same content outside, reached by a symlink
            outside = tmp_path / "o.onnx"
            shutil.copyfile(target, outside)
            target.unlink()
            target.symlink_to(outside)
            expect, file = "symlink pointing outside the bundle", target
        elif where == "inside":
            (work / "copy.onnx").write_bytes(target.read_bytes())
            target.unlink()
            target.symlink_to(work / "copy.onnx")
            expect, file = "symlink in path", target
        else:  # the whole directory moved out and linked back
            moved = tmp_path / "moved"
            compiled.rename(moved)
            compiled.symlink_to(moved)
            expect, file = "symlink pointing outside the bundle", None
        try:
            for err in _refusals(work):
                assert isinstance(err, UnsafePathError) and expect in str(err), err
                if file is not None:
                    assert err.file == str(file)
                else:
                    assert err.file.startswith(str(compiled) + os.sep)
        finally:
            if where == "directory":
                compiled.unlink()
                moved.rename(compiled)
            (work / "copy.onnx").unlink(missing_ok=True)
    Bundle.open(work)


# ---------------------------------------------------------------------------------------------
# path containment: archives
# ---------------------------------------------------------------------------------------------

def test_real_bundle_archive_round_trip_and_tampered_member(work, tmp_path):
    arc = pack_bundle(work, tmp_path / "b.tar.gz")
    out = unpack_bundle(arc, tmp_path / "deploy" / "b")
    assert _all_files(out) == _all_files(work)
    AdaptiveModel.load(out, runner_options=THREADS)
    # flip one byte of the gzip stream: refused (gzip, tar, or sha256 check) with nothing
    # written, or - when the flip only hits the tar's zero padding, which tarfile never reads
    # back, so gzip's CRC is not checked - an identical, verified bundle
    data = arc.read_bytes()
    for pos in (len(data) // 3, len(data) // 2, len(data) - 10, len(data) - 3):
        bad = tmp_path / f"bad{pos}.tar.gz"
        bad.write_bytes(_flip(data, pos))
        dest = tmp_path / f"d{pos}" / "b"
        try:
            got = unpack_bundle(bad, dest)
        except ArchiveError as e:
            assert str(e).startswith(str(bad))
            assert not dest.parent.exists() or os.listdir(dest.parent) == []
        else:
            assert {r: (got / r).read_bytes() for r in _all_files(got)} == \
                {r: (work / r).read_bytes() for r in _all_files(work)}, pos


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]], fmt=tarfile.PAX_FORMAT):
    with tarfile.open(path, "w:gz", format=fmt) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return path


def _members(bundle_root: Path, top: str = "b") -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    for rel in _all_files(bundle_root):
        data = (bundle_root / rel).read_bytes()
        ti = tarfile.TarInfo(f"{top}/{rel}")
        ti.size = len(data)
        out.append((ti, data))
    return out


def _snapshot(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_pax_and_gnu_long_names_cannot_escape(tmp_path):
    bundle = make_bundle(tmp_path / "src" / "b")
    for fmt, name in ((tarfile.PAX_FORMAT, "b/" + "d/" * 60 + "../" * 70 + "evil"),
                      (tarfile.GNU_FORMAT, "b/" + "x" * 120 + "/../../../evil"),
                      (tarfile.PAX_FORMAT, "b/onnx/\u2025/evil"),  # two-dot leader: harmless
                      (tarfile.PAX_FORMAT, "b/onnx/..\u0000/evil")):
        ti = tarfile.TarInfo(name)
        ti.size = 4
        arc = _tar(tmp_path / "a.tar.gz", _members(bundle.root) + [(ti, b"evil")], fmt)
        before = _snapshot(tmp_path)
        dest = tmp_path / "deploy" / "b"
        try:
            out = unpack_bundle(arc, dest)
        except ArchiveError as e:
            assert str(e).startswith(str(arc)), e
            assert _snapshot(tmp_path) == before, "something was written on refusal"
        else:  # accepted only if every written file is inside dest
            new = _snapshot(tmp_path) - before
            assert all(p.startswith(str(out)) or p == str(out.parent) for p in new), new
            shutil.rmtree(tmp_path / "deploy")
        assert not (tmp_path / "evil").exists() and not (tmp_path / "src" / "evil").exists()


_SEG = st.sampled_from(["b", "onnx", "..", ".", "", "x", "evil", "manifest.json", "b\\..",
                        "C:", "\u2215", "a b", "/"])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck),
          derandomize=True)
@given(st.lists(st.tuples(st.lists(_SEG, min_size=1, max_size=5),
                          st.sampled_from(["file", "dir"])), min_size=1, max_size=3))
def test_property_archive_members_never_escape(tmp_path_factory, extra):
    """Random extra member names (mixes of '..', '.', '', '/', backslashes, drive letters):
    unpack_bundle either refuses with ArchiveError and writes nothing, or writes only inside
    the destination."""
    tmp = tmp_path_factory.mktemp("fuzz")
    bundle = make_bundle(tmp / "src" / "b")
    members = _members(bundle.root)
    for parts, kind in extra:
        ti = tarfile.TarInfo("/".join(parts))
        if kind == "dir":
            ti.type = tarfile.DIRTYPE
        else:
            ti.size = 4
        members.append((ti, b"evil"))
    arc = _tar(tmp / "a.tar.gz", members)
    before = _snapshot(tmp)
    dest = tmp / "deploy" / "b"
    try:
        out = unpack_bundle(arc, dest)
    except ArchiveError as e:
        assert str(e).startswith(str(arc))
        assert _snapshot(tmp) == before
    else:
        new = _snapshot(tmp) - before
        assert all(p == str(tmp / "deploy") or p.startswith(str(out)) for p in new), new
        Bundle.open(out)
    assert not Path("/evil").exists()


# ---------------------------------------------------------------------------------------------
# nothing is unpickled
# ---------------------------------------------------------------------------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal",
                   "shelve", "copyreg"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            owner = f.value.id if isinstance(f, ast.Attribute) and \
                isinstance(f.value, ast.Name) else ""
            yield owner, name, {k.arg: k.value for k in node.keywords}, node


def _sources(*dirs: str) -> list[Path]:
    files = [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]
    assert files, dirs
    return files


def test_source_scan_runtime_and_devices_never_unpickle():
    """runtime/ and devices/ (the on-device side) import no pickle-like module, call no
    np.load with allow_pickle=True, no eval/exec/compile/__import__, and no torch.load."""
    for f in _sources("runtime", "devices"):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = {node.module.split(".")[0]}
            else:
                continue
            assert not names & _PICKLE_MODULES, (f, node.lineno, names)
        for owner, name, kw, node in _calls(tree):
            where = f"{f.relative_to(ROOT)}:{node.lineno}"
            assert name not in ("eval", "exec", "compile", "__import__") or owner, where
            assert not (owner == "torch" and name == "load"), where
            if name in ("load", "loads") and owner in ("np", "numpy"):
                v = kw.get("allow_pickle")
                assert isinstance(v, ast.Constant) and v.value is False, where
            if owner == "yaml":
                assert name in ("safe_load", "safe_dump", "dump"), where


def test_source_scan_whole_project_loads_safely():
    """Everywhere (train/, export/, pipeline/, bench/ too): torch.load only with
    weights_only=True, np.load never with allow_pickle=True, yaml only safe_load, and the
    one pickle reader (CIFAR's official pickle files) is a restricted Unpickler."""
    for f in _sources("runtime", "devices", "train", "export", "pipeline", "bench"):
        text = f.read_text()
        tree = ast.parse(text, str(f))
        for owner, name, kw, node in _calls(tree):
            where = f"{f.relative_to(ROOT)}:{node.lineno}"
            if owner == "torch" and name == "load":
                v = kw.get("weights_only")
                assert isinstance(v, ast.Constant) and v.value is True, where
            if owner in ("np", "numpy") and name == "load":
                v = kw.get("allow_pickle")
                assert v is None or (isinstance(v, ast.Constant) and v.value is False), where
            if owner == "yaml":
                assert name != "load" and name != "unsafe_load", where
            if owner == "pickle":
                assert name not in ("load", "loads"), where
        if "import pickle" in text:
            assert f.relative_to(ROOT).as_posix() == "train/data/cifar.py", f
            assert "def find_class" in text and "pickle.Unpickler" in text


def test_malicious_checkpoint_never_runs(tmp_path, pipeline_env):
    """A checkpoint whose pickle would create a marker file: refused by load_checkpoint and by
    `pipeline export`, one line, the marker never appears."""
    import torch

    from train.checkpoint import load_checkpoint

    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "model_name": "resnet20_adn", "x": _Marker(marker)}, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(evil)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "export", "--checkpoint", str(evil),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          env=pipeline_env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith(f"Error: {evil}: not a readable checkpoint"), proc.stderr
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_object_npy_is_not_unpickled_by_predict(built, tmp_path, pipeline_env):
    marker = tmp_path / "PWNED"
    arr = np.empty(1, dtype=object)
    arr[0] = _Marker(marker)
    np.save(tmp_path / "evil.npy", arr, allow_pickle=True)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "predict", "--bundle", str(built[1]),
                           str(tmp_path / "evil.npy")], capture_output=True, text=True,
                          env=pipeline_env, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "evil.npy: not a plain .npy array" in proc.stderr
    assert not marker.exists()
