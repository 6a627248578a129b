"""TensorRT runtime runner against FAKE ``tensorrt`` and ``cudart`` modules.

TensorRT cannot be installed here (no libnvinfer, no GPU) and the runner has never been run on
real TensorRT. The fakes below implement only what ``runtime/backends/tensorrt_runner.py`` calls.
They keep "device memory" in a dict, copy to and from numpy host buffers through ``ctypes``,
execute the piece's ONNX with onnxruntime, and record every call. They also enforce the
TensorRT rule that an execution context (and, for dynamic shapes, an optimisation profile) is in
use by one caller at a time.
"""
from __future__ import annotations

import ctypes
import enum
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import runner_options
from runtime.backends import tensorrt_cache as rc
from runtime.backends.tensorrt_runner import (
    EngineNotBuiltError,
    EngineShapeError,
    TensorRTImportError,
    TensorRTPieceRunner,
    TensorRTRunnerError,
)
from runtime.bundle import Bundle
from runtime.errors import ConfigError
from runtime.executor import SegmentExecutor
from export.manifest_builder import add_artifact_file, add_piece, new_manifest, set_execution
from runtime.manifest import (MANIFEST_NAME, Piece, TensorSpec, save_manifest)

ROOT = Path(__file__).resolve().parents[1]
TRT10 = "10.3.0.30"
OPTS = {"precision": "fp16", "min_batch": 1, "opt_batch": 4, "max_batch": 8}


# ------------------------------------------------------------------------------------ fake cudart
class FakeStream:
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:  # like cuda-python's cudaStream_t
        return self.handle


class FakeCudart:
    """cuda-python's runtime module, as far as the runner uses it: (err, *values) returns."""

    class cudaError_t(enum.IntEnum):
        cudaSuccess = 0
        cudaErrorInvalidValue = 1
        cudaErrorMemoryAllocation = 2

    cudaDeviceAttr = SimpleNamespace(cudaDevAttrComputeCapabilityMajor="cc_major",
                                     cudaDevAttrComputeCapabilityMinor="cc_minor")
    cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")

    def __init__(self, cc=(8, 7), fail=()):
        self.cc, self.fail = cc, set(fail)
        self.mem: dict[int, bytearray] = {}
        self.calls: list[tuple] = []
        self.streams: dict[int, FakeStream] = {}
        self._next, self._lock = 0x10000, threading.Lock()

    def _rec(self, *call):
        self.calls.append((threading.get_ident(), *call))

    def _ok(self, name, *values):
        err = self.cudaError_t.cudaErrorMemoryAllocation if name in self.fail else self.cudaError_t.cudaSuccess
        return (err, *values)

    def named(self, op):
        return [c[1:] for c in self.calls if c[1] == op]

    def cudaGetErrorName(self, err):
        return (self.cudaError_t.cudaSuccess, self.cudaError_t(err).name.encode())

    def cudaSetDevice(self, device):
        self._rec("cudaSetDevice", device)
        return self._ok("cudaSetDevice")

    def cudaDeviceGetAttribute(self, attr, device):
        return self._ok("cudaDeviceGetAttribute", self.cc[0] if attr == "cc_major" else self.cc[1])

    def cudaMalloc(self, nbytes):
        if "cudaMalloc" in self.fail:
            return self._ok("cudaMalloc", 0)
        with self._lock:
            ptr, self._next = self._next, self._next + nbytes + 4096
            self.mem[ptr] = bytearray(nbytes)
        self._rec("cudaMalloc", nbytes)
        return self._ok("cudaMalloc", ptr)

    def cudaFree(self, ptr):
        self._rec("cudaFree", ptr)
        del self.mem[ptr]
        return self._ok("cudaFree")

    def cudaStreamCreate(self):
        with self._lock:
            s = FakeStream(0x5000 + len(self.streams))
            self.streams[s.handle] = s
        self._rec("cudaStreamCreate", s.handle)
        return self._ok("cudaStreamCreate", s)

    def cudaStreamDestroy(self, stream):
        self._rec("cudaStreamDestroy", int(stream))
        del self.streams[int(stream)]
        return self._ok("cudaStreamDestroy")

    def cudaStreamSynchronize(self, stream):
        self._rec("cudaStreamSynchronize", int(stream))
        return self._ok("cudaStreamSynchronize")

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):
        assert isinstance(dst, int) and isinstance(src, int) and int(stream) in self.streams
        if kind == "H2D":
            assert len(self.mem[dst]) >= count
            self.mem[dst][:count] = ctypes.string_at(src, count)
            self._rec("cudaMemcpyAsync", kind, dst, count, int(stream))
        else:
            assert len(self.mem[src]) >= count
            ctypes.memmove(dst, bytes(self.mem[src][:count]), count)
            self._rec("cudaMemcpyAsync", kind, src, count, int(stream))
        return self._ok("cudaMemcpyAsync")


