"""Manifest schema: round trips, validation errors naming the JSON path, versioning,
latency-table helpers, builder, atomic writes, and a hypothesis robustness property."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.atomic import (atomic_directory, atomic_write_bytes, atomic_write_json,
                            atomic_write_text, atomic_writer)
from runtime.errors import (BundleError, BundleIntegrityError, ManifestError,
                            UnsafePathError)
from export.manifest_builder import add_artifact_file, add_piece, new_manifest, set_execution
from runtime.manifest import (SCHEMA_VERSION, LatencyEntry, Manifest, Piece, TensorSpec,
                              all_skip_configs, load_manifest, save_manifest)

H1 = "1" * 64
H2 = "2" * 64
H3 = "3" * 64
T0 = "2025-01-31T12:00:00+00:00"


def _t(name, shape, dtype="float32"):
    return {"name": name, "shape": shape, "dtype": dtype}


def _piece(pid, kind, stage, skip, logits, file, sha, macs=1000, inputs=None, outputs=None):
    return {
        "id": pid, "kind": kind, "stage": stage, "skip": skip, "returns_logits": logits,
        "inputs": inputs or [_t("x", ["N", 3, 8, 8])],
        "outputs": outputs or ([_t("features", ["N", 4, 8, 8]), _t("logits", [-1, 10])]
                               if logits else [_t("features", ["N", 4, 8, 8])]),
        "macs": macs, "params": 100,
        "artifacts": [{"backend": "onnx", "target": "portable", "file": f"onnx/{file}.onnx",
                       "sha256": sha, "size_bytes": 12, "options": {}},
                      {"backend": "onnxruntime", "target": "cpu", "file": f"ort/{file}.onnx",
                       "sha256": sha, "size_bytes": 12,
                       "options": {"providers": ["CPUExecutionProvider"], "opt_level": 99}}],
    }


def valid_dict() -> dict:
    """S=2. Stage 0 exported as whole-stage variants, stage 1 at finer granularity."""
    return {
        "schema_version": 3,
        "model": {"name": "tiny-ee", "family": "resnet", "num_classes": 10, "params": 1234},
        "input": {"name": "x", "shape": [3, 8, 8], "dtype": "float32", "layout": "NCHW",
                  "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "raw": {"dtype": "uint8", "layout": "HWC", "note": "uint8 HWC 8x8"}},
        "class_names": [f"c{i}" for i in range(10)],
        "stages": 2,
        "skip_configs": ["FF", "FT", "TF", "TT"],
        "exits": [{"index": 0, "stage": 0}, {"index": 1, "stage": 1}],
        "pieces": [
            _piece("stage0.full", "stage", 0, False, True, "s0f", H1, macs=5000),
            _piece("stage0.skip", "stage", 0, True, True, "s0s", H2, macs=3000),
            _piece("stage1.mandatory", "mandatory", 1, False, False, "s1m", H3,
                   inputs=[_t("features", ["N", 4, 8, 8])], outputs=[_t("h", ["N", 8, 4, 4])]),
            _piece("stage1.mandatory_skipnorm", "mandatory", 1, True, False, "s1mn", H3,
                   inputs=[_t("features", ["N", 4, 8, 8])],
                   outputs=[_t("features", ["N", 8, 4, 4])]),
            _piece("stage1.skippable", "skippable", 1, None, False, "s1s", H3,
                   inputs=[_t("h", ["N", 8, 4, 4])], outputs=[_t("features", ["N", 8, 4, 4])]),
            _piece("head1", "head", 1, None, True, "h1", H3, macs=10,
                   inputs=[_t("features", ["N", 4, 8, 8])], outputs=[_t("logits", ["N", 10])]),
        ],
        "execution": {
            "FF": [["stage0.full"], ["stage1.mandatory", "stage1.skippable", "head1"]],
            "FT": [["stage0.full"], ["stage1.mandatory_skipnorm", "head1"]],
            "TF": [["stage0.skip"], ["stage1.mandatory", "stage1.skippable", "head1"]],
            "TT": [["stage0.skip"], ["stage1.mandatory_skipnorm", "head1"]],
        },
        "stopping": {"rule": "max_prob", "params": {"thresholds": [0.9, 0.0]},
                     "val_accuracy": 0.91, "mean_latency_ms": 1.5, "created": T0,
                     "skip_config": "FT",
                     "skip_accuracy": {"FF": 0.91, "FT": 0.9, "TF": 0.89, "TT": 0.88}},
        "latency": [
            {"device": "orin-nx", "backend": "tensorrt", "target": "cuda-sm87", "batch": 1,
             "piece": "stage0.full", "exit": None, "skip_config": None,
             "p50_ms": 1.0, "p90_ms": 1.2, "p95_ms": 1.3, "p99_ms": 1.5, "mean_ms": 1.05,
             "kind": "measured", "fingerprint": {"gpu": "orin", "trt": "10.0"}, "created": T0},
            {"device": "orin-nx", "backend": "tensorrt", "target": "cuda-sm87", "batch": 1,
             "piece": None, "exit": 1, "skip_config": "FT",
             "p50_ms": 2.0, "p90_ms": 2.2, "p95_ms": 2.3, "p99_ms": 2.5, "mean_ms": 2.05,
             "kind": "measured", "fingerprint": {"gpu": "orin", "trt": "10.0"}, "created": T0},
            {"device": "pi5", "backend": "onnxruntime", "target": "cpu", "batch": 1,
             "piece": "head1", "exit": None, "skip_config": None,
             "p50_ms": 0.1, "p90_ms": 0.1, "p95_ms": 0.1, "p99_ms": 0.1, "mean_ms": 0.1,
             "kind": "estimated", "fingerprint": None, "created": T0},
        ],
        "device": None,
        "created": T0,
        "tool_version": "0.1.0",
        "source": {"checkpoint_sha256": "a" * 64, "checkpoint": "runs/x/best.pt",
                   "metrics": {"val_acc_per_exit": [0.8, 0.9]}},
        "annotations": {"export": {"opset": 17}},
        "deployment": None,
    }


# ------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------

def test_round_trip_dict():
    d = valid_dict()
    m = Manifest.from_dict(d)
    assert m.to_dict() == d
    assert Manifest.from_dict(m.to_dict()) == m
    assert m.schema_version == SCHEMA_VERSION == 3
    assert m.piece("head1").kind == "head"
    # deep copy: mutating the input afterwards does not affect the manifest
    d["pieces"][0]["artifacts"][1]["options"]["opt_level"] = 0
    assert m.pieces[0].artifacts[1].options["opt_level"] == 99


def test_round_trip_json_file(tmp_path):
    m = Manifest.from_dict(valid_dict())
    p = save_manifest(m, tmp_path / "manifest.json")
    text = p.read_text("utf-8")
    assert text.endswith("\n") and json.loads(text) == valid_dict()
    assert load_manifest(p) == m
    assert Manifest.from_json(m.to_json()) == m
    assert [f.name for f in tmp_path.iterdir()] == ["manifest.json"]  # no temp leftovers


def test_queries():
    m = Manifest.from_dict(valid_dict())
    assert [[p.id for p in seg] for seg in m.segments("FT")] == [
        ["stage0.full"], ["stage1.mandatory_skipnorm", "head1"]]
    assert m.cumulative_macs("FF", 0) == 5000
    assert m.cumulative_macs("TT", 1) == 3000 + 1000 + 10
    assert m.available_targets() == [("onnx", "portable"), ("onnxruntime", "cpu")]
    assert all_skip_configs(2) == ["FF", "FT", "TF", "TT"]
    assert len(m.artifact_files()) == 12
    with pytest.raises(KeyError):
        m.segments("XX")


# ------------------------------------------------------------------------------------------
# validation errors name the file and the JSON path
# ------------------------------------------------------------------------------------------

def _set(path):
    def mut(d, value):
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        cur[path[-1]] = value
    return mut


def _del(path):
    def mut(d, _):
        cur = d
        for k in path[:-1]:
            cur = cur[k]
        del cur[path[-1]]
    return mut


CORRUPTIONS = [
    # (mutation, value, expected message fragment)
    (_set(["model", "num_classes"]), "10", "manifest.json: model.num_classes: expected an integer"),
    (_set(["model", "num_classes"]), True, "model.num_classes: expected an integer, got boolean"),
    (_set(["stages"]), 2.0, "stages: expected an integer"),
    (_del(["pieces", 0, "macs"]), None, "manifest.json: pieces[0].macs: missing required field"),
    (_del(["model"]), None, "manifest.json: model: missing required field"),
    (_set(["pieces", 2, "artifacts", 0, "sha256"]), "abc",
     "manifest.json: pieces[2].artifacts[0].sha256: expected 64 hex chars"),
    (_set(["pieces", 2, "artifacts", 0, "sha256"]), "A" * 64,
     "pieces[2].artifacts[0].sha256: expected 64 hex chars"),
    (_set(["pieces", 1, "artifacts", 1, "size_bytes"]), -1,
     "pieces[1].artifacts[1].size_bytes: expected an integer >= 0"),
    (_set(["pieces", 0, "artifacts", 0, "backend"]), "openvino",
     "pieces[0].artifacts[0].backend: expected one of 'onnx'"),
    (_set(["execution", "FF", 1, 0]), "stage1.nope",
     "manifest.json: execution.FF[1][0]: piece 'stage1.nope' is not defined in pieces"),
    (_set(["skip_configs", 1]), "FTF",
     "manifest.json: skip_configs[1]: expected a string of 2 chars, each 'T' or 'F'"),
    (_set(["skip_configs", 1]), "FX", "skip_configs[1]: expected a string of 2 chars"),
    (_set(["skip_configs", 1]), "FF", "skip_configs[1]: duplicate skip config 'FF'"),
    (_set(["execution", "TTT"]), [], "execution.TTT: skip config 'TTT' is not one of skip_configs"),
    (_del(["execution", "TF"]), None, "execution.TF: missing execution plan"),
    (_set(["execution", "FF"]), [["stage0.full"]], "execution.FF: expected 2 segments"),
    (_set(["execution", "FT", 1]), ["stage1.mandatory_skipnorm"],
     "execution.FT[1][0]: the last piece of a segment must return logits"),
    (_set(["execution", "FT", 1]), ["head1", "stage1.mandatory_skipnorm"],
     "execution.FT[1][0]: only the last piece of a segment may return logits"),
    (_set(["execution", "FT", 0]), ["stage0.skip"],
     "execution.FT[0][0]: piece 'stage0.skip' has skip=true but config 'FT' runs stage 0"),
    (_set(["execution", "FT", 1]), ["stage1.mandatory_skipnorm", "stage1.skippable", "head1"],
     "execution.FT[1][1]: piece 'stage1.skippable' is the skippable sub-path"),
    (_set(["execution", "FF", 0]), ["head1"],
     "execution.FF[0][0]: piece 'head1' belongs to stage 1"),
    (_set(["pieces", 5, "inputs", 0, "name"]), "feats",
     "execution.FF[1][2]: piece 'head1' reads tensor 'feats', which neither the model input"),
    (_set(["execution", "FF", 1]), ["stage1.skippable", "head1"],
     "execution.FF[1][0]: piece 'stage1.skippable' reads tensor 'h'"),
    (_set(["pieces", 0, "outputs", 1, "name"]), "out",
     "pieces[0].outputs: returns_logits is true but no output is named 'logits'"),
    (_del(["input", "name"]), None, "input.name: missing required field"),
    (_set(["bogus"]), 1, "manifest.json: bogus: unknown key"),
    (_set(["pieces", 0, "colour"]), "red", "pieces[0].colour: unknown key"),
    (_set(["class_names"]), ["a"], "class_names: expected 10 names (model.num_classes), got 1"),
    (_set(["input", "mean"]), [0.5, 0.5], "input.mean: expected 3 values"),
    (_set(["input", "std", 1]), 0, "input.std[1]: expected a number > 0.0"),
    (_set(["input", "shape"]), [3, 8], "input.shape: expected at least 3 item(s)"),
    (_set(["exits", 1, "stage"]), 0, "exits[1]: exit 1 must have index 1 and follow stage 1"),
    (_set(["pieces", 1, "id"]), "stage0.full", "pieces[1].id: duplicate piece id 'stage0.full'"),
    (_set(["pieces", 0, "inputs", 0, "shape", 0]), "B",
     "pieces[0].inputs[0].shape[0]: expected an integer >= 1, or \"N\" or -1"),
    (_set(["pieces", 0, "stage"]), 2, "pieces[0].stage: expected an integer <= 1"),
    (_set(["latency", 2, "kind"]), "measured",
     "latency[2].fingerprint: a measured entry needs a fingerprint"),
    (_set(["latency", 1, "kind"]), "estimated",
     "latency[1].kind: 'estimated' mixed with 'measured' (latency[0])"),
    (_set(["latency", 0, "p99_ms"]), 0.5, "latency[0].p99_ms: percentiles must be non-decreasing"),
    (_set(["latency", 0, "piece"]), "ghost", "latency[0].piece: piece 'ghost' is not defined"),
    (_set(["latency", 0, "exit"]), 1, "latency[0]: give either 'piece' or"),
    (_set(["created"]), "2025-01-31T12:00:00", "created: ISO time must carry a timezone"),
    (_set(["created"]), "yesterday", "created: expected an ISO 8601 time"),
    (_set(["stopping", "rule"]), None, "stopping.params: must be empty/null while stopping.rule"),
    (_set(["source", "checkpoint_sha256"]), "xyz", "source.checkpoint_sha256: expected 64 hex"),
    (_set(["annotations"]), {"x": float("nan")}, "annotations.x: NaN/Infinity"),
    (_set(["device"]), "bad device!", "device: expected a device profile name"),
    (_set(["pieces", 3, "artifacts", 0, "sha256"]), H1,
     "pieces[3].artifacts[0]: file 'onnx/s1m.onnx' is also listed at pieces[2].artifacts[0]"),
]


@pytest.mark.parametrize("mut,value,expected", CORRUPTIONS,
                         ids=[c[2][:50] for c in CORRUPTIONS])
def test_validation_errors_name_json_path(mut, value, expected):
    d = valid_dict()
    if expected.startswith("pieces[3].artifacts[0]: file"):
        d["pieces"][3]["artifacts"][0]["file"] = "onnx/s1m.onnx"  # shared file, other hash
    mut(d, value)
    with pytest.raises(ManifestError) as ei:
        Manifest.from_dict(d)
    assert expected in str(ei.value), str(ei.value)
    assert str(ei.value).startswith("manifest.json: ")
    assert isinstance(ei.value, BundleError)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "onnx/../../x", "a//b", "C:/x",
                                 "a\\b", "manifest.json", ""])
def test_unsafe_artifact_path_refused(bad):
    d = valid_dict()
    d["pieces"][2]["artifacts"][0]["file"] = bad
    with pytest.raises(UnsafePathError) as ei:
        Manifest.from_dict(d, source="/b/manifest.json")
    e = ei.value
    assert isinstance(e, ManifestError) and isinstance(e, BundleIntegrityError)
    assert str(e).startswith("/b/manifest.json: pieces[2].artifacts[0].file: ")
    assert e.json_path == "pieces[2].artifacts[0].file"


def test_shared_artifact_file_with_same_hash_is_allowed():
    d = valid_dict()
    d["pieces"][3]["artifacts"][0]["file"] = "onnx/s1m.onnx"  # same sha256/size as pieces[2]
    Manifest.from_dict(d)


def test_future_schema_version_refused():
    d = valid_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    d["brand_new_field"] = {"x": 1}  # unknown keys of a newer schema: still the upgrade message
    with pytest.raises(ManifestError, match="written by a newer version of the tool: upgrade"):
        Manifest.from_dict(d)
    for bad, msg in ((0, "expected an integer >= 1"), ("1", "expected an integer"),
                     (None, "expected an integer")):
        d["schema_version"] = bad
        with pytest.raises(ManifestError, match=msg):
            Manifest.from_dict(d)


def test_load_manifest_file_errors_name_the_file(tmp_path):
    p = tmp_path / "manifest.json"
    for text, msg in (("{not json", "invalid JSON at line 1"),
                      ('{"a": 1, "a": 2}', "duplicate key 'a'"),
                      ('{"schema_version": NaN}', "NaN is not valid JSON"),
                      ("[1, 2]", "expected a JSON object at top level"),
                      ("[" * 100000 + "]" * 100000, "nested too deeply")):
        p.write_text(text)
        with pytest.raises(ManifestError) as ei:
            load_manifest(p)
        assert str(ei.value).startswith(f"{p}: ") and msg in str(ei.value), str(ei.value)
    p.write_bytes(b"\xff\xfe")
    with pytest.raises(ManifestError, match="not valid UTF-8"):
        load_manifest(p)
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifest(tmp_path / "missing.json")


def test_save_manifest_refuses_invalid_and_keeps_old_file(tmp_path):
    p = tmp_path / "manifest.json"
    m = Manifest.from_dict(valid_dict())
    save_manifest(m, p)
    before = p.read_bytes()
    m.pieces[0].macs = -5
    with pytest.raises(ManifestError, match=r"pieces\[0\]\.macs"):
        save_manifest(m, p)
    m.pieces[0].macs = "many"
    with pytest.raises(ManifestError, match=r"pieces\[0\]\.macs: expected an integer"):
        m.validate()
    assert p.read_bytes() == before


# ------------------------------------------------------------------------------------------
# latency table helpers
# ------------------------------------------------------------------------------------------

def _lat(device="pi5", backend="onnxruntime", kind="estimated", piece="head1", p=1.0,
         batch=1):
    return LatencyEntry(device=device, backend=backend, target="cpu", batch=batch, piece=piece,
                        p50_ms=p, p90_ms=p, p95_ms=p, p99_ms=p, mean_ms=p, kind=kind,
                        fingerprint={"cpu": "a76"} if kind == "measured" else None, created=T0)


def test_replace_latency_measured_replaces_estimated_never_mixed():
    m = Manifest.from_dict(valid_dict())
    assert m.latency_kind("pi5", "onnxruntime", 1) == "estimated"
    removed = m.replace_latency([_lat(kind="measured", piece="stage0.full", p=3.0),
                                 _lat(kind="measured", piece="head1", p=0.2)])
    assert removed == 1
    g = m.latency_group("pi5", "onnxruntime", 1)
    assert {e.kind for e in g} == {"measured"} and len(g) == 2
    assert m.find_latency("pi5", "onnxruntime", piece="head1").p50_ms == 0.2
    m.validate()
    # estimated never silently replaces measured
    with pytest.raises(ManifestError, match="already measured"):
        m.replace_latency([_lat(kind="estimated")])
    assert m.latency_kind("pi5", "onnxruntime", 1) == "measured"
    m.replace_latency([_lat(kind="estimated")], allow_downgrade=True)
    assert m.latency_kind("pi5", "onnxruntime", 1) == "estimated"
    # one call may not mix kinds within a group; other groups untouched
    with pytest.raises(ManifestError, match="mix"):
        m.replace_latency([_lat(kind="estimated"), _lat(kind="measured", piece="stage0.full")])
    assert m.latency_kind("orin-nx", "tensorrt", 1) == "measured"
    m.replace_latency([_lat(kind="measured", batch=8)])
    assert m.latency_kind("pi5", "onnxruntime", 8) == "measured"
    assert m.latency_kind("pi5", "onnxruntime", 1) == "estimated"
    m.validate()


# ------------------------------------------------------------------------------------------
# builder
# ------------------------------------------------------------------------------------------

def test_new_manifest_builder(tmp_path):
    m = new_manifest(model_name="tiny", family="resnet", num_classes=3, params=10,
                     input_shape=[1, 4, 4], mean=[0.5], std=[0.5], stages=1,
                     tool_version="0.1.0")
    assert m.skip_configs == ["F", "T"] and m.class_names == ["0", "1", "2"]
    with pytest.raises(ManifestError, match="pieces: expected at least 1"):
        m.validate()
    (tmp_path / "onnx").mkdir()
    for variant, skip in (("full", False), ("skip", True)):
        pid = f"stage0.{variant}"
        add_piece(m, Piece(id=pid, kind="stage", stage=0, skip=skip, returns_logits=True,
                          inputs=[TensorSpec("x", ["N", 1, 4, 4])],
                          outputs=[TensorSpec("features", ["N", 2, 4, 4]),
                                   TensorSpec("logits", ["N", 3])], macs=10, params=5))
        (tmp_path / "onnx" / f"{pid}.onnx").write_bytes(pid.encode())
        a = add_artifact_file(m, tmp_path, pid, f"onnx/{pid}.onnx", backend="onnx",
                                target="portable")
        assert a.size_bytes == len(pid) and len(a.sha256) == 64
    with pytest.raises(ValueError, match="duplicate piece id"):
        add_piece(m, m.pieces[0])
    with pytest.raises(ValueError, match="already has an artifact"):
        add_artifact_file(m, tmp_path, "stage0.full", "onnx/stage0.full.onnx", backend="onnx",
                            target="portable")
    with pytest.raises(ManifestError, match="execution.F: missing execution plan"):
        m.validate()
    set_execution(m, "F", [["stage0.full"]])
    set_execution(m, "T", [("stage0.skip",)])
    m.validate()
    save_manifest(m, tmp_path / "manifest.json")
    assert load_manifest(tmp_path / "manifest.json") == m


# ------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------

def _leftovers(d):
    return sorted(n for n in os.listdir(d) if ".tmp-" in n or ".old-" in n)


def test_atomic_write_keeps_old_file_when_writer_raises(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old contents")
    os.chmod(p, 0o640)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_writer(p) as f:
            f.write(b"new half")
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old contents" and _leftovers(tmp_path) == []
    with pytest.raises(ValueError):  # NaN is refused before touching the disk
        atomic_write_json(p, {"x": float("nan")})
    assert p.read_bytes() == b"old contents" and _leftovers(tmp_path) == []
    atomic_write_text(p, "héllo\n")
    assert p.read_bytes() == "héllo\n".encode() and (os.stat(p).st_mode & 0o777) == 0o640
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1.5]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"b": 1, "a": [1.5]}
    assert _leftovers(tmp_path) == []


def test_atomic_directory(tmp_path):
    dst = tmp_path / "out" / "bundle"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(dst) as tmp:
            assert tmp.parent == dst.parent and tmp.name.startswith(".bundle.tmp-")
            (tmp / "a").write_text("x")
            raise KeyboardInterrupt
    assert not dst.exists() and _leftovers(dst.parent) == []
    with atomic_directory(dst) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("v1")
    assert (dst / "sub" / "f").read_text() == "v1"
    with pytest.raises(FileExistsError):
        with atomic_directory(dst):
            pass
    with pytest.raises(OSError):
        with atomic_directory(dst, overwrite=True) as tmp:
            (tmp / "f").write_text("v2")
            raise OSError("disk full")
    assert (dst / "sub" / "f").read_text() == "v1" and _leftovers(dst.parent) == []
    with atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "f").write_text("v2")
    assert (dst / "f").read_text() == "v2" and not (dst / "sub").exists()
    assert _leftovers(dst.parent) == []


# ------------------------------------------------------------------------------------------
# property: any input either parses or raises ManifestError, never anything else
# ------------------------------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
            | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
            | st.sampled_from(["N", "FT", "TF", "F" * 64, "onnx", "stage", "measured", H1, T0,
                               "../x", "stage0.full", "head1", ""]))
_json = st.recursive(_scalars, lambda ch: st.lists(ch, max_size=4)
                     | st.dictionaries(st.text(max_size=8), ch, max_size=4), max_leaves=20)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


_ALL_PATHS = list(_paths(valid_dict()))


def _check(d):
    try:
        m = Manifest.from_dict(d)
    except ManifestError as e:
        assert str(e).startswith("manifest.json")
        return
    # whatever parses must round-trip and serialise as strict JSON
    assert Manifest.from_dict(json.loads(m.to_json())) == m


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_json)
def test_property_random_json_never_crashes(value):
    _check(value)
    _check({"schema_version": 1, **value} if isinstance(value, dict) else value)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(_ALL_PATHS), st.sampled_from(["set", "del", "add"]),
                          _json), min_size=1, max_size=3))
def test_property_mutated_manifest_parses_or_manifest_error(mutations):
    d = valid_dict()
    for path, op, value in mutations:
        cur, ok = d, True
        for k in path[:-1]:
            try:
                cur = cur[k]
            except (KeyError, IndexError, TypeError):
                ok = False
                break
        if not ok:
            continue
        if not path:
            d = value if op == "set" else d
            continue
        k = path[-1]
        try:
            if op == "set":
                cur[k] = value
            elif op == "del":
                del cur[k]
            elif isinstance(cur, dict):
                cur["extra_" + str(k)] = value
            elif isinstance(cur, list):
                cur.append(value)
        except (KeyError, IndexError, TypeError):
            pass
    _check(copy.deepcopy(d))


# ------------------------------------------------------------------------------------------
# schema v2: deployment record and stopping fields; v1 manifests still load
# ------------------------------------------------------------------------------------------

def _deployment() -> dict:
    return {"profile": "orin-nx", "backend_order": ["tensorrt", "onnxruntime"], "targets": [
        {"backend": "onnx", "target": "portable", "requires": {},
         "runner_options": {"providers": ["CPUExecutionProvider"], "intra_op_threads": 6}}]}


def test_deployment_record_round_trips_and_is_validated():
    d = valid_dict()
    d["deployment"] = _deployment()
    m = Manifest.from_dict(d)
    t = m.deployment.target("onnx", "portable")
    assert t.runner_options["intra_op_threads"] == 6 and t.requires.arch is None
    assert Manifest.from_dict(m.to_dict()).to_dict() == m.to_dict()
    bad = [
        (["targets", 0, "runner_options", "intra_op_thread"], 1,
         "deployment.targets[0].runner_options.intra_op_thread: unknown onnxruntime runner "
         "option (known: allow_spinning, graph_optimization_level"),
        (["backend_order", 0], "cuda", "deployment.backend_order[0]: expected one of"),
        (["targets", 0, "target"], "aarch64-cpu",
         "deployment.targets[0]: no onnx artifacts for target 'aarch64-cpu' cover"),
        (["targets", 0, "requires", "gpu_compute_capability"], "sm87",
         "deployment.targets[0].requires.gpu_compute_capability: expected 'major.minor'"),
    ]
    for path, value, message in bad:
        d = valid_dict()
        d["deployment"] = _deployment()
        node = d["deployment"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ManifestError) as err:
            Manifest.from_dict(d)
        assert message in str(err.value), (path, str(err.value))


def test_stopping_skip_fields_are_validated():
    for field_, value, message in (
            ("skip_config", "FFF", "stopping.skip_config: 'FFF' is not one of skip_configs"),
            ("skip_accuracy", {"FF": 0.9}, "expected an accuracy for every skip config (4)"),
            ("skip_accuracy", {"FF": 1.5, "FT": 0.9, "TF": 0.9, "TT": 0.9},
             "stopping.skip_accuracy.FF: expected a number <= 1.0")):
        d = valid_dict()
        d["stopping"][field_] = value
        with pytest.raises(ManifestError, match=re.escape(message)):
            Manifest.from_dict(d)


def test_v1_manifest_loads_with_its_annotations_moved_into_the_schema():
    d = valid_dict()
    d["schema_version"] = 1
    del d["deployment"]
    acc = d["stopping"].pop("skip_accuracy")
    del d["stopping"]["skip_config"]
    d["device"] = "orin-nx"
    d["annotations"] = {"skip_accuracy": acc, "calibration": {"skip_config": "TF"},
                        "compile": {"backend_order": ["tensorrt", "onnxruntime"]}}
    m = Manifest.from_dict(d)
    assert m.schema_version == SCHEMA_VERSION  # upgraded in memory
    assert m.stopping.skip_accuracy == acc and m.stopping.skip_config == "TF"
    assert m.deployment.profile == "orin-nx"
    assert m.deployment.backend_order == ["tensorrt", "onnxruntime"]
    assert {(t.backend, t.target) for t in m.deployment.targets} == set(m.available_targets())
    # the upgraded manifest is a valid v2 manifest
    assert Manifest.from_dict(m.to_dict()).deployment == m.deployment
