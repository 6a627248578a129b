"""TVM backend: targets, compile (x86 / aarch64 cross / CUDA compile-only), runner, tuning cache.

No real MetaSchedule search runs here by default: one tuning run pays a ~30 s import of TVM's
tensor intrinsics before the first trial and took ~60 s for 8-16 trials on 2 cores. The database
reuse is checked with a database seeded with default-schedule records instead. Set
ADN_TVM_SLOW_TESTS=1 to also run a real 8-trial tuning + reuse round trip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="apache-tvm is not installed")
ort = pytest.importorskip("onnxruntime")

from export.errors import CompileError  # noqa: E402
from export.tvm import compile as tvm_compile  # noqa: E402
from export.tvm import tune as tvm_tune  # noqa: E402
from export.tvm import (  # noqa: E402
    TargetError,
    compile_onnx,
    cross_compiler,
    target_slug,
    to_tvm_target,
    tuning_cache_key,
    validate_target,
)
from export.tvm.targets import build_machine_arch  # noqa: E402
from runtime.backends.tvm_runner import TVMPieceRunner  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HOST = {"kind": "llvm"}
ORIN_CPU = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae"}
EM_AARCH64 = 183
EM_X86_64 = 62


def make_piece(path: Path, *, two_outputs: bool = True, channels: int = 8, seed: int = 0) -> Path:
    """conv-bn-relu -> conv-bn residual -> relu -> global pool -> linear; outputs (features, logits)."""
    torch = pytest.importorskip("torch")
    from torch import nn

    class Piece(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
            self.b1 = nn.BatchNorm2d(channels)
            self.c2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.b2 = nn.BatchNorm2d(channels)
            self.fc = nn.Linear(channels, 10)

        def forward(self, x):
            h = torch.relu(self.b1(self.c1(x)))
            h = torch.relu(h + self.b2(self.c2(h)))
            logits = self.fc(h.mean((2, 3)))
            return (h, logits) if two_outputs else logits

    torch.manual_seed(seed)
    m = Piece().eval()
    with torch.no_grad():
        for bn in (m.b1, m.b2):  # non-trivial folded BN
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    names = ["features", "logits"] if two_outputs else ["logits"]
    torch.onnx.export(
        m,
        (torch.randn(1, 3, 16, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=names,
        dynamic_axes={"x": {0: "N"}, **{n: {0: "N"} for n in names}},
    )
    return path


@pytest.fixture(scope="module")
def piece(tmp_path_factory) -> Path:
    return make_piece(tmp_path_factory.mktemp("tvm_piece") / "piece.onnx")


@pytest.fixture(scope="module")
def host_artifact(piece, tmp_path_factory):
    out = tmp_path_factory.mktemp("tvm_out") / "piece.x86_64-llvm.so"
    return compile_onnx(piece, HOST, out)


def ort_run(onnx_path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", f"{path} is not an ELF file"
    assert head[4] == 2, "expected a 64-bit ELF"
    return struct.unpack_from("<H", head, 18)[0]


# ------------------------------------------------------------------------------------------
# targets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        ("llvm -mtriple=aarch64-linux-gnu", "JSON objects"),
        (42, "must be a dict"),
        ({"mtriple": "aarch64-linux-gnu"}, "no 'kind'"),
        ({"kind": "opencl"}, "unsupported target kind"),
        ({"kind": "cuda"}, "needs 'arch'"),
        ({"kind": "cuda", "arch": "87"}, "sm_87"),
        ({"kind": "cuda", "arch": "sm_87", "host": "llvm"}, "'host' must be an llvm target dict"),
        ({"kind": "llvm", "mattr": "+neon"}, "list of strings"),
        ({"kind": "llvm", "mattr": ["neon"]}, "start with '\\+' or '-'"),
        ({"kind": "llvm", "mtriple": "aarch64"}, "LLVM triple"),
        ({"kind": "llvm", "num-cores": 0}, "positive integer"),
        ({"kind": "llvm", "host": {"kind": "llvm"}}, "only for cuda"),
    ],
)
def test_target_validation_errors(bad, match):
    with pytest.raises(TargetError, match=match):
        validate_target(bad)


def test_target_validation_against_tvm():
    with pytest.raises(TargetError, match="Unknown config option 'mfoo'"):
        to_tvm_target({"kind": "llvm", "mfoo": 1})
    with pytest.raises(TargetError, match="does not know mcpu='cortex-a999'"):
        validate_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a999"}, check_with_tvm=True)
    t = to_tvm_target({"kind": "cuda", "arch": "sm_87"})
    assert t.host is not None and str(t.host.attrs["mcpu"]) == "cortex-a78ae"
    assert validate_target(ORIN_CPU, check_with_tvm=True) == ORIN_CPU


def test_target_slugs_and_compilers():
    host_arch = build_machine_arch()
    assert target_slug(HOST) == f"{host_arch}-llvm"
    assert target_slug(ORIN_CPU) == "aarch64-cortex-a78ae"
    assert target_slug(dict(ORIN_CPU, mattr=["+neon"])) == "aarch64-cortex-a78ae"
    assert target_slug({"kind": "cuda", "arch": "sm_87"}) == "cuda-sm87"
    assert target_slug({"kind": "cuda", "arch": "sm_87", "host": ORIN_CPU}) == "cuda-sm87"
    other_host = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v2"}
    assert target_slug({"kind": "cuda", "arch": "sm_90", "host": other_host}) == "cuda-sm90-aarch64-neoverse-v2"
    assert cross_compiler(HOST) == "g++"
    if host_arch == "x86_64":
        assert target_slug(HOST) == "x86_64-llvm"
        assert cross_compiler(ORIN_CPU) == "aarch64-linux-gnu-g++"
        assert cross_compiler({"kind": "cuda", "arch": "sm_87"}) == "aarch64-linux-gnu-g++"
        assert cross_compiler({"kind": "cuda", "arch": "sm_89"}) == "g++"


# ------------------------------------------------------------------------------------------
# host compile + runner
# ------------------------------------------------------------------------------------------


def test_x86_compile_matches_onnxruntime(piece, host_artifact):
    art = host_artifact
    assert art.path.is_file() and art.metadata_path.is_file()
    assert art.target_slug == target_slug(HOST)
    assert art.input_names == ["x"] and art.output_names == ["features", "logits"]
    assert art.batch is None  # untuned: symbolic batch
    assert art.input_shapes == [["N", 3, 16, 16]]
    assert art.output_shapes == [["N", 8, 16, 16], ["N", 10]]
    assert elf_machine(art.path) == {"x86_64": EM_X86_64, "aarch64": EM_AARCH64}.get(build_machine_arch())

    runner = TVMPieceRunner(art.path)
    assert runner.input_names == ["x"] and runner.output_names == ["features", "logits"]
    rng = np.random.default_rng(0)
    for n in (1, 3):
        x = rng.standard_normal((n, 3, 16, 16)).astype(np.float32)
        got = runner.run({"x": x})
        ref = ort_run(piece, x)
        assert len(got) == 2
        for g, r in zip(got, ref, strict=True):
            assert g.shape == r.shape
            assert float(np.abs(g - r).max()) <= 1e-4


def test_single_output_fixed_batch_runs_in_chunks(tmp_path):
    onnx_path = make_piece(tmp_path / "one.onnx", two_outputs=False, channels=4, seed=1)
    art = compile_onnx(onnx_path, HOST, tmp_path / "one.so", batch=2)
    assert art.batch == 2 and art.input_shapes == [[2, 3, 16, 16]] and art.output_names == ["logits"]
    runner = TVMPieceRunner(art.path)
    x = np.random.default_rng(1).standard_normal((6, 3, 16, 16)).astype(np.float32)
    (got,) = runner.run({"x": x})
    (ref,) = ort_run(onnx_path, x)
    assert got.shape == (6, 10) and float(np.abs(got - ref).max()) <= 1e-4
    with pytest.raises(ValueError, match="not a multiple"):
        runner.run({"x": x[:3]})
    with pytest.raises(KeyError, match="missing inputs"):
        runner.run({"y": x})
    with pytest.raises(ValueError, match="expected"):
        runner.run({"x": x[:, :, :8]})


def test_runner_works_without_torch_train_or_export(host_artifact):
    # tvm_ffi itself tries `import torch` when it is installed, so block the modules instead of
    # checking sys.modules: the runner must load and run with torch/train/export unimportable.
    code = (
        "import sys, numpy as np\n"
        "for name in ('torch', 'train', 'export'):\n"
        "    sys.modules[name] = None\n"
        "from runtime.backends.tvm_runner import TVMPieceRunner\n"
        f"r = TVMPieceRunner({str(host_artifact.path)!r})\n"
        "out = r.run({'x': np.zeros((1, 3, 16, 16), np.float32)})\n"
        "print(len(out), r.output_names)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 ['features', 'logits']" in res.stdout
    source = (REPO / "runtime" / "backends" / "tvm_runner.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+(torch|train|export)\b", source, re.M)


def test_runner_clear_error_without_tvm(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['tvm'] = None  # simulate a missing install\n"
        "from runtime.backends.tvm_runner import TVMPieceRunner\n"
        "try:\n"
        f"    TVMPieceRunner({str(tmp_path / 'x.so')!r})\n"
        "except ImportError as e:\n"
        "    print('IMPORTERROR', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "IMPORTERROR" in res.stdout and "apache-tvm" in res.stdout


# ------------------------------------------------------------------------------------------
# cross compilation
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-g++") is None,
    reason="aarch64-linux-gnu-g++ not installed (apt-get install g++-aarch64-linux-gnu)",
)
def test_aarch64_cross_compile_is_aarch64_elf(piece, tmp_path):
    art = compile_onnx(piece, ORIN_CPU, tmp_path / "piece.aarch64-cortex-a78ae.so")
    assert art.target_slug == "aarch64-cortex-a78ae" and art.cxx == "aarch64-linux-gnu-g++"
    assert elf_machine(art.path) == EM_AARCH64
    meta = json.loads(art.metadata_path.read_text())
    assert meta["target"] == ORIN_CPU and meta["path"] == art.path.name


def test_missing_cross_compiler_is_a_clear_error(piece, tmp_path):
    with pytest.raises(CompileError, match="needs `no-such-g\\+\\+` on PATH"):
        compile_onnx(piece, ORIN_CPU, tmp_path / "x.so", cc="no-such-g++")


def test_cuda_without_nvcc_is_a_clear_error(piece, tmp_path, monkeypatch):
    # PATH without nvcc (keep the directories of the host tools only).
    keep = {str(Path(shutil.which(t)).parent) for t in ("g++", "aarch64-linux-gnu-g++") if shutil.which(t)}
    monkeypatch.setenv("PATH", os.pathsep.join(sorted(keep)) or "/nonexistent")
    assert shutil.which("nvcc") is None
    with pytest.raises(CompileError, match="nvcc"):
        compile_onnx(piece, {"kind": "cuda", "arch": "sm_87"}, tmp_path / "piece.cuda-sm87.so")
    assert not (tmp_path / "piece.cuda-sm87.so").exists()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="aarch64-linux-gnu-g++ not installed")
def test_cuda_sm87_compile_only(piece, tmp_path):
    import time

    t0 = time.perf_counter()
    art = compile_onnx(piece, {"kind": "cuda", "arch": "sm_87"}, tmp_path / "piece.cuda-sm87.so")
    if time.perf_counter() - t0 > 60:
        pytest.skip("CUDA compile took more than 60 s on this machine")
    assert art.path.is_file() and art.target_slug == "cuda-sm87" and art.cuda_format == "fatbin"
    assert elf_machine(art.path) == EM_AARCH64  # Orin host CPU implied by sm_87
    data = art.path.read_bytes()
    assert b"\x06\x00\x00\x00\x00\x00\x00\x00fatbin" in data  # the CUDA module carries a fatbin ...
    assert struct.pack("<I", 0xBA55ED50) in data  # ... (fatbin magic), not CUDA source to JIT


def _nvcc_archs() -> set[str]:
    if shutil.which("nvcc") is None:
        return set()
    res = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    return set(res.stdout.split())


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
def test_cuda_arch_unsupported_by_nvcc_is_a_clear_error(piece, tmp_path):
    if "compute_72" in _nvcc_archs():
        pytest.skip("this nvcc still supports sm_72")
    with pytest.raises(CompileError, match="cannot compile for sm_72"):
        compile_onnx(piece, {"kind": "cuda", "arch": "sm_72"}, tmp_path / "xavier.so")


def test_import_blob_round_trip(piece):
    """The repacking used for CUDA parses and rebuilds TVM's import blob byte for byte."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.runtime import _ffi_api

    ex = tvm.compile(from_onnx(onnx.load(str(piece))), to_tvm_target({"kind": "cuda", "arch": "sm_87"}))
    blob = _ffi_api.ModulePackImportsToTensor(ex.mod).numpy().tobytes()
    rows, children, modules = tvm_compile._Blob.parse(blob)
    assert tvm_compile._Blob.build(rows, children, modules) == blob
    kinds = [k for k, _ in modules]
    assert b"cuda" in kinds
    payload = modules[kinds.index(b"cuda")][1]
    fmt, fmap, code = tvm_compile._cuda_module_source(payload)
    assert fmt == b"cuda" and b"__global__" in code and fmap
    assert struct.pack("<Q", 4) + fmt + fmap + struct.pack("<Q", len(code)) + code == payload