# --------------------------------------------------------------------------------- fake tensorrt
class FakeLogger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = 0, 1, 2, 3, 4

    def __init__(self, severity):
        self.severity = severity


class FakeContext:
    def __init__(self, engine, ident):
        self.engine, self.id, self.profile = engine, ident, 0
        self.shapes = {t["name"]: tuple(t["shape"]) for t in engine.spec["io"] if t["mode"] == "INPUT"}
        self.addresses: dict[str, int] = {}
        self.busy = False

    def _rec(self, *call):
        self.engine.trt.calls.append((threading.get_ident(), self.id, *call))
        self.engine.trt.cudart.calls.append((threading.get_ident(), f"trt.{call[0]}"))  # one timeline

    def set_optimization_profile_async(self, profile, stream_handle):
        assert isinstance(stream_handle, int)
        self._rec("set_optimization_profile_async", profile, stream_handle)
        self.profile = profile
        return True

    def set_input_shape(self, name, shape):
        self._rec("set_input_shape", name, tuple(shape))
        t = self.engine.io[name]
        lo, _opt, hi = self.engine.profile_shape(name, self.profile)
        ok = (len(shape) == len(t["shape"]) and all(s == d for s, d in zip(shape, t["shape"]) if d >= 0)
              and all(a <= s <= b for s, a, b in zip(shape, lo, hi)))
        if ok:
            self.shapes[name] = tuple(shape)
        return ok

    def get_tensor_shape(self, name):
        t = self.engine.io[name]
        if t["mode"] == "INPUT":
            return list(self.shapes[name])
        batch = next(iter(self.shapes.values()))[0]
        return [batch if d < 0 else d for d in t["shape"]]

    def set_tensor_address(self, name, ptr):
        self._rec("set_tensor_address", name, ptr)
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream_handle):
        assert isinstance(stream_handle, int)
        self._rec("execute_async_v3", stream_handle)
        eng, mem = self.engine, self.engine.trt.cudart.mem
        key = ("profile", self.profile) if eng.dynamic else ("context", self.id)
        with eng.lock:  # TensorRT: one caller per context / per optimisation profile at a time
            if key in eng.active:
                eng.violations.append(key)
            eng.active.add(key)
        try:
            time.sleep(0.002)
            feeds = {}
            for name, shape in self.shapes.items():
                dtype = np.dtype(FakeTRT.NP[eng.io[name]["dtype"]])
                n = int(np.prod(shape)) * dtype.itemsize
                feeds[name] = np.frombuffer(bytes(mem[self.addresses[name]][:n]), dtype).reshape(shape)
            if eng.trt.fail_execute:
                return False
            outs = eng.compute(feeds)
            for name, value in outs.items():
                want = self.get_tensor_shape(name)
                value = np.ascontiguousarray(value, dtype=FakeTRT.NP[eng.io[name]["dtype"]])
                assert list(value.shape) == want, (name, value.shape, want)
                buf = mem[self.addresses[name]]
                assert len(buf) >= value.nbytes
                buf[:value.nbytes] = value.tobytes()
            return True
        finally:
            with eng.lock:
                eng.active.discard(key)


class FakeEngine:
    def __init__(self, trt, spec):
        self.trt, self.spec = trt, spec
        self.io = {t["name"]: t for t in spec["io"]}
        self.dynamic = any(d < 0 for t in spec["io"] if t["mode"] == "INPUT" for d in t["shape"])
        self.lock, self.active, self.violations, self.contexts = threading.Lock(), set(), [], []
        self._session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"]) \
            if spec.get("onnx") else None

    @property
    def num_io_tensors(self):
        return len(self.spec["io"])

    @property
    def num_optimization_profiles(self):
        return max(1, len(self.spec.get("profiles", [])))

    def get_tensor_name(self, i):
        return self.spec["io"][i]["name"]

    def get_tensor_mode(self, name):
        return getattr(self.trt.TensorIOMode, self.io[name]["mode"])

    def get_tensor_dtype(self, name):
        return getattr(self.trt.DataType, self.io[name]["dtype"])

    def get_tensor_shape(self, name):
        return list(self.io[name]["shape"])

    def profile_shape(self, name, p):
        if not self.spec.get("profiles"):
            s = self.io[name]["shape"]
            return s, s, s
        return self.spec["profiles"][p][name]

    def get_tensor_profile_shape(self, name, profile_index):
        return [list(s) for s in self.profile_shape(name, profile_index)]

    def create_execution_context(self):
        ctx = FakeContext(self, len(self.trt.contexts))
        self.trt.contexts.append(ctx)
        ctx._rec("create_execution_context")
        return ctx

    def compute(self, feeds):
        if self._session is not None:
            names = [o.name for o in self._session.get_outputs()]
            return dict(zip(names, self._session.run(names, feeds)))
        x = feeds["x"].astype(np.float32)
        return {"y": x * 2, "s": x.reshape(len(x), -1).sum(axis=1, keepdims=True)}


