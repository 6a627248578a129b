"""Merged pieces: stages k..j plus head j as one artifact (export/merge.py, manifest, executor).

Real code paths only: an untrained resnet20_adn (3 stages, 1x28x28 synthetic images) exported,
compiled for the host's ONNX Runtime, merged pieces composed from its ONNX files and run with
ONNX Runtime through the SegmentExecutor.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from export.compile import compile_bundle
from export.errors import ExportError
from export.merge import add_merged_pieces
from export.portable import export_checkpoint
from runtime.bundle import Bundle
from runtime.errors import ManifestError
from runtime.executor import SegmentExecutor
from runtime.manifest import MANIFEST_NAME, Manifest, load_manifest, save_manifest

from test_export import make_checkpoint

ORT = {"intra_op_threads": 1}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ckpt")
    return make_checkpoint(root / "r20.pt", "resnet20_adn", "synthetic:chans=1,size=28")


@pytest.fixture(scope="module")
def host_bundle(checkpoint, tmp_path_factory) -> Path:
    """An onnxruntime device bundle (x86-host) of an untrained resnet20_adn, no merged pieces."""
    root = tmp_path_factory.mktemp("merge")
    portable = export_checkpoint(checkpoint, root / "r20", parity_samples=4, progress=None)
    return compile_bundle(portable, "x86-host", backends=["onnxruntime"], out_dir=root / "r20-host",
                          progress=None)


@pytest.fixture(scope="module")
def merged_bundle(host_bundle, tmp_path_factory) -> Path:
    """A copy of the host bundle with merged pieces for a few spans."""
    out = tmp_path_factory.mktemp("merged") / "b"
    shutil.copytree(host_bundle, out)
    ids = add_merged_pieces(out, [(0, 2, "FTF"), (1, 2, "TF"), (0, 1, "FT")], progress=None)
    assert ids == ["stages0-2.FTF", "stages1-2.TF", "stages0-1.FT"]
    return out


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((5, 1, 28, 28)).astype(np.float32)


def _count_calls(ex: SegmentExecutor, piece_ids) -> dict[str, int]:
    """Wrap the runners' run (before any steps are built) to count calls per piece."""
    counts = {pid: 0 for pid in piece_ids}
    for pid in piece_ids:
        r = ex.runner(pid)
        inner = r.run

        def run(feeds, _inner=inner, _pid=pid):
            counts[_pid] += 1
            return _inner(feeds)

        r.run = run
    return counts


def test_whole_network_span_matches_chain_and_fallback(host_bundle, merged_bundle, x):
    m = Bundle.open(merged_bundle, verify=True).manifest
    p = m.merged_piece(0, 2, "FTF")
    assert p is not None and p.id == "stages0-2.FTF" and p.kind == "merged"
    assert (p.first_stage, p.stage, p.variant, p.skip, p.returns_logits) == (0, 2, "FTF", None, True)
    assert [t.name for t in p.inputs] == ["x"] and [t.name for t in p.outputs] == ["logits"]
    assert {(a.backend, a.target) for a in p.artifacts} == {("onnx", "portable"),
                                                          ("onnxruntime", "x86_64-cpu")}
    chain = [m.piece(i) for i in ("stage0.full", "stage1.skip", "stage2.full")]
    assert 0 < p.macs <= sum(c.macs for c in chain) and 0 < p.params <= sum(c.params for c in chain)
    assert m.merged_piece(0, 2, "FFF") is None
    assert "stages0-2.FTF" not in {pid for segs in m.execution.values() for s in segs for pid in s}

    merged = SegmentExecutor(Bundle.open(merged_bundle), "onnxruntime", options=ORT)
    plain = SegmentExecutor(Bundle.open(host_bundle), "onnxruntime", options=ORT)
    chain_logits = plain.run_exits(x, "FTF")[-1]
    assert merged.has_merged(0, 2, "FTF") and not plain.has_merged(0, 2, "FTF")
    assert len(merged.span_steps(0, 2, "FTF")) == 1
    assert len(plain.span_steps(0, 2, "FTF")) == 3
    got = merged.run_span(0, 2, "FTF", {"x": x})
    fallback = plain.run_span(0, 2, "FTF", {"x": x})
    np.testing.assert_allclose(got, chain_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fallback, chain_logits, rtol=0, atol=1e-5)
    # the portable merged ONNX too
    port = SegmentExecutor(Bundle.open(merged_bundle), "onnx", options=ORT)
    assert port.has_merged(0, 2, "FTF")
    np.testing.assert_allclose(port.run_span(0, 2, "FTF", {"x": x}), chain_logits, rtol=0, atol=1e-5)