# ------------------------------------------------------------------------------------------
# tuning cache
# ------------------------------------------------------------------------------------------


def test_tuning_cache_key_is_stable(piece, tmp_path):
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(piece, copy)
    sha = tvm_tune.sha256_file(piece)
    assert sha == tvm_tune.sha256_file(copy)
    key = tuning_cache_key(sha, target_slug(HOST))
    assert key == f"{target_slug(HOST)}-{sha[:16]}"
    assert key == tuning_cache_key(sha.upper(), target_slug(dict(HOST)))
    assert tuning_cache_key(sha, "aarch64-cortex-a78ae") != key
    other = make_piece(tmp_path / "other.onnx", seed=5)
    assert tuning_cache_key(tvm_tune.sha256_file(other), target_slug(HOST)) != key
    with pytest.raises(ValueError):
        tuning_cache_key("abc", "x86_64-llvm")


def _seed_database(onnx_path: Path, root: Path, trials: int) -> Path:
    """Write a database like a finished tuning run would, with default-schedule records."""
    import onnx
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    tdict = dict(HOST, **{"num-cores": max(1, os.cpu_count() or 1)})
    target = to_tvm_target(tdict)
    mod = from_onnx(onnx.load(str(onnx_path)), shape_dict={"x": [1, 3, 16, 16]})
    sha = tvm_tune.sha256_file(onnx_path)
    db_dir = tvm_tune.database_dir(root, sha, HOST)
    db = tvm_tune.open_database(db_dir)
    tasks = tvm_tune.extract_tasks(mod, target)
    for task in tasks:
        wl_mod = task.dispatched[0]
        sch = Schedule(wl_mod)
        sch.get_sblock("root", func_name="main")  # records with an empty trace are ignored
        db.commit_tuning_record(
            ms.database.TuningRecord(
                sch.trace,
                db.commit_workload(wl_mod),
                [1e-3],
                target,
                ms.arg_info.ArgInfo.from_prim_func(wl_mod["main"]),
            )
        )
    meta = {"onnx_sha256": sha, "target": HOST, "trials": trials, "tasks": [t.task_name for t in tasks]}
    (db_dir / tvm_tune.META_NAME).write_text(json.dumps(meta))
    return db_dir