class FakeRuntime:
    def __init__(self, trt, logger):
        self.trt, self.logger = trt, logger

    def deserialize_cuda_engine(self, data):
        self.trt.calls.append((threading.get_ident(), None, "deserialize_cuda_engine", len(data)))
        try:
            spec = json.loads(bytes(data))
        except ValueError:
            return None
        engine = FakeEngine(self.trt, spec)
        self.trt.engines.append(engine)
        return engine


class FakeTRT:
    """The attributes of ``tensorrt`` the runner uses (name-based I/O API of TensorRT 10/11)."""
    NP = {"FLOAT": np.float32, "HALF": np.float16}

    def __init__(self, cudart, version=TRT10, fail_execute=False):
        self.__version__, self.cudart, self.fail_execute = version, cudart, fail_execute
        self.calls, self.engines, self.contexts = [], [], []
        self.Logger = FakeLogger
        self.TensorIOMode = SimpleNamespace(NONE="TensorIOMode.NONE", INPUT="TensorIOMode.INPUT",
                                            OUTPUT="TensorIOMode.OUTPUT")
        self.DataType = SimpleNamespace(FLOAT="DataType.FLOAT", HALF="DataType.HALF")

    def nptype(self, dtype):
        return self.NP[dtype.rsplit(".", 1)[-1]]

    def Runtime(self, logger):
        return FakeRuntime(self, logger)

    def ops(self, *names):
        return [c for c in self.calls if c[2] in names]


def fakes(cc=(8, 7), version=TRT10, **kw):
    cudart = FakeCudart(cc=cc, fail=kw.pop("fail", ()))
    return FakeTRT(cudart, version, **kw), cudart


# ------------------------------------------------------------------------------ a tiny bundle
def _piece_onnx(seed: int):
    """x [N,1,4,4] -> features = Relu(x) [N,1,4,4], logits = Flatten(x) @ W + b [N,3]."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(3).astype(np.float32), "b")]
    nodes = [helper.make_node("Relu", ["x"], ["features"]),
             helper.make_node("Flatten", ["x"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    graph = helper.make_graph(
        nodes, f"piece{seed}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 1, 4, 4]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def make_bundle(root: Path, opts=OPTS) -> Path:
    """A 1-stage device bundle with tensorrt artifacts, as `pipeline compile --backend tensorrt`
    writes them: the piece's ONNX plus the build plan for TensorRT 10 on sm_87."""
    from export.tensorrt import make_build_plan

    (root / "onnx").mkdir(parents=True)
    m = new_manifest(model_name="tiny", family="resnet", num_classes=3, params=10, input_shape=[1, 4, 4],
                     mean=[0.5], std=[0.5], stages=1, tool_version="0.1.0", device="jetson-orin-nano")
    for seed, (variant, skip) in enumerate((("full", False), ("skip", True))):
        pid = f"stage0.{variant}"
        add_piece(m, Piece(id=pid, kind="stage", stage=0, skip=skip, returns_logits=True,
                          inputs=[TensorSpec("x", ["N", 1, 4, 4])],
                          outputs=[TensorSpec("features", ["N", 1, 4, 4]), TensorSpec("logits", ["N", 3])],
                          macs=10, params=5))
        rel = f"onnx/{pid}.onnx"
        onnx.save(_piece_onnx(seed), str(root / rel))
        add_artifact_file(m, root, pid, rel, backend="onnx", target="portable")
        plan = make_build_plan(root / rel, opts, "10", compute_capability="8.7")  # as export/compile.py
        add_artifact_file(m, root, pid, rel, backend="tensorrt", target="sm_87-trt10",
                            options={"build_plan": plan.to_dict(), "profile_options": dict(opts), "trt_major": 10,
                                     "compute_capability": "8.7", "engines": "built on the device"})
    set_execution(m, "F", [["stage0.full"]])
    set_execution(m, "T", [["stage0.skip"]])
    save_manifest(m, root / MANIFEST_NAME)
    return root


def engine_spec(onnx_path: Path, plan) -> dict:
    """What the fake engine 'is': the ONNX it runs, its I/O (outputs listed logits first, i.e.
    not in the manifest's order) and the build plan's optimisation profiles."""
    dyn = bool(plan.profiles)
    io = [{"name": "x", "mode": "INPUT", "dtype": "FLOAT", "shape": [-1 if dyn else 1, 1, 4, 4]},
          {"name": "logits", "mode": "OUTPUT", "dtype": "FLOAT", "shape": [-1 if dyn else 1, 3]},
          {"name": "features", "mode": "OUTPUT", "dtype": "FLOAT", "shape": [-1 if dyn else 1, 1, 4, 4]}]
    profiles = [{p.name: [list(p.min), list(p.opt), list(p.max)] for p in plan.profiles}] if dyn else []
    return {"onnx": str(onnx_path), "io": io, "profiles": profiles}