def test_middle_spans_give_the_chain_logits_and_features(merged_bundle, x):
    ex = SegmentExecutor(Bundle.open(merged_bundle), "onnxruntime", options=ORT)
    ref: dict[str, np.ndarray] = {"x": x}
    ex.run_segment("FTF", 0, ref)
    f0 = ref["features0"].copy()
    ex.run_segment("FTF", 1, ref)
    ref_logits1, ref_f1 = ref["logits"].copy(), ref["features1"].copy()
    ex.run_segment("FTF", 2, ref)

    t = {"x": x, "features0": f0}
    assert ex.has_merged(1, 2, "TF")
    np.testing.assert_allclose(ex.run_span(1, 2, "TF", t), ref["logits"], rtol=0, atol=1e-5)

    t = {"x": x}
    assert ex.has_merged(0, 1, "FT")
    out = ex.run_span(0, 1, "FT", t)
    np.testing.assert_allclose(out, ref_logits1, rtol=0, atol=1e-5)
    np.testing.assert_allclose(t["features1"], ref_f1, rtol=0, atol=1e-5)
    assert "features0" not in t  # one graph: the intermediate features never leave it
    # and the span's features feed the rest of the chain
    np.testing.assert_allclose(ex.run_segment("FTF", 2, t), ref["logits"], rtol=0, atol=1e-5)