def test_rebuild_reuses_tuning_database(piece, tmp_path, monkeypatch):
    root = tmp_path / "tuning"
    db_dir = _seed_database(piece, root, trials=8)

    def no_tuning(*args, **kwargs):
        raise AssertionError("tuning must be skipped when the cached database has enough trials")

    monkeypatch.setattr(tvm_tune, "_run_tuning", no_tuning)
    messages: list[str] = []
    art = compile_onnx(piece, HOST, tmp_path / "tuned.so", tune_trials=8, tuning_db_dir=root, progress=messages.append)
    assert art.tuning_reused and art.tuning_db == str(db_dir)
    assert art.batch == 1  # tuned pieces are compiled for a fixed batch
    assert art.total_tasks >= 3 and art.tuned_tasks == art.total_tasks and art.tuned
    assert any("skipping tuning" in m for m in messages)
    x = np.random.default_rng(2).standard_normal((2, 3, 16, 16)).astype(np.float32)
    got = TVMPieceRunner(art.path).run({"x": x})
    for g, r in zip(got, ort_run(piece, x), strict=True):
        assert float(np.abs(g - r).max()) <= 1e-4

    # More trials than the database holds: tuning continues in the same directory.
    calls = []
    monkeypatch.setattr(tvm_tune, "_run_tuning", lambda *a, **k: calls.append(a[3]))
    art2 = compile_onnx(piece, HOST, tmp_path / "tuned2.so", tune_trials=12, tuning_db_dir=root)
    assert calls == [4] and not art2.tuning_reused and art2.tune_trials == 12
    assert json.loads((db_dir / tvm_tune.META_NAME).read_text())["trials"] == 12


def test_tuning_cross_target_without_database_is_a_clear_error(piece, tmp_path):
    with pytest.raises(CompileError, match="cannot be measured on this machine"):
        compile_onnx(piece, ORIN_CPU, tmp_path / "x.so", tune_trials=4, tuning_db_dir=tmp_path / "db")


@pytest.mark.skipif(not os.environ.get("ADN_TVM_SLOW_TESTS"), reason="real MetaSchedule run (~60 s); set ADN_TVM_SLOW_TESTS=1")
def test_real_tuning_then_reuse(piece, tmp_path):
    root = tmp_path / "tuning"
    first = compile_onnx(piece, HOST, tmp_path / "t1.so", tune_trials=8, tuning_db_dir=root)
    assert not first.tuning_reused and first.tuned_tasks >= 1
    second = compile_onnx(piece, HOST, tmp_path / "t2.so", tune_trials=8, tuning_db_dir=root)
    assert second.tuning_reused and second.tuned_tasks == first.tuned_tasks
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    for g, r in zip(TVMPieceRunner(second.path).run({"x": x}), ort_run(piece, x), strict=True):
        assert float(np.abs(g - r).max()) <= 1e-4