def build_engines(bundle: Path, opts=OPTS, cc="8.7", version=TRT10) -> list[Path]:
    """What `pipeline engines --bundle B` stores (build_bundle_engines' plan, key and store
    calls), with fake engine bytes."""
    from export.tensorrt import EngineCache, make_build_plan, sha256_file

    b = Bundle.open(bundle)
    cache = EngineCache(bundle, cc, version)
    out = []
    for piece in b.manifest.pieces:
        onnx_path = b.resolve(piece.find_artifacts("tensorrt")[0].file)
        plan = make_build_plan(onnx_path, opts, rc.parse_trt_version(version), compute_capability=cc)
        onnx_sha = sha256_file(onnx_path)
        engine = json.dumps(engine_spec(onnx_path, plan)).encode()
        out.append(cache.store(piece.id, engine, cache.key(onnx_sha, plan), onnx_sha256=onnx_sha, plan=plan,
                               extra={"onnx_file": onnx_path.name, "onnx_conversion": None}))
    return out


def ort_outputs(onnx_path: Path, x: np.ndarray) -> list[np.ndarray]:
    s = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return s.run(["features", "logits"], {"x": x})


def trt_runner(bundle: Path, pid="stage0.full", trt=None, cudart=None, **options):
    """The runner as open_runner makes it, with fake tensorrt / cuda-python modules injected
    (test seams, not runner options a manifest may carry)."""
    b = Bundle.open(bundle)
    art = b.artifact(pid, "tensorrt")
    return TensorRTPieceRunner(b.artifact_path(pid, "tensorrt"),
                               **{**runner_options("tensorrt", art.options, strict=False),
                                  **options}, trt=trt, cudart=cudart)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return make_bundle(tmp_path / "b")


@pytest.fixture
def built(bundle) -> Path:
    build_engines(bundle)
    return bundle


X = np.random.default_rng(1).standard_normal((3, 1, 4, 4)).astype(np.float32)


# ------------------------------------------------------------------------------------- imports
def test_import_needs_neither_tensorrt_nor_torch_nor_cuda():
    code = ("import sys, runtime.backends.tensorrt_runner, runtime.backends.tensorrt_cache\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'tensorrt', 'cuda', 'export', 'onnx', 'onnxruntime'))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_tensorrt_or_cuda_python_is_a_clear_import_error(built, monkeypatch):
    import importlib.util

    import runtime.backends.tensorrt_runner as tr

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as here: no tensorrt
                        lambda name, *a: None if name == "tensorrt" else real_find_spec(name, *a))
    with pytest.raises(TensorRTImportError, match=r"TensorRT is not installed.*pipeline engines"):
        trt_runner(built)  # the guarded import
    monkeypatch.setattr(tr, "CUDART_MODULES", ("cuda_missing_here.bindings.runtime", "cuda_missing_here.cudart"))
    trt, _ = fakes()
    with pytest.raises(ImportError, match=r"cuda-python.*pip install cuda-python"):
        trt_runner(built, trt=trt)  # no cuda-python


# ----------------------------------------------------------------------------- shared cache logic
def test_runtime_cache_logic_matches_export(tmp_path):
    from export.tensorrt import EngineCache, engine_cache_key, make_build_plan
    from export.tensorrt import config

    for v in ["10.3.0.30", (10, 3), [11, 4, 1], "11.0.0rc1", "10.7.0+cuda12"]:
        assert rc.parse_trt_version(v) == config.parse_trt_version(v)
    for cc in ["8.7", "87", "sm87", "sm_87", (8, 7), 8.7, "12.0", "sm_120"]:
        assert rc.normalize_compute_capability(cc) == config.normalize_compute_capability(cc)
        assert rc.sm_tag(cc) == config.sm_tag(cc)
    for bad in ["x", "8"]:
        with pytest.raises(ValueError):
            rc.normalize_compute_capability(bad)
    assert rc.PLAN_SCHEMA == config.PLAN_SCHEMA
    # the pinned key (tests/test_tensorrt.py) comes out of the shared derivation
    key = "3f13448d72a9c8007ec00721a1d2e1c03fdcd468cf4639ac8a525dbc7282223e"
    assert rc.engine_cache_key("8.7", "10.3.0.30", "ab" * 32, "cd" * 32) == key
    assert engine_cache_key("sm87", (10, 3, 0), "AB" * 32, "cd" * 32) == key
    onnx_path = tmp_path / "p.onnx"
    onnx.save(_piece_onnx(0), str(onnx_path))
    for opts, version in [(OPTS, (10, 3, 0)), ({"precision": "best"}, (10, 3, 0)),
                          ({"precision": "best", "workspace_mb": 64}, (11, 4, 1))]:
        plan = make_build_plan(onnx_path, opts, version, allow_fp16_conversion=True)
        assert rc.plan_hash_of(plan.to_dict()) == plan.plan_hash()
        assert rc.plan_hash_of(json.loads(json.dumps(plan.to_dict()))) == plan.plan_hash()
    # the export cache is the runtime reader plus writes
    assert issubclass(EngineCache, rc.EngineCacheReader)
    assert EngineCache(tmp_path, "sm87", "10.3.0.1").dir == rc.EngineCacheReader(tmp_path, "8.7", (10, 3)).dir


