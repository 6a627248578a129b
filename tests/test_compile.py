"""Portable bundle -> device bundles: onnxruntime, tvm (x86 + aarch64), tensorrt plans; CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from export.compile import compile_bundle
from export.portable import export_checkpoint, load_parity_images, normalize
from runtime.archive import unpack_bundle
from runtime.bundle import Bundle
from runtime.errors import BundleIntegrityError
from runtime.executor import SegmentExecutor
from train.checkpoint import model_from_checkpoint

from test_export import make_checkpoint

EM_AARCH64 = 183


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, portable bundle) of resnet20_adn on 1x28x28 synthetic images."""
    root = tmp_path_factory.mktemp("compile")
    ckpt = make_checkpoint(root / "r20.pt", "resnet20_adn", "synthetic")
    return ckpt, export_checkpoint(ckpt, root / "r20", parity_samples=8, progress=None)


@pytest.fixture(scope="module")
def inputs(portable) -> tuple[torch.nn.Module, np.ndarray]:
    model, state = model_from_checkpoint(portable[0])
    images, _ = load_parity_images(state, 5)
    return model, normalize(images, state["dataset"]["mean"], state["dataset"]["std"]).numpy()


@pytest.fixture(scope="module")
def host_ort(portable, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dev") / "r20-host"
    return compile_bundle(portable[1], "x86-host", backends=["onnxruntime"], out_dir=out, progress=None)


def all_exits(bundle: Bundle, backend: str, x: np.ndarray) -> dict[str, list[np.ndarray]]:
    ex = SegmentExecutor(bundle, backend,
                         options={"intra_op_threads": 1} if backend == "onnxruntime" else None)
    return {cfg: ex.run_exits(x, cfg) for cfg in bundle.manifest.skip_configs}


def test_onnxruntime_device_bundle_runs_every_config(host_ort, portable, inputs):
    model, x = inputs
    b = Bundle.open(host_ort)
    m = b.manifest
    assert m.device == "x86-host" and m.latency == []
    assert ("onnx", "portable") in m.available_targets()  # still recompilable
    art = b.artifact("stage0.full", "onnxruntime")
    assert art.target == "x86_64-cpu" and art.file == "onnxruntime/x86_64-cpu/stage0.full.onnx"
    opts = art.options
    assert opts["saved_optimization_level"] == "extended" and opts["graph_optimization_level"] == "all"
    assert opts["providers"] == ["CPUExecutionProvider"] and "intra_op_threads" in opts
    assert m.deployment.backend_order == ["onnxruntime"]
    with torch.no_grad():
        for cfg, got in all_exits(b, "onnxruntime", x).items():
            for k, ref in enumerate(model(torch.from_numpy(x), cfg)):
                assert np.abs(got[k] - ref.numpy()).max() <= 1e-4, (cfg, k)
        # batch 1
        got1 = SegmentExecutor(b, "onnxruntime").run_exits(x[:1], "TFT")
        assert np.abs(got1[2] - model(torch.from_numpy(x[:1]), "TFT")[2].numpy()).max() <= 1e-4


def test_gpu_profile_saves_basic_level_and_profile_options(portable, tmp_path):
    out = compile_bundle(portable[1], "jetson-orin-nano", backends=["onnxruntime"], out_dir=tmp_path / "j",
                         progress=None)
    opts = Bundle.open(out).artifact("stage1.skip", "onnxruntime").options
    assert opts["saved_optimization_level"] == "basic"
    assert opts["providers"][0] == "CUDAExecutionProvider" and opts["intra_op_threads"] == 6


def test_round_trip_compile_pack_unpack_open_run(host_ort, portable, inputs, tmp_path):
    _, x = inputs
    out = compile_bundle(portable[1], "x86-host", backends=["onnxruntime"], out_dir=tmp_path / "rt",
                         archive=True, progress=None)
    archive = tmp_path / "rt.tar.gz"
    assert archive.is_file()
    back = unpack_bundle(archive, tmp_path / "unpacked")
    a, b = Bundle.open(out), Bundle.open(back)
    assert a.manifest.to_dict() == b.manifest.to_dict()
    ra, rb = all_exits(a, "onnxruntime", x), all_exits(b, "onnxruntime", x)
    for cfg in ra:
        for u, v in zip(ra[cfg], rb[cfg]):
            assert np.array_equal(u, v)
    # an archive is also accepted as the input of compile
    again = compile_bundle(tmp_path / "rt.tar.gz", "x86-host", backends=["onnxruntime"],
                           out_dir=tmp_path / "again", progress=None)
    assert Bundle.open(again).manifest.device == "x86-host"


def test_flipped_byte_or_missing_file_refused(host_ort, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(host_ort, copy)
    target = copy / "onnxruntime" / "x86_64-cpu" / "stage1.full.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"onnxruntime/x86_64-cpu/stage1\.full\.onnx.*sha256"):
        Bundle.open(copy)
    target.unlink()
    with pytest.raises(BundleIntegrityError, match=r"onnxruntime/x86_64-cpu/stage1\.full\.onnx.*missing"):
        Bundle.open(copy)


def test_tensorrt_plans_for_trt10_and_engines_command_fails_cleanly(portable, tmp_path):
    from pipeline.cli import cli

    out = compile_bundle(portable[1], "jetson-orin-nano", backends=["tensorrt"], out_dir=tmp_path / "trt",
                         progress=None)
    b = Bundle.open(out)
    for piece in b.manifest.pieces:
        art = b.artifact(piece.id, "tensorrt")
        assert art.target == "sm_87-trt10"
        assert art.file == piece.find_artifacts("onnx")[0].file  # ships the ONNX itself
        plan = art.options["build_plan"]
        assert plan["trt_version"][0] == 10 and plan["precision"] == "fp16"
        assert "FP16" in plan["builder_flags"]
        assert plan["profiles"][0]["max"][0] == 4 and plan["profiles"][0]["name"] == piece.inputs[0].name
    assert not (out / "engines").exists()
    result = CliRunner().invoke(cli, ["engines", "--bundle", str(out)])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and "TensorRT is not installed" in lines[0]
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_default_backends_follow_profile_and_skip_what_cannot_be_compiled(portable, tmp_path):
    lines: list[str] = []
    out = compile_bundle(portable[1], "jetson-xavier-nx", out_dir=tmp_path / "xavier", progress=lines.append)
    m = Bundle.open(out).manifest
    compiled = {a.backend for p in m.pieces for a in p.artifacts} - {"onnx"}
    assert "tensorrt" not in compiled and "onnxruntime" in compiled
    assert any(ln.startswith("skip") and "tensorrt" in ln and "TensorRT 8" in ln for ln in lines)
    order = m.deployment.backend_order
    assert order == [b for b in ["tensorrt", "onnxruntime", "tvm"] if b in compiled]
    assert {(t.backend, t.target) for t in m.deployment.targets} == set(m.available_targets())
    # one progress line per piece and backend, with a timing
    assert sum(1 for ln in lines if ln.startswith("onnxruntime") and " ms " in ln) == len(m.pieces)
    # explicitly asking for an impossible backend is an error
    with pytest.raises(ValueError, match="TensorRT 8"):
        compile_bundle(portable[1], "jetson-xavier-nx", backends=["tensorrt"], out_dir=tmp_path / "x2",
                       progress=None)
    with pytest.raises(ValueError, match="no tensorrt backend"):
        compile_bundle(portable[1], "raspberry-pi-5", backends=["tensorrt"], out_dir=tmp_path / "x3",
                       progress=None)


# ------------------------------------------------------------------------------------------ tvm

def _tvm():
    return pytest.importorskip("export.tvm", reason="export.tvm (TVM backend) is not available")


def test_tvm_x86_runs_via_executor_and_matches_onnxruntime(portable, inputs, host_ort, tmp_path):
    _tvm()
    _, x = inputs
    lines: list[str] = []
    out = compile_bundle(portable[1], "x86-host", backends=["tvm"], out_dir=tmp_path / "tvm",
                         progress=lines.append)
    assert any("untuned TVM CPU code is far slower than ONNX Runtime" in ln for ln in lines)
    b = Bundle.open(out)
    assert b.artifact("stage0.full", "tvm").target.startswith("x86_64-")
    got = all_exits(b, "tvm", x)
    ref = all_exits(Bundle.open(host_ort), "onnxruntime", x)
    for cfg in ref:
        for k, (u, v) in enumerate(zip(got[cfg], ref[cfg])):
            assert np.abs(u - v).max() <= 1e-4, (cfg, k)
    assert b.manifest.annotations["compile"]["backends"]["tvm"]["max_logits_diff_vs_onnxruntime"] <= 1e-4


def test_tvm_aarch64_artifacts_are_arm_elf(portable, tmp_path):
    _tvm()
    out = compile_bundle(portable[1], "raspberry-pi-5", backends=["tvm"], out_dir=tmp_path / "pi5",
                         progress=None)
    b = Bundle.open(out)
    for piece in b.manifest.pieces:
        art = b.artifact(piece.id, "tvm")
        assert art.target == "aarch64-cortex-a76"
        head = b.resolve(art.file).read_bytes()[:20]
        assert head[:4] == b"\x7fELF"
        assert int.from_bytes(head[18:20], "little") == EM_AARCH64, piece.id
    assert "not runnable" in b.manifest.annotations["compile"]["backends"]["tvm"]["verified"]


def test_tune_trials_reach_the_tvm_compiler(portable, tmp_path, monkeypatch):
    tvm_pkg = _tvm()
    calls = []

    def fake_compile_onnx(onnx_path, target, out_path, *, tune_trials=0, **kw):
        calls.append((Path(onnx_path).name, target["kind"], tune_trials))
        Path(out_path).write_bytes(b"\x7fELF fake library")

    monkeypatch.setattr(tvm_pkg, "compile_onnx", fake_compile_onnx)
    lines: list[str] = []
    out = compile_bundle(portable[1], "raspberry-pi-5", backends=["tvm"], out_dir=tmp_path / "tuned",
                         tune_trials=8, progress=lines.append, verify=False)
    assert len(calls) == 6 and {c[2] for c in calls} == {8} and {c[1] for c in calls} == {"llvm"}
    assert not any("untuned" in ln for ln in lines)
    art = Bundle.open(out).artifact("stage0.full", "tvm")
    assert art.options["tune_trials"] == 8 and art.options["target"]["mcpu"] == "cortex-a76"


# ------------------------------------------------------------------------------------------ CLI

def test_cli_compile_end_to_end_and_bad_inputs(portable, tmp_path):
    from pipeline.cli import cli

    runner = CliRunner()
    out = tmp_path / "cli-dev"
    result = runner.invoke(cli, ["compile", "--bundle", str(portable[1]), "--device", "x86-host",
                                 "--backend", "onnxruntime", "--out", str(out), "--archive"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stage2.skip" in result.output and " ms " in result.output
    assert Bundle.open(out).manifest.device == "x86-host" and (tmp_path / "cli-dev.tar.gz").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert {a["backend"] for p in manifest["pieces"] for a in p["artifacts"]} == {"onnx", "onnxruntime"}

    # default output directory: <bundle>-<device> next to the bundle
    src = tmp_path / "portable"
    import shutil
    shutil.copytree(portable[1], src)
    result = runner.invoke(cli, ["compile", "--bundle", str(src), "--device", "host", "--backend",
                                 "onnxruntime"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert Bundle.open(tmp_path / "portable-x86-host").manifest.device == "x86-host"

    for args, needle in [
        (["compile", "--bundle", str(portable[1]), "--device", "no-such-device"], "no-such-device"),
        (["compile", "--bundle", str(tmp_path / "missing"), "--device", "x86-host"], "missing"),
        (["compile", "--bundle", str(portable[1]), "--device", "x86-host", "--out", str(out)], "already exists"),
        (["compile", "--bundle", str(portable[1]), "--device", "pi5", "--backend", "tensorrt",
          "--out", str(tmp_path / "z")], "no tensorrt backend"),
        (["engines", "--bundle", str(out)], "no tensorrt artifacts"),
    ]:
        result = runner.invoke(cli, args)
        assert result.exit_code != 0, args
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
        assert needle in lines[-1] and lines[-1].startswith("Error:"), (args, result.output)
    assert not os.path.exists(tmp_path / "z")


def test_jetson_bundle_carries_its_deployment_record(portable, tmp_path):
    """The profile is resolved at compile time: the runtime reads order, requirements and
    runner options from the manifest, never from profile files on the device."""
    from runtime.manifest import load_manifest

    out = compile_bundle(portable[1], "jetson-orin-nano", backends=["onnxruntime", "tensorrt"],
                         out_dir=tmp_path / "nano", progress=None)
    m = load_manifest(out / "manifest.json")
    dep = m.deployment
    assert dep.profile == "jetson-orin-nano" and dep.backend_order == ["tensorrt", "onnxruntime"]
    trt = dep.target("tensorrt", "sm_87-trt10")
    assert (trt.requires.gpu, trt.requires.gpu_compute_capability,
            trt.requires.tensorrt_major) == (True, "8.7", 10)
    ort = dep.target("onnxruntime", "aarch64-cuda")
    assert ort.requires.arch == "aarch64" and not ort.requires.gpu
    assert ort.runner_options == {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                                  "intra_op_threads": 6, "inter_op_threads": 1,
                                  "graph_optimization_level": "all",
                                  "provider_options": {"CUDAExecutionProvider": {
                                      "device_id": 0, "arena_extend_strategy": "kSameAsRequested"}}}
    # the artifacts carry them too (like the thread counts), and the bundle runs here on the CPU
    art = m.piece("stage0.full").find_artifacts("onnxruntime")[0]
    assert art.options["provider_options"] == ort.runner_options["provider_options"]
    assert art.options["saved_optimization_level"] == "basic"
    assert art.options["saved_for_provider"] == "CUDAExecutionProvider"
    # the portable fallback runs anywhere, with the device's onnxruntime options
    portable_entry = dep.target("onnx", "portable")
    assert portable_entry.requires.arch is None
    assert portable_entry.runner_options == ort.runner_options


def test_int8_tensorrt_artifacts_read_the_qdq_files(portable, tmp_path):
    """`compile --precision int8` for a TensorRT profile: the int8 pieces' tensorrt artifacts
    point at the QDQ ONNX (the same file as their onnxruntime artifact), with an int8 build
    plan (explicit quantization) that TensorRT can read (int8, zero point 0); the other pieces
    keep the FP32 ONNX at the profile's precision; `pipeline engines` builds each piece with
    its own precision."""
    from export.tensorrt import inspect_onnx
    from pipeline.export_cmd import engine_pieces

    _, state = model_from_checkpoint(portable[0])
    images, _ = load_parity_images(state, 64)
    x = normalize(images, state["dataset"]["mean"], state["dataset"]["std"]).numpy()
    out = compile_bundle(portable[1], "jetson-orin-nano", backends=["onnxruntime", "tensorrt"],
                         out_dir=tmp_path / "q", progress=None, precision="int8", calib_images=x,
                         quantize_options={"min_speedup": 0.01, "max_agreement_drop": 0.5,
                                           "calib_samples": 32, "held_out": 16, "runs": 3})
    b = Bundle.open(out)
    m = b.manifest
    assert m.annotations["quantize"]["settings"]["activation_type"] == "QInt8"
    int8, fp32 = [], []
    for p in m.pieces:
        ort_art = p.find_artifacts("onnxruntime")[0]
        trt_art = p.find_artifacts("tensorrt")[0]
        plan = trt_art.options["build_plan"]
        if ort_art.options["precision"] == "int8":
            int8.append(p.id)
            assert trt_art.file == ort_art.file and trt_art.file.endswith(".int8.onnx")
            assert trt_art.options["precision"] == plan["precision"] == "int8"
            assert plan["builder_flags"] == ["INT8"] and plan["onnx_has_qdq"]
            assert trt_art.options["profile_options"]["precision"] == "fp16"
            assert inspect_onnx(b.resolve(trt_art.file)).qdq_problem is None
        else:
            fp32.append(p.id)
            assert trt_art.file == p.find_artifacts("onnx")[0].file
            assert trt_art.options["precision"] == plan["precision"] == "fp16"
    assert int8, m.annotations["quantize"]["rejected"]
    options, pieces = engine_pieces(b)
    assert options["precision"] == "fp16"
    by_id = {pid: (path, opts) for pid, path, opts in pieces}
    for pid in int8:
        assert by_id[pid][1]["precision"] == "int8" and by_id[pid][0].name.endswith(".int8.onnx")
    for pid in fp32:
        assert by_id[pid][1]["precision"] == "fp16"

    # a merged piece added later (the router's spans) and quantized in place follows too
    import shutil

    from export.merge import add_merged_pieces
    from export.quantize import quantize_bundle

    later = tmp_path / "later"
    shutil.copytree(out, later)
    (pid,) = add_merged_pieces(later, [(0, 2, "FFF")], progress=None)
    report = quantize_bundle(later, x, min_speedup=0.01, max_agreement_drop=0.5, calib_samples=32,
                             held_out=16, runs=3, progress=None, pieces=[pid])
    assert report["settings"]["activation_type"] == "QInt8"
    piece = Bundle.open(later).manifest.piece(pid)
    trt_art = piece.find_artifacts("tensorrt")[0]
    if report["pieces"][pid]["decision"] == "int8":
        assert trt_art.file == piece.find_artifacts("onnxruntime")[0].file
        assert trt_art.options["build_plan"]["precision"] == "int8"
    else:
        assert trt_art.options["precision"] == "fp16"