def test_merged_span_is_one_runner_call_and_fallback_chains(merged_bundle, x):
    ex = SegmentExecutor(Bundle.open(merged_bundle), "onnxruntime", options=ORT)
    pieces = ["stages0-2.FTF", "stage0.full", "stage1.skip", "stage2.full", "stage0.skip",
              "stage1.skip", "stage2.skip"]
    counts = _count_calls(ex, dict.fromkeys(pieces))
    ex.run_span(0, 2, "FTF", {"x": x})
    assert counts["stages0-2.FTF"] == 1 and sum(counts.values()) == 1
    for k in counts:
        counts[k] = 0
    # no merged piece for TTT: the chain of stage pieces, one call each
    assert not ex.has_merged(0, 2, "TTT")
    logits = ex.run_span(0, 2, "TTT", {"x": x})
    assert counts == {**dict.fromkeys(pieces, 0), "stage0.skip": 1, "stage1.skip": 1,
                      "stage2.skip": 1}
    np.testing.assert_allclose(logits, ex.run_exits(x, "TTT")[-1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="variant"):
        ex.span_steps(0, 2, "FT")
    with pytest.raises(IndexError):
        ex.span_steps(1, 3, "FFF")


def _merged_dict(bundle: Path) -> tuple[dict, int]:
    d = json.loads((bundle / MANIFEST_NAME).read_text())
    i = next(i for i, p in enumerate(d["pieces"]) if p["id"] == "stages0-1.FT")
    return d, i


@pytest.mark.parametrize("mutate, field", [
    (lambda p: p.update(variant="FTF"), "variant"),
    (lambda p: p.update(variant="FX"), "variant"),
    (lambda p: p["inputs"][0].update(name="features0"), "inputs[0].name"),
    (lambda p: p.pop("first_stage"), "first_stage"),
    (lambda p: p.update(first_stage=1), "first_stage"),
    (lambda p: p.update(skip=False), "skip"),
    (lambda p: p.update(id="stages0-1.TT"), "id"),
    (lambda p: p.update(outputs=[o for o in p["outputs"] if o["name"] == "logits"]), "outputs"),
])
def test_validation_refuses_a_bad_merged_piece(merged_bundle, mutate, field):
    d, i = _merged_dict(merged_bundle)
    Manifest.from_dict(copy.deepcopy(d))  # valid as built
    mutate(d["pieces"][i])
    with pytest.raises(ManifestError) as e:
        Manifest.from_dict(d)
    msg = str(e.value)
    assert "\n" not in msg and f"pieces[{i}].{field}" in msg, msg


def test_validation_refuses_merged_pieces_in_plans_and_span_fields_elsewhere(merged_bundle):
    d, i = _merged_dict(merged_bundle)
    d2 = copy.deepcopy(d)
    d2["execution"]["FTF"][1] = ["stages0-1.FT"]
    with pytest.raises(ManifestError, match=r"execution\.FTF\[1\]\[0\].*merged"):
        Manifest.from_dict(d2)
    d3 = copy.deepcopy(d)
    d3["pieces"][0]["variant"] = "F"
    with pytest.raises(ManifestError, match=r"pieces\[0\]\.variant: only a 'merged' piece"):
        Manifest.from_dict(d3)


def test_add_merged_pieces_is_idempotent_and_the_bundle_verifies(merged_bundle, tmp_path):
    before = (merged_bundle / MANIFEST_NAME).read_bytes()
    assert add_merged_pieces(merged_bundle, [(0, 2, "FTF"), (1, 2, "TF")], progress=None) == []
    assert (merged_bundle / MANIFEST_NAME).read_bytes() == before
    b = Bundle.open(merged_bundle, verify=True)
    assert [p.id for p in b.manifest.pieces if p.kind == "merged"] == [
        "stages0-2.FTF", "stages1-2.TF", "stages0-1.FT"]
    # a manifest with merged pieces round-trips too
    assert Manifest.from_json(before.decode()).to_json().encode() == before
    # no stray staging directories next to the bundle
    assert not list(merged_bundle.parent.glob(".merge-*"))


def test_bad_spans_and_parity_failure(host_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(host_bundle, b)
    before = (b / MANIFEST_NAME).read_bytes()
    from runtime.errors import UsageError
    for span in [(1, 1, "F"), (0, 2, "FT"), (0, 3, "FFFF"), (0, 1, "FX")]:
        with pytest.raises(UsageError):
            add_merged_pieces(b, [span])
    with pytest.raises(ExportError, match="stages0-1.FF"):
        add_merged_pieces(b, [(0, 1, "FF")], atol=-1.0)  # nothing passes a negative tolerance
    assert (b / MANIFEST_NAME).read_bytes() == before
    assert not (b / "onnx" / "stages0-1.FF.onnx").exists()


def test_bundle_without_merged_pieces_round_trips_byte_identically(host_bundle, tmp_path):
    raw = (host_bundle / MANIFEST_NAME).read_bytes()
    m = load_manifest(host_bundle / MANIFEST_NAME)
    assert all(p.first_stage is None and p.variant is None for p in m.pieces)
    assert m.to_json().encode() == raw
    assert "first_stage" not in raw.decode() and "variant" not in raw.decode()
    save_manifest(m, tmp_path / MANIFEST_NAME)
    assert (tmp_path / MANIFEST_NAME).read_bytes() == raw


def test_split_granularity_drops_dead_heads_and_their_macs(checkpoint, tmp_path, x):
    """Split bundles chain mandatory/skippable/head pieces: the intermediate heads become whole
    dead pieces, pruned, and their MACs/params (recorded) are not counted."""
    out = export_checkpoint(checkpoint, tmp_path / "split", parity_samples=2, progress=None,
                            granularity="split")
    assert add_merged_pieces(out, [(0, 2, "FTF"), (0, 1, "TF")], progress=None) == [
        "stages0-2.FTF", "stages0-1.TF"]
    m = Bundle.open(out, verify=True).manifest
    whole = m.piece("stages0-2.FTF")
    heads = m.piece("head0"), m.piece("head1")
    assert whole.macs == m.cumulative_macs("FTF", 2) - sum(h.macs for h in heads)
    chain_params = sum(p.params for seg in m.segments("FTF") for p in seg)
    assert whole.params == chain_params - sum(h.params for h in heads)
    assert [t.name for t in m.piece("stages0-1.TF").outputs] == ["features1", "logits"]
    ex = SegmentExecutor(Bundle.open(out), "onnx", options=ORT)
    assert len(ex.span_steps(0, 2, "FTF")) == 1
    np.testing.assert_allclose(ex.run_span(0, 2, "FTF", {"x": x}), ex.run_exits(x, "FTF")[-1],
                               rtol=0, atol=1e-4)
    t = {"x": x}
    ref = {"x": x}
    ex.run_segment("TFF", 0, ref)
    ref_logits = ex.run_segment("TFF", 1, ref)
    np.testing.assert_allclose(ex.run_span(0, 1, "TF", t), ref_logits, rtol=0, atol=1e-4)
    np.testing.assert_allclose(t["features1"], ref["features1"], rtol=0, atol=1e-4)