def test_plan_option_differences_ignore_version_dependent_fields(tmp_path):
    from export.tensorrt import make_build_plan

    onnx_path = tmp_path / "p.onnx"
    onnx.save(_piece_onnx(0), str(onnx_path))
    t10 = make_build_plan(onnx_path, OPTS, (10, 3, 0)).to_dict()
    t11 = make_build_plan(onnx_path, OPTS, (11, 4, 1), allow_fp16_conversion=True).to_dict()
    assert t10["builder_flags"] != t11["builder_flags"] and t10["strongly_typed"] != t11["strongly_typed"]
    assert rc.plan_option_differences(t10, t11) == []
    bigger = make_build_plan(onnx_path, {**OPTS, "max_batch": 16}, (10, 3, 0)).to_dict()
    diffs = rc.plan_option_differences(bigger, t10)
    assert len(diffs) == 1 and diffs[0].startswith("profiles: engine")


# --------------------------------------------------------------------------------- engine lookup
def test_missing_engine_raises_and_never_builds(bundle):
    trt, cudart = fakes()
    with pytest.raises(EngineNotBuiltError) as err:
        trt_runner(bundle, trt=trt, cudart=cudart)
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert f"run `pipeline engines --bundle {bundle}` on this device" in msg
    assert "piece 'stage0.full'" in msg and "GPU sm_87, TensorRT 10.3.0" in msg and "does not exist" in msg
    assert trt.calls == [] and not hasattr(trt, "Builder")  # nothing deserialized, nothing built


def test_engine_lookup_finds_the_engine_pipeline_engines_built(built):
    trt, cudart = fakes()
    with trt_runner(built, trt=trt, cudart=cudart) as r:
        assert r.engine_path == built / "engines" / "sm_87_trt10.3.0" / "stage0.full.plan"
        assert r.piece_id == "stage0.full" and r.bundle_dir == built
        assert r.compute_capability == "8.7" and r.trt_version == (10, 3, 0)
    assert trt.ops("deserialize_cuda_engine")
    assert ("cudaSetDevice", 0) in cudart.named("cudaSetDevice")


@pytest.mark.parametrize("case, match", [
    ("other_gpu", r"exist only for: sm_87_trt10\.3\.0.*compiled for sm_87 but this GPU is sm_86"),
    ("other_trt", r"TensorRT 10\.7\.0\): .*exist only for: sm_87_trt10\.3\.0"),
    ("trt11", r"build plan is for TensorRT 10\.x but TensorRT 11\.4\.1 is installed"),
    ("onnx_changed", r"built from a different ONNX file"),
    ("options_changed", r"different build options.*profiles: engine"),
    ("corrupt", r"corrupt \(sha256 mismatch\)"),
    ("truncated", r"incomplete or was replaced"),
    ("sidecar_edited", r"does not match its build plan"),
    ("sidecar_missing", r"no engine for piece 'stage0.full'"),
])
def test_stale_or_foreign_engines_are_refused(built, case, match):
    cc, version, options = (8, 7), TRT10, {}
    plan_file = built / "engines" / "sm_87_trt10.3.0" / "stage0.full.plan"
    sidecar = plan_file.with_suffix(".json")
    if case == "other_gpu":
        cc = (8, 6)
    elif case == "other_trt":
        version = "10.7.0"
    elif case == "trt11":
        version = "11.4.1"
    elif case == "onnx_changed":  # the bundle was recompiled from another model, engines not rebuilt
        onnx.save(_piece_onnx(7), str(built / "onnx" / "stage0.full.onnx"))
        m = Bundle.open(built, verify=False).manifest.copy()
        for a in m.piece("stage0.full").artifacts:
            add_artifact_file(m, built, "stage0.full", a.file, backend=a.backend, target=a.target,
                                options=a.options, replace=True)
        save_manifest(m, built / MANIFEST_NAME)
    elif case == "options_changed":
        from export.tensorrt import make_build_plan
        options = {"build_plan": make_build_plan(built / "onnx" / "stage0.full.onnx", {**OPTS, "max_batch": 16},
                                                 "10", compute_capability="8.7").to_dict()}
    elif case == "corrupt":
        data = bytearray(plan_file.read_bytes())
        data[3] ^= 1
        plan_file.write_bytes(bytes(data))
    elif case == "truncated":
        plan_file.write_bytes(plan_file.read_bytes()[:-2])
    elif case == "sidecar_edited":
        meta = json.loads(sidecar.read_text())
        meta["plan"]["precision"] = "fp32"
        sidecar.write_text(json.dumps(meta))
    elif case == "sidecar_missing":
        sidecar.unlink()
    trt, cudart = fakes(cc=cc, version=version)
    with pytest.raises(EngineNotBuiltError, match=match) as err:
        trt_runner(built, trt=trt, cudart=cudart, **options)
    assert "pipeline engines --bundle" in str(err.value)
    assert not trt.ops("deserialize_cuda_engine")


