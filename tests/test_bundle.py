"""Bundle directories (integrity, path safety) and bundle archives (deterministic pack,
safe unpack)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
from pathlib import Path

import pytest

from export.archive import pack_bundle
from runtime.archive import unpack_bundle
from runtime.bundle import Bundle
from runtime.errors import (ArchiveError, ArtifactNotFoundError, BundleError,
                            BundleIntegrityError, ManifestError, UnsafePathError)
from export.manifest_builder import add_artifact_file, add_piece, new_manifest, set_execution
from runtime.manifest import (Piece, TensorSpec, load_manifest, save_manifest, sha256_file)


def make_bundle(root: Path) -> Bundle:
    """A valid 2-stage bundle with whole-stage pieces, ONNX + two TVM targets."""
    m = new_manifest(model_name="tiny-ee", family="resnet", num_classes=4, params=99,
                     input_shape=[3, 8, 8], mean=[0.5] * 3, std=[0.25] * 3, stages=2,
                     tool_version="0.1.0", device=None)
    root.mkdir(parents=True)
    for s in range(2):
        for variant, skip in (("full", False), ("skip", True)):
            pid = f"stage{s}.{variant}"
            add_piece(m, Piece(id=pid, kind="stage", stage=s, skip=skip, returns_logits=True,
                              inputs=[TensorSpec("x", ["N", 3, 8, 8])],
                              outputs=[TensorSpec("features", ["N", 3, 8, 8]),
                                       TensorSpec("logits", ["N", 4])],
                              macs=100 * (s + 1), params=10))
            for backend, target, rel in (("onnx", "portable", f"onnx/{pid}.onnx"),
                                         ("tvm", "x86_64-llvm", f"tvm/x86_64-llvm/{pid}.so"),
                                         ("tvm", "aarch64-cortex-a78ae",
                                          f"tvm/aarch64-cortex-a78ae/{pid}.so")):
                f = root / rel
                f.parent.mkdir(parents=True, exist_ok=True)
                f.write_bytes(f"{backend}:{target}:{pid}:".encode() * 50)
                add_artifact_file(m, root, pid, rel, backend=backend, target=target,
                                    options={"opt_level": 3} if backend == "tvm" else {})
    for cfg in m.skip_configs:
        set_execution(m, cfg, [[f"stage{k}.{'skip' if c == 'T' else 'full'}"]
                              for k, c in enumerate(cfg)])
    save_manifest(m, root / "manifest.json")
    return Bundle.open(root)


@pytest.fixture
def bundle(tmp_path) -> Bundle:
    return make_bundle(tmp_path / "b")


def _rewrite_manifest(root: Path, fn) -> None:
    d = json.loads((root / "manifest.json").read_text())
    fn(d)
    (root / "manifest.json").write_text(json.dumps(d))


# ------------------------------------------------------------------------------------------
# bundle directory
# ------------------------------------------------------------------------------------------

def test_good_bundle_verifies_and_resolves(bundle):
    root = bundle.root
    assert bundle.check() == []
    b = Bundle.open(root)
    assert b.manifest == load_manifest(root / "manifest.json")
    p = b.artifact_path("stage1.skip", "onnx")
    assert p == root / "onnx" / "stage1.skip.onnx" and p.is_file()
    p = b.artifact_path("stage0.full", "tvm", "aarch64-cortex-a78ae")
    assert p == root / "tvm" / "aarch64-cortex-a78ae" / "stage0.full.so"
    assert b.read_artifact("stage0.full", "onnx") == p.parent.parent.parent.joinpath(
        "onnx/stage0.full.onnx").read_bytes()
    with pytest.raises(ArtifactNotFoundError, match="several tvm artifacts"):
        b.artifact_path("stage0.full", "tvm")
    with pytest.raises(ArtifactNotFoundError, match="no artifact for tensorrt") as ei:
        b.artifact_path("stage0.full", "tensorrt")
    assert str(ei.value).startswith(str(root / "manifest.json"))
    with pytest.raises(ArtifactNotFoundError, match="no piece 'nope'"):
        b.artifact_path("nope", "onnx")
    assert b.files()[0] == "manifest.json" and len(b.files()) == 1 + 12
    assert b.unlisted_files() == []
    b.verify(backend="tvm", target="x86_64-llvm")
    assert b.manifest.available_targets() == [("onnx", "portable"),
                                              ("tvm", "aarch64-cortex-a78ae"),
                                              ("tvm", "x86_64-llvm")]


def test_flipped_byte_detected(bundle):
    f = bundle.root / "onnx" / "stage1.full.onnx"
    data = bytearray(f.read_bytes())
    data[17] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch") as ei:
        Bundle.open(bundle.root)
    assert ei.value.file == str(f) and str(ei.value).startswith(str(f))
    assert ei.value.relpath == "onnx/stage1.full.onnx"
    with pytest.raises(BundleIntegrityError, match="sha256 mismatch"):
        bundle.read_artifact("stage1.full", "onnx")
    # opening without verification works; the other backends are still fine
    b = Bundle.open(bundle.root, verify=False)
    b.verify(backend="tvm")
    b.verify(checksums=False)  # size unchanged


def test_truncation_detected(bundle):
    f = bundle.root / "tvm" / "x86_64-llvm" / "stage0.skip.so"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(BundleIntegrityError, match="truncated: manifest says") as ei:
        Bundle.open(bundle.root)
    assert str(f) in str(ei.value)
    with pytest.raises(BundleIntegrityError, match="truncated"):
        bundle.verify(checksums=False)


def test_missing_file_detected_and_all_problems_counted(bundle):
    f = bundle.root / "onnx" / "stage0.full.onnx"
    f.unlink()
    (bundle.root / "onnx" / "stage0.skip.onnx").write_bytes(b"x")
    with pytest.raises(BundleIntegrityError) as ei:
        Bundle.open(bundle.root)
    msg = str(ei.value)
    assert msg.startswith(f"{f}: missing file") and "and 1 more problem(s)" in msg
    assert len(bundle.check()) == 2
    with pytest.raises(BundleIntegrityError, match="missing file"):
        bundle.artifact_path("stage0.full", "onnx")


def test_missing_or_bad_manifest(tmp_path, bundle):
    with pytest.raises(BundleIntegrityError, match="missing manifest"):
        Bundle.open(tmp_path)
    with pytest.raises(BundleIntegrityError, match="bundle directory not found"):
        Bundle.open(tmp_path / "nope")
    _rewrite_manifest(bundle.root, lambda d: d["pieces"][0].__setitem__("macs", "x"))
    with pytest.raises(ManifestError) as ei:
        Bundle.open(bundle.root)
    assert str(ei.value).startswith(str(bundle.root / "manifest.json") + ": pieces[0].macs")


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "onnx/../../outside.bin"])
def test_path_traversal_in_manifest_refused(bundle, bad):
    (bundle.root.parent / "x").write_bytes(b"secret")
    _rewrite_manifest(bundle.root,
                      lambda d: d["pieces"][1]["artifacts"][0].__setitem__("file", bad))
    with pytest.raises(BundleIntegrityError) as ei:  # UnsafePathError: both kinds
        Bundle.open(bundle.root)
    e = ei.value
    assert isinstance(e, UnsafePathError) and isinstance(e, ManifestError)
    assert str(e).startswith(str(bundle.root / "manifest.json"))
    assert "pieces[1].artifacts[0].file" in str(e) and repr(bad) in str(e)


def test_unvalidated_in_memory_manifest_cannot_escape(bundle):
    m = bundle.manifest.copy()
    m.pieces[0].artifacts[0].file = "../x"  # bypasses from_dict validation
    b = Bundle(root=bundle.root, manifest=m)
    with pytest.raises(UnsafePathError, match="escapes the bundle") as ei:
        b.verify()
    assert ei.value.relpath == "../x"
    with pytest.raises(UnsafePathError):
        b.artifact_path("stage0.full", "onnx")


def test_symlink_to_outside_refused(bundle, tmp_path):
    f = bundle.root / "onnx" / "stage0.full.onnx"
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(f.read_bytes())  # same content: only the symlink is wrong
    f.unlink()
    f.symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink pointing outside the bundle") as ei:
        Bundle.open(bundle.root)
    assert str(ei.value).startswith(str(f))
    # a symlinked directory is caught too, and so is a symlink staying inside
    f.unlink()
    f.write_bytes(outside.read_bytes())
    Bundle.open(bundle.root)
    d = bundle.root / "tvm" / "x86_64-llvm"
    d.rename(tmp_path / "moved")
    d.symlink_to(tmp_path / "moved")
    with pytest.raises(UnsafePathError, match="pointing outside"):
        Bundle.open(bundle.root)
    d.unlink()
    (tmp_path / "moved").rename(d)
    inner = bundle.root / "onnx" / "stage1.full.onnx"
    (bundle.root / "copy.onnx").write_bytes(inner.read_bytes())
    inner.unlink()
    inner.symlink_to(bundle.root / "copy.onnx")
    with pytest.raises(UnsafePathError, match="symlink in path"):
        Bundle.open(bundle.root)


def test_manifest_symlink_refused(bundle, tmp_path):
    mp = bundle.root / "manifest.json"
    (tmp_path / "m.json").write_bytes(mp.read_bytes())
    mp.unlink()
    mp.symlink_to(tmp_path / "m.json")
    with pytest.raises(UnsafePathError, match="manifest is a symlink"):
        Bundle.open(bundle.root)


def test_artifact_replaced_by_directory(bundle):
    f = bundle.root / "onnx" / "stage0.full.onnx"
    f.unlink()
    f.mkdir()
    with pytest.raises(BundleIntegrityError, match="not a regular file"):
        Bundle.open(bundle.root)


# ------------------------------------------------------------------------------------------
# archives
# ------------------------------------------------------------------------------------------

def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_tar_round_trip_and_determinism(bundle, tmp_path):
    a1 = pack_bundle(bundle.root, tmp_path / "a1.tar.gz")
    with tarfile.open(a1) as tf:
        names = tf.getnames()
        assert names[:2] == ["b", "b/manifest.json"]
        assert all(n == "b" or n.startswith("b/") for n in names)
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tf.getmembers())
    # different mtimes / creation order on disk -> same bytes
    later = time.time() + 1000
    for p in bundle.root.rglob("*"):
        os.utime(p, (later, later))
    a2 = pack_bundle(bundle.root, tmp_path / "a2.tar.gz")
    assert a1.read_bytes() == a2.read_bytes()
    out = unpack_bundle(a1, tmp_path / "deploy" / "bundle")
    assert out == tmp_path / "deploy" / "bundle"
    assert _tree(out) == _tree(bundle.root)
    b = Bundle.open(out)
    assert b.manifest == bundle.manifest
    assert sha256_file(b.artifact_path("stage1.skip", "onnx")) == \
        b.artifact("stage1.skip", "onnx").sha256
    # existing destination: refused unless overwrite
    with pytest.raises(ArchiveError, match="already exists"):
        unpack_bundle(a1, out)
    (out / "junk").write_text("old")
    unpack_bundle(a1, out, overwrite=True)
    assert not (out / "junk").exists() and Bundle.open(out).check() == []
    assert [n for n in os.listdir(out.parent) if n != "bundle"] == []


def test_pack_refuses_broken_bundle_and_symlinks(bundle, tmp_path):
    (bundle.root / "extra.txt").symlink_to("/etc/hostname")
    with pytest.raises(ArchiveError, match="cannot pack a symlink") as ei:
        pack_bundle(bundle.root, tmp_path / "a.tar.gz")
    assert "extra.txt" in str(ei.value)
    (bundle.root / "extra.txt").unlink()
    with pytest.raises(ArchiveError, match="inside the bundle"):
        pack_bundle(bundle.root, bundle.root / "self.tar.gz")
    (bundle.root / "onnx" / "stage0.full.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleIntegrityError):
        pack_bundle(bundle.root, tmp_path / "a.tar.gz")
    assert not (tmp_path / "a.tar.gz").exists()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def _evil_archive(path: Path, bundle: Bundle, extra: list[tuple[tarfile.TarInfo, bytes]],
                  top: str = "b") -> Path:
    """The good bundle's members plus ``extra`` members, appended after them."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for rel, data in sorted(_tree(bundle.root).items()):
            ti = tarfile.TarInfo(f"{top}/{rel}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        for ti, data in extra:
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return path


def _ti(name, type_=tarfile.REGTYPE, size=0, linkname=""):
    ti = tarfile.TarInfo(name)
    ti.type = type_
    ti.size = size
    ti.linkname = linkname
    return ti


EVIL = [
    ("absolute", _ti("/tmp/evil", size=4), b"evil", "absolute path"),
    ("dotdot", _ti("b/../../evil", size=4), b"evil", "'..' component"),
    ("dotdot-top", _ti("../evil", size=4), b"evil", "'..' component"),
    ("symlink", _ti("b/onnx/link", tarfile.SYMTYPE, linkname="/etc/passwd"), b"", "symlink"),
    ("symlink-rel", _ti("b/link", tarfile.SYMTYPE, linkname="../../.."), b"", "symlink"),
    ("hardlink", _ti("b/hl", tarfile.LNKTYPE, linkname="/etc/passwd"), b"", "hard link"),
    ("chardev", _ti("b/dev", tarfile.CHRTYPE), b"", "device file"),
    ("fifo", _ti("b/fifo", tarfile.FIFOTYPE), b"", "FIFO"),
    ("outside-top", _ti("other/x", size=4), b"evil", "outside the bundle directory"),
    ("duplicate", _ti("b/manifest.json", size=2), b"{}", "duplicate member name"),
    ("backslash", _ti("b\\..\\evil", size=4), b"evil", "backslash"),
]


@pytest.mark.parametrize("case,ti,data,msg", EVIL, ids=[e[0] for e in EVIL])
def test_malicious_members_refused_nothing_written(bundle, tmp_path, case, ti, data, msg):
    arc = _evil_archive(tmp_path / f"{case}.tar.gz", bundle, [(ti, data)])
    dest_parent = tmp_path / "deploy"
    dest_parent.mkdir()
    with pytest.raises(ArchiveError, match=msg) as ei:
        unpack_bundle(arc, dest_parent / "bundle")
    e = ei.value
    assert str(e).startswith(str(arc)) and e.member == ti.name and repr(ti.name) in str(e)
    assert os.listdir(dest_parent) == []  # nothing half-written, no temp dir left
    assert not (tmp_path / "evil").exists() and not Path("/tmp/evil").exists()


def test_tampered_archive_content_fails_verification_atomically(bundle, tmp_path):
    arc = tmp_path / "t.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        for rel, data in sorted(_tree(bundle.root).items()):
            if rel == "onnx/stage1.full.onnx":
                data = data[:-1] + bytes([data[-1] ^ 1])
            ti = tarfile.TarInfo(f"b/{rel}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    dest_parent = tmp_path / "deploy"
    dest_parent.mkdir()
    with pytest.raises(ArchiveError, match="sha256 mismatch") as ei:
        unpack_bundle(arc, dest_parent / "bundle")
    assert ei.value.member == "b/onnx/stage1.full.onnx"
    assert os.listdir(dest_parent) == []


def test_unreadable_or_non_bundle_archives(bundle, tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"definitely not gzip")
    with pytest.raises(ArchiveError, match="not a readable .tar.gz") as ei:
        unpack_bundle(junk, tmp_path / "d")
    assert str(ei.value).startswith(str(junk))
    good = pack_bundle(bundle.root, tmp_path / "g.tar.gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ArchiveError):
        unpack_bundle(cut, tmp_path / "d")
    flat = tmp_path / "flat.tar.gz"
    with tarfile.open(flat, "w:gz") as tf:
        tf.add(bundle.root / "manifest.json", arcname="manifest.json")
    with pytest.raises(ArchiveError, match="top level is outside the bundle directory"):
        unpack_bundle(flat, tmp_path / "d")
    nomani = _evil_archive(tmp_path / "nm.tar.gz", bundle, [], top="b")
    with tarfile.open(nomani) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()
                   if m.name != "b/manifest.json"]
    with tarfile.open(nomani, "w:gz") as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    with pytest.raises(ArchiveError, match="no b/manifest.json"):
        unpack_bundle(nomani, tmp_path / "d")
    with pytest.raises(ArchiveError, match="too many members"):
        unpack_bundle(good, tmp_path / "d", max_members=3)
    assert not (tmp_path / "d").exists()
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []


def test_errors_are_bundle_errors_and_pickle():
    import pickle
    for e in (ArchiveError("a.tar.gz", "bad", member="x"),
              UnsafePathError("m.json", "escapes", json_path="pieces[0].file"),
              BundleIntegrityError("f", "missing file", relpath="f")):
        assert isinstance(e, BundleError)
        e2 = pickle.loads(pickle.dumps(e))
        assert str(e2) == str(e) and type(e2) is type(e)


def test_runtime_imports_stay_light():
    import subprocess
    import sys
    code = ("import sys, runtime.manifest, runtime.bundle, runtime.archive, runtime.atomic; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'train', 'export', 'devices', 'pipeline', 'onnx', 'onnxruntime', 'tvm', "
            "'tensorrt')]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
