"""INT8 pieces (issue 15): static QDQ per piece, calibrated on the piece's real inputs, kept only
where it measures faster and keeps its exit's argmax; mixed bundles run with the runtime."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from export.quantize import (first_conv, head_nodes, needs_reduce_range, piece_calibration_inputs,
                             quantize_bundle, quantize_piece)
from runtime import AdaptiveModel
from runtime.bundle import Bundle
from runtime.errors import UsageError
from runtime.executor import SegmentExecutor

from test_runtime import DATA_SPEC, THREADS, build_bundles

CALIB, HELD_OUT = 96, 32


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path]:
    return build_bundles(tmp_path_factory.mktemp("quantize"))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """uint8 NHWC images of the synthetic data set (128)."""
    from train.data import load_dataset

    ds = load_dataset(DATA_SPEC)
    return ds.test.images[:CALIB + HELD_OUT].permute(0, 2, 3, 1).contiguous().numpy()


@pytest.fixture(scope="module")
def mixed(bundles, images, tmp_path_factory) -> tuple[Path, dict]:
    """The host bundle quantized with a speed margin every piece meets (so int8 is kept
    wherever agreement holds): a bundle with int8 pieces."""
    out = tmp_path_factory.mktemp("mixed") / "b"
    shutil.copytree(bundles[1], out)
    report = quantize_bundle(out, images, min_speedup=0.01, max_agreement_drop=0.2,
                             calib_samples=CALIB, held_out=HELD_OUT, runs=20, progress=None)
    return out, report


def _onnx(bundle: Path, pid: str) -> Path:
    b = Bundle.open(bundle)
    return b.resolve(b.manifest.piece(pid).find_artifacts("onnx")[0].file)


# ---------------------------------------------------------------------------------------------

def test_reduce_range_follows_vnni():
    assert needs_reduce_range("x86_64", ["sse2", "avx2", "fma"]) is True
    assert needs_reduce_range("x86_64", ["avx2", "avx512f", "avx512_vnni"]) is False
    assert needs_reduce_range("x86_64", ["avx2", "avx_vnni"]) is False
    assert needs_reduce_range("aarch64", ["neon"]) is False


def test_calibration_inputs_are_the_pieces_real_inputs(bundles, images):
    cal = piece_calibration_inputs(bundles[0], images[:40], n=64)
    b = Bundle.open(bundles[0])
    for p in b.manifest.pieces:
        assert set(cal[p.id]) == {t.name for t in p.inputs}
    assert cal["stage0.full"]["x"].shape == (40, 1, 28, 28)
    # stage 1 is reached after stage 0 full and after stage 0 skipped: rows of both, 64 in all
    f0 = cal["stage1.full"]["features0"]
    assert f0.shape[0] == 64 and f0.dtype == np.float32
    every = piece_calibration_inputs(bundles[0], images[:40], n=None)
    assert len(every["stage1.full"]["features0"]) == 80
    assert len(every["stage2.skip"]["features1"]) == 160  # after FF, FT, TF, TT


def test_variant_nodes(bundles):
    import onnx

    m0 = onnx.load(str(_onnx(bundles[0], "stage0.full")))
    assert first_conv(m0) == ["/conv1/Conv"]
    head0 = head_nodes(m0)
    assert head0 and all(n.startswith("/exits.0/") for n in head0)
    m2 = onnx.load(str(_onnx(bundles[0], "stage2.skip")))  # last stage: no features output
    head2 = head_nodes(m2)
    assert "/fc/Gemm" in head2 and not any("Conv" in n for n in head2)


def test_qdq_piece_passes_checker_and_loads_in_onnxruntime(bundles, images, tmp_path):
    import onnx
    import onnxruntime as ort

    cal = piece_calibration_inputs(bundles[0], images[:32], n=32, pieces=["stage1.full"])
    out = tmp_path / "stage1.full.int8.onnx"
    settings = quantize_piece(_onnx(bundles[0], "stage1.full"), out, cal["stage1.full"],
                              reduce_range=True, exclude_nodes=["/layer2.0/conv1/Conv"])
    assert settings["format"] == "QDQ" and settings["reduce_range"] is True
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the excluded conv keeps its fp32 weights (an initializer, no DequantizeLinear); the others
    # read int8 weights
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Conv":
            w = n.input[1]
            if n.name == "/layer2.0/conv1/Conv":
                assert w in inits and w not in producer
            else:
                assert producer[w].op_type == "DequantizeLinear"
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"features0": cal["stage1.full"]["features0"][:4]})
    assert all(np.isfinite(o).all() for o in outs)
    with pytest.raises(UsageError, match="unknown node"):
        quantize_piece(_onnx(bundles[0], "stage1.full"), tmp_path / "x.onnx", cal["stage1.full"],
                       exclude_nodes=["nope"])


def test_quantized_pieces_stay_within_recorded_tolerance(mixed, images):
    bundle, report = mixed
    assert report["accepted"], report["rejected"]
    b = Bundle.open(bundle)
    m = b.manifest
    assert m.annotations["quantize"]["accepted"] == report["accepted"]
    held = images[CALIB:CALIB + HELD_OUT]
    ev = piece_calibration_inputs(b, held, n=None)
    ex = SegmentExecutor(b, "onnxruntime", report["target"], THREADS)
    import onnxruntime as ort

    for pid in report["accepted"]:
        art = m.piece(pid).find_artifacts("onnxruntime")[0]
        assert art.file.endswith(".int8.onnx")
        opts = art.options
        assert opts["precision"] == "int8" and opts["quantization"]["format"] == "QDQ"
        par = opts["parity"]
        assert par["exit"] == m.piece(pid).stage and par["samples"] == len(ev[pid][next(iter(ev[pid]))])
        ref = ort.InferenceSession(str(_onnx(bundle, pid)), providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in ref.get_outputs()], ref.run(None, ev[pid])))
        r = ex.runner(pid)  # what the runtime opens: the int8 artifact
        got = dict(zip(r.output_names, r.run(ev[pid])))
        diff = float(np.abs(got["logits"] - want["logits"]).max())
        agree = float((got["logits"].argmax(1) == want["logits"].argmax(1)).mean())
        assert diff <= par["max_abs_logits_diff"] * (1 + 1e-4) + 1e-6, (pid, diff, par)
        assert agree >= par["argmax_agreement"] - 1e-9
        assert agree >= 1 - report["max_agreement_drop"]
        lat = opts["latency"]
        assert lat["kind"] == "measured" and lat["int8_ms"] > 0 and lat["fp32_ms"] > 0
    for pid, why in report["rejected"].items():  # kept fp32: the ORT-optimised fp32 file
        art = m.piece(pid).find_artifacts("onnxruntime")[0]
        assert art.options["precision"] == "fp32" and not art.file.endswith(".int8.onnx")
    # the replaced fp32 files are gone, nothing else is left behind
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert files == {a.file for a in m.artifact_files()} | {"manifest.json"}
    assert all(a >= 0.8 for accs in report["chained_argmax_agreement"].values() for a in accs)


def test_mixed_bundle_loads_and_predicts(mixed, bundles, images):
    bundle, report = mixed
    q = AdaptiveModel.load(bundle, runner_options=THREADS)
    f = AdaptiveModel.load(bundles[1], runner_options=THREADS)
    x = images[CALIB:CALIB + 16]
    pq = q.predict(x)
    pf = f.predict(x)
    assert len(pq) == len(pf) == 16
    agree = np.mean([a.class_id == b.class_id for a, b in zip(pq, pf)])
    assert agree >= 0.75
    # the quantize step is idempotent: int8 pieces are recognised, not quantized again
    again = quantize_bundle(bundle, images, min_speedup=0.01, max_agreement_drop=0.2,
                            calib_samples=CALIB, held_out=HELD_OUT, runs=5, progress=None)
    for pid in report["accepted"]:
        assert again["pieces"][pid]["reason"] == "already int8 in this bundle"


def test_piece_that_does_not_pay_stays_fp32(bundles, images, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(bundles[1], out)
    before = json.loads((out / "manifest.json").read_text())
    report = quantize_bundle(out, images, min_speedup=1000.0, max_agreement_drop=0.2,
                             calib_samples=CALIB, held_out=HELD_OUT, runs=10, progress=None)
    assert report["accepted"] == []
    assert set(report["rejected"]) == {p["id"] for p in before["pieces"]}
    for pid, why in report["rejected"].items():
        assert why.startswith("speed: int8 ") and "< required 1000.00x" in why, why
    b = Bundle.open(out)
    for p in b.manifest.pieces:
        art = p.find_artifacts("onnxruntime")[0]
        assert art.options["precision"] == "fp32" and not art.file.endswith(".int8.onnx")
    assert not list(out.rglob("*.int8.onnx")) and not list(out.glob(".quantize-*"))
    # an agreement nobody can reach is an accuracy reason, not a speed one
    report = quantize_bundle(out, images, min_speedup=0.01, max_agreement_drop=0.0,
                             calib_samples=CALIB, held_out=HELD_OUT, runs=5, progress=None,
                             pieces=["stage0.skip"])
    e = report["pieces"]["stage0.skip"]
    if e["decision"] == "int8":
        assert any(v["argmax_agreement"] == 1.0 for v in e["variants"])
    else:
        assert e["reason"].startswith("accuracy: ") and all(
            v["argmax_agreement"] < 1.0 for v in e["variants"]), e


def test_compile_precision_int8(bundles, images, tmp_path):
    from export.compile import compile_bundle

    with pytest.raises(UsageError, match="calibration images"):
        compile_bundle(bundles[0], "x86-host", backends=["onnxruntime"], out_dir=tmp_path / "x",
                       progress=None, precision="int8")
    out = compile_bundle(bundles[0], "x86-host", backends=["onnxruntime"], out_dir=tmp_path / "c",
                         progress=None, precision="int8", calib_images=images,
                         quantize_options={"min_speedup": 0.01, "max_agreement_drop": 0.2,
                                           "calib_samples": CALIB, "runs": 5})
    m = Bundle.open(out).manifest
    assert m.annotations["compile"]["precision"] == "int8"
    q = m.annotations["quantize"]
    assert q["latency_kind"] == "measured" and set(q["pieces"]) == {p.id for p in m.pieces}
    precisions = {p.find_artifacts("onnxruntime")[0].options["precision"] for p in m.pieces}
    assert precisions <= {"int8", "fp32"} and "int8" in precisions
    AdaptiveModel.load(out, runner_options=THREADS).predict(images[:2])


def test_profile_precision_field():
    from devices import load_profile
    from devices.profile import ProfileError, validate_profile

    p = load_profile("x86-host")
    assert p.precision == "fp32" and "precision" not in p.to_dict()
    raw = p.to_dict()
    raw["precision"] = "int8"
    q = validate_profile(raw)
    assert q.precision == "int8" and validate_profile(q.to_dict()).precision == "int8"
    raw["precision"] = "fp16"
    with pytest.raises(ProfileError, match="precision"):
        validate_profile(raw)


def test_merged_piece_is_quantized(bundles, images, tmp_path):
    from export.merge import add_merged_pieces

    out = tmp_path / "b"
    shutil.copytree(bundles[1], out)
    (pid,) = add_merged_pieces(out, [(0, 2, "FFF")], progress=None)
    report = quantize_bundle(out, images, min_speedup=0.01, max_agreement_drop=0.2,
                             calib_samples=CALIB, held_out=HELD_OUT, runs=5, progress=None,
                             pieces=[pid])
    assert list(report["pieces"]) == [pid]
    e = report["pieces"][pid]
    assert e["exit"] == 2 and e["decision"] == "int8", e
    art = Bundle.open(out).manifest.piece(pid).find_artifacts("onnxruntime")[0]
    assert art.options["precision"] == "int8"


def test_tvm_imports_and_compiles_a_qdq_piece(mixed, tmp_path):
    tvm = pytest.importorskip("tvm")
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    bundle, report = mixed
    pid = report["accepted"][0]
    b = Bundle.open(bundle)
    path = b.resolve(b.manifest.piece(pid).find_artifacts("onnxruntime")[0].file)
    model = onnx.load(str(path))
    shape = [1, *[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]
    mod = from_onnx(model, shape_dict={model.graph.input[0].name: shape})
    ex = relax.build(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    out = vm["main"](tvm.runtime.tensor(x) if hasattr(tvm.runtime, "tensor") else tvm.nd.array(x))
    import onnxruntime as ort

    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {model.graph.input[0].name: x})
    got = [o.numpy() for o in (out if isinstance(out, (list, tuple)) or hasattr(out, "__len__") else [out])]
    logits = got[-1]
    assert logits.shape == want[-1].shape
    assert np.abs(logits - want[-1]).max() < 0.5


def test_cli_compile_precision_int8(bundles, images, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli

    npz = tmp_path / "calib.npz"
    np.savez(npz, images=images, labels=np.zeros(len(images), np.int64))
    out = tmp_path / "dev"
    result = CliRunner().invoke(cli, [
        "compile", "--bundle", str(bundles[0]), "--device", "x86-host", "--backend", "onnxruntime",
        "--out", str(out), "--precision", "int8", "--calib-npz", str(npz),
        "--min-speedup", "0.01", "--max-agreement-drop", "0.2"])
    assert result.exit_code == 0, result.output
    assert "pieces int8 (measured on x86_64-cpu)" in result.output
    m = Bundle.open(out).manifest
    assert m.annotations["quantize"]["min_speedup"] == 0.01
    # without images: one Error line naming what to pass
    result = CliRunner().invoke(cli, [
        "compile", "--bundle", str(bundles[0]), "--device", "x86-host", "--backend", "onnxruntime",
        "--out", str(tmp_path / "x"), "--precision", "int8"])
    assert result.exit_code != 0
    assert result.output.startswith("Error: ") and "--calib-npz" in result.output, result.output