def test_engine_file_given_directly(built, tmp_path):
    plan_file = built / "engines" / "sm_87_trt10.3.0" / "stage0.skip.plan"
    trt, cudart = fakes()
    # inside the bundle: the manifest still gives piece and output order
    with TensorRTPieceRunner(plan_file, trt=trt, cudart=cudart) as r:
        assert r.piece_id == "stage0.skip" and r.output_names == ["features", "logits"]
        got = r.run({"x": X})
    for g, want in zip(got, ort_outputs(built / "onnx" / "stage0.skip.onnx", X)):
        np.testing.assert_allclose(g, want, rtol=1e-6)
    # its sidecar says which GPU / TensorRT built it
    trt, cudart = fakes(cc=(8, 6))
    with pytest.raises(EngineNotBuiltError, match=r"built for GPU sm_87 \(this one is sm_86\)"):
        TensorRTPieceRunner(plan_file, trt=trt, cudart=cudart)
    # a bare engine elsewhere: engine order, no checks possible; garbage does not deserialize
    bare = tmp_path / "bare.engine"
    bare.write_bytes(plan_file.read_bytes())
    trt, cudart = fakes()
    with TensorRTPieceRunner(bare, trt=trt, cudart=cudart) as r:
        assert r.piece_id is None and r.output_names == ["logits", "features"]
    (tmp_path / "junk.plan").write_bytes(b"\x00not an engine")
    with pytest.raises(TensorRTRunnerError, match=r"could not deserialize.*pipeline engines --bundle B --force"):
        TensorRTPieceRunner(tmp_path / "junk.plan", trt=trt, cudart=cudart)
    with pytest.raises(EngineNotBuiltError, match="no manifest.json"):
        TensorRTPieceRunner(tmp_path / "loose.onnx", trt=trt, cudart=cudart)


# ------------------------------------------------------------------------------ I/O and execution
def test_io_names_and_output_order_follow_the_manifest(built):
    trt, cudart = fakes()
    with trt_runner(built, trt=trt, cudart=cudart) as r:
        assert r.input_names == ["x"]
        assert r._engine_outputs == ["logits", "features"]  # the engine lists them the other way round
        assert r.output_names == ["features", "logits"]  # manifest order, which the executor zips with
        assert r.dynamic and r.batch_limits == (1, 8)
        features, logits = r.run({"x": X})
    ref = ort_outputs(built / "onnx" / "stage0.full.onnx", X)
    assert features.shape == (3, 1, 4, 4) and logits.shape == (3, 3)
    assert features.dtype == np.float32 and logits.dtype == np.float32
    np.testing.assert_allclose(features, ref[0], rtol=1e-6)
    np.testing.assert_allclose(logits, ref[1], rtol=1e-6)


def test_call_sequence_of_one_run(built):
    trt, cudart = fakes()
    r = trt_runner(built, trt=trt, cudart=cudart)
    trt.calls.clear()
    cudart.calls.clear()
    r.run({"x": X.astype(np.float64)})  # cast to the engine's input dtype
    ops = [c[2] for c in trt.calls]
    assert ops == ["create_execution_context", "set_input_shape", "set_tensor_address", "set_tensor_address",
                   "set_tensor_address", "execute_async_v3"]
    assert trt.ops("set_input_shape")[0][3:] == ("x", (3, 1, 4, 4))
    assert [c[3] for c in trt.ops("set_tensor_address")] == ["x", "logits", "features"]
    stream = trt.ops("execute_async_v3")[0][3]
    timeline = [f"{c[1]}:{c[2]}" if c[1] == "cudaMemcpyAsync" else c[1] for c in cudart.calls]
    assert timeline == [
        "cudaSetDevice", "trt.create_execution_context", "cudaStreamCreate",  # this thread's context
        "cudaSetDevice", "trt.set_input_shape",
        "cudaMalloc", "trt.set_tensor_address", "cudaMalloc", "trt.set_tensor_address",
        "cudaMalloc", "trt.set_tensor_address",
        "cudaMemcpyAsync:H2D", "trt.execute_async_v3", "cudaMemcpyAsync:D2H", "cudaMemcpyAsync:D2H",
        "cudaStreamSynchronize"]
    assert all(c[-1] == stream for c in cudart.named("cudaMemcpyAsync"))
    assert cudart.named("cudaStreamSynchronize") == [("cudaStreamSynchronize", stream)]
    assert [c[1] for c in cudart.named("cudaMalloc")] == [X.nbytes, 3 * 3 * 4, X.nbytes]
    # same shape again: no new shape, no new buffers; a bigger batch: new shape, buffers grow
    trt.calls.clear()
    cudart.calls.clear()
    r.run({"x": X})
    assert [c[2] for c in trt.calls] == ["set_tensor_address"] * 3 + ["execute_async_v3"]
    assert not cudart.named("cudaMalloc")
    x8 = np.ones((8, 1, 4, 4), np.float32)
    out = r.run({"x": x8})
    assert trt.ops("set_input_shape")[-1][3:] == ("x", (8, 1, 4, 4))
    assert len(cudart.named("cudaMalloc")) == 3 and len(cudart.named("cudaFree")) == 3
    np.testing.assert_allclose(out[1], ort_outputs(built / "onnx" / "stage0.full.onnx", x8)[1], rtol=1e-6)
    r.close()
    assert not cudart.mem and not cudart.streams  # buffers freed, stream destroyed
    with pytest.raises(TensorRTRunnerError, match="closed"):
        r.run({"x": X})


def test_batch_outside_the_profile_and_bad_inputs(built):
    trt, cudart = fakes()
    r = trt_runner(built, trt=trt, cudart=cudart)
    limits = r"'x': min_batch 1, max_batch 8 \(shapes \(1, 1, 4, 4\)\.\.\(8, 1, 4, 4\)\)"
    with pytest.raises(EngineShapeError, match=r"batch 9 is outside the engine's optimisation profile for input "
                                               + limits):
        r.run({"x": np.zeros((9, 1, 4, 4), np.float32)})
    with pytest.raises(EngineShapeError, match=r"axis 2 of 4 \(N, 1, 4, 4\)"):
        r.run({"x": np.zeros((2, 1, 5, 4), np.float32)})
    with pytest.raises(EngineShapeError, match="expects 4 dimensions"):
        r.run({"x": np.zeros((1, 4, 4), np.float32)})
    with pytest.raises(EngineShapeError, match=r"missing input\(s\) \['x'\]"):
        r.run({"y": X})
    assert not trt.ops("execute_async_v3", "set_input_shape") and not cudart.named("cudaMemcpyAsync")
    assert len(r.run({"x": X[:1]})) == 2  # still usable


def test_cuda_and_tensorrt_failures_are_reported(built):
    trt, cudart = fakes(fail=("cudaMalloc",))
    r = trt_runner(built, trt=trt, cudart=cudart)
    with pytest.raises(TensorRTRunnerError, match=r"CUDA error in cudaMalloc\(192\): cudaErrorMemoryAllocation"):
        r.run({"x": X})
    trt, cudart = fakes(fail_execute=True)
    r = trt_runner(built, trt=trt, cudart=cudart)
    with pytest.raises(TensorRTRunnerError, match="execute_async_v3 failed"):
        r.run({"x": X})
    assert cudart.named("cudaStreamSynchronize")  # the stream was drained before giving the context back
    assert not cudart.named("cudaMemcpyAsync") or cudart.named("cudaMemcpyAsync")[-1][1] == "H2D"


# ------------------------------------------------------------------------------------- threads
def _static_engine(tmp_path: Path) -> Path:
    spec = {"io": [{"name": "x", "mode": "INPUT", "dtype": "FLOAT", "shape": [2, 3]},
                   {"name": "y", "mode": "OUTPUT", "dtype": "FLOAT", "shape": [2, 3]},
                   {"name": "s", "mode": "OUTPUT", "dtype": "HALF", "shape": [2, 1]}]}
    path = tmp_path / "static.plan"
    path.write_text(json.dumps(spec))
    return path


def _run_threads(n, fn):
    barrier, errors = threading.Barrier(n), []

    def work(i):
        try:
            barrier.wait()
            fn(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return threads


def test_static_engine_has_one_context_per_thread(tmp_path):
    trt, cudart = fakes()
    r = TensorRTPieceRunner(_static_engine(tmp_path), trt=trt, cudart=cudart, output_names=["y", "s"])
    assert not r.dynamic and r.batch_limits is None and r.input_names == ["x"]
    results = {}

    def work(i):
        for k in range(5):
            x = np.full((2, 3), i + k / 10, np.float32)
            y, s = r.run({"x": x})
            assert s.dtype == np.float16  # engine dtype (no manifest to say otherwise)
            np.testing.assert_allclose(y, 2 * x)
            np.testing.assert_allclose(s, x.sum(axis=1, keepdims=True), rtol=1e-3)
            results[(i, k)] = True

    threads = _run_threads(4, work)
    assert len(results) == 20
    engine = trt.engines[0]
    assert engine.violations == []  # no context was used by two threads at once
    contexts = {c[1] for c in trt.ops("execute_async_v3")}
    assert len(trt.contexts) == 4 and len(contexts) == 4
    by_thread = {}
    for c in trt.ops("execute_async_v3"):
        by_thread.setdefault(c[0], set()).add(c[1])
    assert all(len(v) == 1 for v in by_thread.values()) and len(by_thread) == 4  # thread-local
    assert len({c[3] for c in trt.ops("execute_async_v3")}) == 4  # one stream each
    assert not trt.ops("set_input_shape")  # static shapes are never set
    assert all(not t.is_alive() for t in threads)
    # new threads take over the contexts of finished ones instead of making more
    _run_threads(3, lambda i: r.run({"x": np.zeros((2, 3), np.float32)}))
    assert len(trt.contexts) == 4
    with pytest.raises(EngineShapeError, match=r"static batch of 2"):
        r.run({"x": np.zeros((3, 3), np.float32)})
    r.close()
    assert not cudart.mem and not cudart.streams


def test_dynamic_engine_uses_one_context_per_profile(built):
    trt, cudart = fakes()
    r = trt_runner(built, trt=trt, cudart=cudart)
    ref = ort_outputs(built / "onnx" / "stage0.full.onnx", X)

    def work(i):
        for _ in range(4):
            features, logits = r.run({"x": X[: 1 + i % 3]})
            np.testing.assert_allclose(logits, ref[1][: 1 + i % 3], rtol=1e-6)

    _run_threads(4, work)
    engine = trt.engines[0]
    assert engine.violations == []  # the single profile was never used concurrently
    assert len(trt.contexts) == 1 and len(trt.ops("execute_async_v3")) == 16
    r.close()


def test_engine_with_two_profiles_picks_a_context_per_profile(tmp_path):
    spec = {"io": [{"name": "x", "mode": "INPUT", "dtype": "FLOAT", "shape": [-1, 3]},
                   {"name": "y", "mode": "OUTPUT", "dtype": "FLOAT", "shape": [-1, 3]},
                   {"name": "s", "mode": "OUTPUT", "dtype": "FLOAT", "shape": [-1, 1]}],
            "profiles": [{"x": [[1, 3], [2, 3], [4, 3]]}, {"x": [[1, 3], [8, 3], [16, 3]]}]}
    path = tmp_path / "two.plan"
    path.write_text(json.dumps(spec))
    trt, cudart = fakes()
    r = TensorRTPieceRunner(path, trt=trt, cudart=cudart)
    assert r.batch_limits == (1, 16)
    r.run({"x": np.ones((12, 3), np.float32)})  # fits profile 1 only
    assert [c[3:] for c in trt.ops("set_optimization_profile_async")] == [(1, 0x5000)]
    _run_threads(4, lambda i: r.run({"x": np.ones((2, 3), np.float32)}))  # fits both
    assert trt.engines[0].violations == [] and len(trt.contexts) == 2
    with pytest.raises(EngineShapeError, match=r"fit none of the engine's optimisation profiles.*profile 1: "
                                               r"'x' \(1, 3\)\.\.\(16, 3\)"):
        r.run({"x": np.ones((17, 3), np.float32)})


# ----------------------------------------------------------------------------- through the executor
def test_segment_executor_runs_a_bundle_on_the_tensorrt_backend(built, monkeypatch):
    import runtime.backends.tensorrt_runner as tr

    trt, cudart = fakes()
    monkeypatch.setattr(tr, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(tr, "import_cudart", lambda: cudart)
    b = Bundle.open(built)
    with pytest.raises(ConfigError, match="options.intra_op_threads: unknown tensorrt runner"):
        SegmentExecutor(b, "tensorrt", options={"intra_op_threads": 1}).run_exits(X, "F")
    ex = SegmentExecutor(b, "tensorrt")
    for cfg, pid in (("F", "stage0.full"), ("T", "stage0.skip")):
        (logits,) = ex.run_exits(X, cfg)
        np.testing.assert_allclose(logits, ort_outputs(built / "onnx" / f"{pid}.onnx", X)[1], rtol=1e-6)
    assert len(trt.engines) == 2


# ------------------------------------------------------------------------------ real cuda-python
def test_cuda_glue_against_real_cuda_python_if_installed():
    """Skipped unless cuda-python is installed. With a GPU it round-trips a buffer through the
    runner's CUDA helpers; without one it checks that the calls are accepted and that errors
    come back by name. Checked by hand with cuda-bindings 12.9 and 13.5 on a machine without a
    GPU (cudaErrorInsufficientDriver)."""
    from runtime.backends.tensorrt_runner import _Cuda, _stream_handle, import_cudart

    try:
        rt = import_cudart()
    except TensorRTImportError:
        pytest.skip("cuda-python is not installed")
    cuda = _Cuda(rt, 0)
    try:
        cuda.set_device()
    except TensorRTRunnerError as exc:
        assert str(exc).startswith("CUDA error in cudaSetDevice(0): cudaError")
        pytest.skip(f"no usable GPU: {exc}")
    assert rc.normalize_compute_capability(cuda.compute_capability())
    stream = cuda.stream_create()
    ptr = cuda.malloc(X.nbytes)
    back = np.empty_like(X)
    try:
        assert isinstance(_stream_handle(stream), int)
        cuda.htod(ptr, X, stream)
        cuda.dtoh(back, ptr, stream)
        cuda.synchronize(stream)
    finally:
        cuda.free(ptr)
        cuda.stream_destroy(stream)
    np.testing.assert_array_equal(back, X)
