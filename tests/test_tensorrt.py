"""TensorRT backend: plan logic, builder calls against a fake ``tensorrt`` module, engine cache.

TensorRT is not installed here (and has never been run in this project's CI); everything that
touches TensorRT goes through the fake module below, which implements only the attributes the
builder uses and records every call.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.tensorrt import (
    EngineBuildError,
    EngineCache,
    EngineNotBuiltError,
    Fp16OnnxRequiredError,
    QdqOnnxRequiredError,
    TensorRTConfigError,
    build_bundle_engines,
    build_engine,
    device_dir_name,
    engine_cache_key,
    inspect_onnx,
    make_build_plan,
    normalize_compute_capability,
    require_engine,
    tensorrt_version,
)
from export.tensorrt.detect import _from_nvidia_smi, _from_tegra_device_tree

MiB = 1024 * 1024
TRT10 = (10, 3, 0)
TRT11 = (11, 4, 1)


# ------------------------------------------------------------------------------------ ONNX models
def _conv_graph(x_dims, *, qdq=False, fp16=False, name="seg"):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float16 if fp16 else np.float32)
    inits = [numpy_helper.from_array(w, "w")]
    nodes, conv_in = [], "x"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "zp")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"])]
        conv_in = "xdq"
    if fp16:
        nodes.append(helper.make_node("Cast", [conv_in], ["xh"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Conv", ["xh", "w"], ["yh"], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT))
    else:
        nodes.append(helper.make_node("Conv", [conv_in, "w"], ["y"], pads=[1, 1, 1, 1]))
    y_dims = [x_dims[0], 4, *x_dims[2:]]
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_dims)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for key, dims, kw in [("fp32", ["N", 3, 8, 8], {}), ("qdq", ["N", 3, 8, 8], {"qdq": True}),
                          ("fp16", ["N", 3, 8, 8], {"fp16": True}), ("static", [1, 3, 8, 8], {}),
                          ("dyn_h", ["N", 3, "H", 8], {}), ("other", ["N", 3, 8, 8], {"name": "other"})]:
        path = d / f"{key}.onnx"
        onnx.save(_conv_graph(dims, **kw), str(path))
        out[key] = path
    return out


# ------------------------------------------------------------------------------- fake tensorrt
class _Recorder:
    def __init__(self, trt, kind):
        object.__setattr__(self, "_trt", trt)
        object.__setattr__(self, "_kind", kind)

    def _rec(self, *call):
        self._trt.calls.append((self._kind, *call))


class FakeConfig(_Recorder):
    def __init__(self, trt):
        super().__init__(trt, "config")
        object.__setattr__(self, "profiles", [])

    def __setattr__(self, name, value):
        if name == "int8_calibrator":  # implicit INT8 is gone: INT8 comes from Q/DQ nodes
            raise AssertionError("the builder must not set an INT8 calibrator")
        self._rec("set", name, value)
        object.__setattr__(self, name, value)

    def set_flag(self, flag):
        self._rec("set_flag", flag)

    def set_memory_pool_limit(self, pool, nbytes):
        self._rec("set_memory_pool_limit", pool, nbytes)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        self._rec("add_optimization_profile", profile.shapes)
        return 0

    def create_timing_cache(self, data):
        self._rec("create_timing_cache", bytes(data))
        return SimpleNamespace(serialize=lambda: memoryview(bytes(data) + b"|timed"))

    def set_timing_cache(self, cache, ignore_mismatch):
        self._rec("set_timing_cache", ignore_mismatch)
        return True


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))


class FakeNetwork:
    def __init__(self):
        self.inputs = []

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, i):
        return self.inputs[i]


class FakeParser:
    def __init__(self, trt, network, logger):
        self.trt, self.network, self.errors = trt, network, []

    def parse_from_file(self, path):
        self.trt.calls.append(("parser", "parse_from_file", Path(path).name))
        model = onnx.load(path)
        inits = {t.name for t in model.graph.initializer}
        for vi in model.graph.input:
            if vi.name in inits:
                continue
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
            self.network.inputs.append(SimpleNamespace(name=vi.name, shape=dims))
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class FakeBuilder(_Recorder):
    def __init__(self, trt, logger):
        super().__init__(trt, "builder")
        object.__setattr__(self, "num_DLA_cores", trt.dla_cores)

    def create_network(self, flags):
        self._rec("create_network", flags)
        return FakeNetwork()

    def create_builder_config(self):
        return FakeConfig(self._trt)

    def create_optimization_profile(self):
        return FakeProfile()

    def build_serialized_network(self, network, config):
        self._rec("build_serialized_network")
        return None if self._trt.fail_build else memoryview(b"ENGINE:" + str(len(self._trt.calls)).encode())


class FakeTRT:
    """The attributes of ``tensorrt`` that export/tensorrt/builder.py uses, recording calls."""

    def __init__(self, version="10.3.0.30", dla_cores=0, fail_build=False):
        self.__version__ = version
        self.major = int(version.split(".")[0])
        self.dla_cores, self.fail_build = dla_cores, fail_build
        self.calls = []
        flags = ["GPU_FALLBACK", "TF32", "REFIT"] + (["FP16", "INT8", "BF16"] if self.major == 10 else [])
        self.BuilderFlag = SimpleNamespace(**{f: f"BuilderFlag.{f}" for f in flags})
        self.MemoryPoolType = SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE")
        self.DeviceType = SimpleNamespace(GPU="DeviceType.GPU", DLA="DeviceType.DLA")
        self.NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
        self.Logger = type("Logger", (), {"WARNING": 2, "VERBOSE": 4, "__init__": lambda s, sev: None})

    def Builder(self, logger):
        return FakeBuilder(self, logger)

    def OnnxParser(self, network, logger):
        return FakeParser(self, network, logger)

    def named(self, kind, op):
        return [c for c in self.calls if c[0] == kind and c[1] == op]




OPTS = {"precision": "fp16", "workspace_mb": 256, "min_batch": 1, "opt_batch": 4, "max_batch": 8,
        "builder_optimization_level": 4, "timing_cache": True}


# ---------------------------------------------------------------------------------- import/detect
def test_import_without_tensorrt_and_no_version():
    # Importing the package imports neither tensorrt nor torch (checked in a fresh interpreter).
    code = "import sys, export.tensorrt; assert 'torch' not in sys.modules and 'tensorrt' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    if importlib.util.find_spec("tensorrt") is None:
        assert tensorrt_version() is None
    assert tensorrt_version(SimpleNamespace(__version__="10.3.0.30")) == (10, 3, 0)


def test_compute_capability_parsing_and_detection(tmp_path, monkeypatch):
    for raw in ("8.7", "87", "sm87", "sm_87", (8, 7)):
        assert normalize_compute_capability(raw) == "8.7"
    dt = tmp_path / "compatible"
    dt.write_bytes(b"nvidia,p3737-0000+p3701-0000\x00nvidia,tegra234\x00")
    assert _from_tegra_device_tree(dt) == "8.7"
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: SimpleNamespace(returncode=0, stdout="8.9\n"))
    assert _from_nvidia_smi(0) == "8.9"


# --------------------------------------------------------------------------------------- ONNX facts
def test_inspect_onnx(models):
    info = inspect_onnx(models["fp32"])
    assert [(i.name, i.dims, i.dtype) for i in info.inputs] == [("x", ("N", 3, 8, 8), "FLOAT")]
    assert not info.has_qdq and not info.has_fp16
    assert inspect_onnx(models["qdq"]).has_qdq
    assert inspect_onnx(models["fp16"]).has_fp16 and not inspect_onnx(models["fp16"]).has_qdq


# ------------------------------------------------------------------------------------ TRT 10 plans
def test_trt10_fp16_plan_flags_profile_workspace(models):
    plan = make_build_plan(models["fp32"], OPTS, "10.3.0.30")
    assert plan.trt_version == TRT10 and not plan.strongly_typed
    assert plan.builder_flags == ("FP16",)
    assert plan.memory_pool_limits == (("WORKSPACE", 256 * MiB),)
    assert [(p.name, p.min, p.opt, p.max) for p in plan.profiles] == [
        ("x", (1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))]
    assert plan.inputs[0].sample_shape == (3, 8, 8) and plan.inputs[0].dynamic_batch
    assert plan.builder_optimization_level == 4 and plan.timing_cache
    assert plan.default_device_type == "GPU" and plan.dla_core is None
    assert not hasattr(plan, "needs_calibrator")  # implicit INT8 calibration is gone
    assert make_build_plan(models["fp32"], {"precision": "fp32"}, TRT10).builder_flags == ()


def test_trt10_int8_is_explicit_qdq_only(models):
    with pytest.raises(QdqOnnxRequiredError, match="export.quantize.quantize_piece") as err:
        make_build_plan(models["fp32"], {**OPTS, "precision": "int8"}, TRT10)
    assert err.value.option == "precision" and "QuantizeLinear" in str(err.value)
    qdq = make_build_plan(models["qdq"], {**OPTS, "precision": "int8"}, TRT10)
    assert qdq.builder_flags == ("INT8",) and qdq.onnx_has_qdq
    assert any("Q/DQ" in n for n in qdq.notes)
    best = make_build_plan(models["qdq"], {"precision": "best"}, TRT10)
    assert best.builder_flags == ("FP16", "INT8")
    best32 = make_build_plan(models["fp32"], {"precision": "best"}, TRT10)
    assert best32.builder_flags == ("FP16",) and any("FP16 only" in n for n in best32.notes)
    with pytest.raises(TensorRTConfigError, match="precision.*Q/DQ|QuantizeLinear") as err:
        make_build_plan(models["qdq"], {"precision": "fp16"}, TRT10)
    assert err.value.option == "precision"


def test_trt10_dla(models):
    dla = {"precision": "fp16", "dla_core": 1}
    plan = make_build_plan(models["fp32"], dla, TRT10, compute_capability="8.7")
    assert plan.default_device_type == "DLA" and plan.dla_core == 1
    assert plan.builder_flags == ("FP16", "GPU_FALLBACK")
    int8 = make_build_plan(models["qdq"], {"precision": "int8", "dla_core": 0}, TRT10)
    assert set(int8.builder_flags) == {"INT8", "FP16", "GPU_FALLBACK"}
    with pytest.raises(TensorRTConfigError, match="dla_core.*fp16") as err:
        make_build_plan(models["fp32"], {"precision": "fp32", "dla_core": 0}, TRT10)
    assert err.value.option == "dla_core"
    with pytest.raises(TensorRTConfigError, match="no DLA"):
        make_build_plan(models["fp32"], dla, TRT10, compute_capability="sm86")
    with pytest.raises(TensorRTConfigError, match="dynamic shapes"):
        make_build_plan(models["fp32"], {**dla, "min_batch": 1, "max_batch": 4}, TRT10)
    late = make_build_plan(models["fp32"], dla, (10, 13, 0))
    assert any("10.7" in n for n in late.notes)


# ------------------------------------------------------------------------------------ TRT 11 plans
def test_trt11_strongly_typed_no_precision_flags(models):
    plan = make_build_plan(models["fp16"], OPTS, TRT11)
    assert plan.strongly_typed and plan.builder_flags == () and plan.onnx_conversion is None
    assert plan.profiles[0].max == (8, 3, 8, 8) and plan.memory_pool_limits == (("WORKSPACE", 256 * MiB),)
    qdq = make_build_plan(models["qdq"], {"precision": "int8"}, "11.4.1")
    assert qdq.builder_flags == () and qdq.onnx_has_qdq
    assert make_build_plan(models["fp32"], {"precision": "fp32"}, TRT11).builder_flags == ()


def test_trt11_int8_without_qdq_names_modelopt(models):
    with pytest.raises(QdqOnnxRequiredError, match="modelopt.onnx.quantization") as err:
        make_build_plan(models["fp32"], {"precision": "int8"}, TRT11)
    assert err.value.option == "precision" and "QuantizeLinear" in str(err.value)
    assert "removed in 11.0" in str(err.value)


def test_trt11_fp16_needs_fp16_onnx_or_converter(models):
    with pytest.raises(Fp16OnnxRequiredError, match="AutoCast") as err:
        make_build_plan(models["fp32"], {"precision": "fp16"}, TRT11)
    assert "fp16_converter" in str(err.value) and "FP32-only" in str(err.value)
    plan = make_build_plan(models["fp32"], {"precision": "fp16"}, TRT11, allow_fp16_conversion=True)
    assert plan.onnx_conversion == "fp16" and plan.builder_flags == ()
    with pytest.raises(TensorRTConfigError, match="'fp32' but"):
        make_build_plan(models["fp16"], {"precision": "fp32"}, TRT11)


def test_trt11_dla(models):
    with pytest.raises(TensorRTConfigError, match="11.4.1"):
        make_build_plan(models["fp16"], {"precision": "fp16", "dla_core": 0}, (11, 3, 0))
    with pytest.raises(Fp16OnnxRequiredError, match="target_dla"):
        make_build_plan(models["fp32"], {"precision": "best", "dla_core": 0}, TRT11)
    plan = make_build_plan(models["fp16"], {"precision": "fp16", "dla_core": 0}, TRT11)
    assert plan.builder_flags == ("GPU_FALLBACK",) and plan.default_device_type == "DLA"


# ---------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("options, option", [
    ({"precision": "fp16", "bogus": 1}, "bogus"),
    ({"dla_core": 0}, "precision"),
    ({"precision": "int4"}, "precision"),
    ({"precision": "fp16", "dla_core": -1}, "dla_core"),
    ({"precision": "fp16", "dla_core": True}, "dla_core"),
    ({"precision": "fp16", "workspace_mb": 0}, "workspace_mb"),
    ({"precision": "fp16", "workspace_mb": 1.5}, "workspace_mb"),
    ({"precision": "fp16", "builder_optimization_level": 6}, "builder_optimization_level"),
    ({"precision": "fp16", "min_batch": 4, "opt_batch": 2}, "opt_batch"),
    ({"precision": "fp16", "opt_batch": 8, "max_batch": 4}, "max_batch"),
    ({"precision": "fp16", "min_batch": 0}, "min_batch"),
    ({"precision": "fp16", "timing_cache": "yes"}, "timing_cache"),
])
def test_invalid_options_name_the_option(models, options, option):
    with pytest.raises(TensorRTConfigError) as err:
        make_build_plan(models["fp32"], options, TRT10)
    assert err.value.option == option and f"'{option}'" in str(err.value)


def test_shape_errors(models):
    with pytest.raises(TensorRTConfigError, match="static batch of 1") as err:
        make_build_plan(models["static"], {"precision": "fp16", "max_batch": 8}, TRT10)
    assert err.value.option == "max_batch"
    static = make_build_plan(models["static"], {"precision": "fp16"}, TRT10)
    assert static.profiles == () and not static.inputs[0].dynamic_batch
    with pytest.raises(TensorRTConfigError, match="non-batch dimension 'H'"):
        make_build_plan(models["dyn_h"], {"precision": "fp16"}, TRT10)
    with pytest.raises(TensorRTConfigError, match="not supported"):
        make_build_plan(models["fp32"], {"precision": "fp16"}, "8.6.2")


def test_plan_hash_ignores_notes_and_timing_cache(models):
    a = make_build_plan(models["fp32"], OPTS, TRT10)
    b = make_build_plan(models["fp32"], {**OPTS, "timing_cache": False}, TRT10)
    c = make_build_plan(models["fp32"], {**OPTS, "precision": "fp32"}, TRT10)
    assert a.plan_hash() == b.plan_hash() != c.plan_hash()
    assert json.loads(json.dumps(a.to_dict()))["builder_flags"] == ["FP16"]


# --------------------------------------------------------------------------------------- builder
def test_builder_trt10_records_expected_calls(models, tmp_path):
    trt = FakeTRT("10.3.0.30")
    plan = make_build_plan(models["fp32"], OPTS, TRT10)
    tc = tmp_path / "timing.cache"
    tc.write_bytes(b"OLD")
    engine = build_engine(models["fp32"], plan, timing_cache_path=tc, trt=trt, log=lambda m: None)
    assert engine.startswith(b"ENGINE:")
    assert trt.named("builder", "create_network") == [("builder", "create_network", 0)]
    assert trt.named("config", "set_flag") == [("config", "set_flag", "BuilderFlag.FP16")]
    assert trt.named("config", "set_memory_pool_limit") == [
        ("config", "set_memory_pool_limit", "MemoryPoolType.WORKSPACE", 256 * MiB)]
    assert ("config", "set", "builder_optimization_level", 4) in trt.calls
    assert trt.named("config", "add_optimization_profile") == [
        ("config", "add_optimization_profile", {"x": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8))})]
    assert trt.named("config", "create_timing_cache") == [("config", "create_timing_cache", b"OLD")]
    assert trt.named("config", "set_timing_cache") == [("config", "set_timing_cache", False)]
    assert tc.read_bytes() == b"OLD|timed"  # saved after the build
    assert not any(c[2] == "default_device_type" for c in trt.named("config", "set"))


def test_builder_trt10_dla(models):
    plan = make_build_plan(models["fp32"], {"precision": "fp16", "dla_core": 1}, TRT10)
    trt = FakeTRT("10.3.0", dla_cores=2)
    build_engine(models["fp32"], plan, trt=trt, log=lambda m: None)
    sets = {c[2]: c[3] for c in trt.named("config", "set")}
    assert sets["default_device_type"] == "DeviceType.DLA" and sets["DLA_core"] == 1
    assert [c[2] for c in trt.named("config", "set_flag")] == ["BuilderFlag.FP16", "BuilderFlag.GPU_FALLBACK"]
    with pytest.raises(EngineBuildError, match="reports 0 DLA core"):
        build_engine(models["fp32"], plan, trt=FakeTRT("10.3.0", dla_cores=0), log=lambda m: None)


def test_builder_trt10_int8_from_qdq_nodes(models):
    plan = make_build_plan(models["qdq"], {"precision": "int8", "opt_batch": 4, "max_batch": 4}, TRT10)
    trt = FakeTRT("10.3.0")
    build_engine(models["qdq"], plan, trt=trt, log=lambda m: None)
    assert [c[2] for c in trt.named("config", "set_flag")] == ["BuilderFlag.INT8"]
    assert not any(c[2] == "int8_calibrator" for c in trt.named("config", "set"))
    assert not trt.named("config", "set_calibration_profile")
    trt11 = FakeTRT("11.4.1")  # strongly typed: the Q/DQ types decide, no flags at all
    build_engine(models["qdq"], make_build_plan(models["qdq"], {"precision": "int8"}, TRT11),
                 trt=trt11, log=lambda m: None)
    assert trt11.named("config", "set_flag") == []


def test_builder_trt11_strongly_typed(models, tmp_path):
    trt = FakeTRT("11.4.1")
    plan = make_build_plan(models["fp16"], OPTS, TRT11)
    build_engine(models["fp16"], plan, timing_cache_path=tmp_path / "t.cache", trt=trt, log=lambda m: None)
    assert trt.named("builder", "create_network") == [("builder", "create_network", 1 << 1)]
    assert trt.named("config", "set_flag") == []
    assert (tmp_path / "t.cache").read_bytes() == b"|timed"
    assert not hasattr(trt.BuilderFlag, "FP16")  # a plan asking for it would fail loudly


def test_builder_refuses_version_mismatch_and_failed_build(models):
    plan = make_build_plan(models["fp32"], {"precision": "fp16"}, TRT10)
    with pytest.raises(EngineBuildError, match="not portable"):
        build_engine(models["fp32"], plan, trt=FakeTRT("10.7.0"), log=lambda m: None)
    with pytest.raises(EngineBuildError, match="failed to build"):
        build_engine(models["fp32"], plan, trt=FakeTRT("10.3.0", fail_build=True), log=lambda m: None)
    renamed = dataclasses.replace(plan, inputs=(dataclasses.replace(plan.inputs[0], name="z"),))
    with pytest.raises(EngineBuildError, match="another ONNX"):
        build_engine(models["fp32"], renamed, trt=FakeTRT("10.3.0"), log=lambda m: None)


# ----------------------------------------------------------------------------------------- cache
def test_cache_key_and_layout_are_stable(tmp_path):
    key = engine_cache_key("8.7", "10.3.0.30", "ab" * 32, "cd" * 32)
    assert key == engine_cache_key("sm87", (10, 3, 0), "AB" * 32, "cd" * 32)
    # Pinned: changing the key derivation silently orphans every engine already built on devices.
    assert key == "3f13448d72a9c8007ec00721a1d2e1c03fdcd468cf4639ac8a525dbc7282223e"
    variants = {engine_cache_key("8.6", TRT10, "ab" * 32, "cd" * 32),
                engine_cache_key("8.7", (10, 3, 1), "ab" * 32, "cd" * 32),
                engine_cache_key("8.7", TRT10, "ef" * 32, "cd" * 32),
                engine_cache_key("8.7", TRT10, "ab" * 32, "00" * 32)}
    assert len(variants) == 4 and key not in variants
    assert device_dir_name("8.7", "10.3.0.30") == "sm_87_trt10.3.0"
    cache = EngineCache(tmp_path, "8.7", TRT10)
    assert cache.plan_path("seg0").relative_to(tmp_path).as_posix() == "engines/sm_87_trt10.3.0/seg0.plan"
    assert cache.sidecar_path("seg0").name == "seg0.json"
    assert cache.timing_cache_path.name == "timing.cache"
    with pytest.raises(ValueError):
        cache.plan_path("../evil")


def test_cache_store_lookup_atomic(models, tmp_path):
    plan = make_build_plan(models["fp32"], {"precision": "fp16"}, TRT10)
    cache = EngineCache(tmp_path, "8.7", TRT10)
    key = cache.key("aa" * 32, plan)
    assert cache.lookup("seg0", key) is None
    path = cache.store("seg0", b"ENGINE-BYTES", key, onnx_sha256="aa" * 32, plan=plan)
    assert cache.lookup("seg0", key) == path and path.read_bytes() == b"ENGINE-BYTES"
    meta = json.loads(cache.sidecar_path("seg0").read_text())
    assert meta["key"] == key and meta["tensorrt_version"] == "10.3.0" and meta["compute_capability"] == "8.7"
    assert sorted(p.name for p in cache.dir.iterdir()) == ["seg0.json", "seg0.plan"]  # no temp files
    path.write_bytes(b"ENGINE-BYTEZ")
    assert "corrupt" in cache.why_missing("seg0", key)
    assert cache.lookup("seg0", cache.key("bb" * 32, plan)) is None


def test_require_engine_and_bundle_build(models, tmp_path):
    bundle = tmp_path / "bundle"
    pieces = [("seg0", models["fp32"]), ("seg1", models["other"])]
    with pytest.raises(EngineNotBuiltError, match=r"pipeline engines --bundle") as err:
        require_engine(bundle, "seg0", models["fp32"], OPTS, compute_capability="8.7", trt_version=TRT10)
    assert isinstance(err.value, FileNotFoundError) and "never at first inference" in str(err.value)
    trt = FakeTRT("10.3.0.30")
    built = build_bundle_engines(bundle, OPTS, pieces, trt=trt, compute_capability="8.7", log=lambda m: None)
    assert [b.built for b in built] == [True, True]
    assert (bundle / "engines" / "sm_87_trt10.3.0" / "timing.cache").is_file()
    for piece, onnx_path in pieces:
        assert require_engine(bundle, piece, onnx_path, OPTS, compute_capability="8.7",
                              trt_version=TRT10) == bundle / "engines" / "sm_87_trt10.3.0" / f"{piece}.plan"
    again = build_bundle_engines(bundle, OPTS, pieces, trt=FakeTRT("10.3.0"), compute_capability="8.7",
                                 log=lambda m: None)
    assert [b.built for b in again] == [False, False]
    with pytest.raises(EngineNotBuiltError, match="different ONNX"):
        require_engine(bundle, "seg0", models["other"], OPTS, compute_capability="8.7", trt_version=TRT10)
    with pytest.raises(EngineNotBuiltError, match="different build options"):
        require_engine(bundle, "seg0", models["fp32"], {**OPTS, "max_batch": 16}, compute_capability="8.7",
                       trt_version=TRT10)
    with pytest.raises(EngineNotBuiltError, match="exist only for: sm_87_trt10.3.0"):
        require_engine(bundle, "seg0", models["fp32"], OPTS, compute_capability="8.7", trt_version=(10, 7, 0))


def test_bundle_build_trt11_fp16_converter(models, tmp_path):
    converted = []

    def fake_autocast(src, dst):  # stands in for ModelOpt AutoCast
        converted.append(Path(src).name)
        onnx.save(_conv_graph(["N", 3, 8, 8], fp16=True), str(dst))

    opts = {"precision": "fp16", "max_batch": 2}
    with pytest.raises(Fp16OnnxRequiredError):
        build_bundle_engines(tmp_path, opts, [("seg0", models["fp32"])], trt=FakeTRT("11.4.1"),
                             compute_capability="8.7", log=lambda m: None)
    trt = FakeTRT("11.4.1")
    built = build_bundle_engines(tmp_path, opts, [("seg0", models["fp32"])], trt=trt, compute_capability="8.7",
                                 fp16_converter=fake_autocast, log=lambda m: None)
    assert converted == ["fp32.onnx"] and built[0].plan.onnx_conversion == "fp16"
    assert trt.named("parser", "parse_from_file") == [("parser", "parse_from_file", "fp32.fp16.onnx")]
    assert require_engine(tmp_path, "seg0", models["fp32"], opts, compute_capability="8.7",
                          trt_version=TRT11).is_file()


@pytest.mark.parametrize("name", ["jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano", "nvidia-gpu",
                                  "jetson-xavier-nx"])
def test_shipped_device_profiles_make_valid_plans(models, name):
    from devices import load_profile

    profile = load_profile(name)
    options = profile.backend("tensorrt").options
    version = (profile.software.tensorrt_major, 3, 0)
    if version[0] < 10:  # JetPack 5 (TensorRT 8.5) is outside this backend: a clear error, not a crash
        with pytest.raises(TensorRTConfigError, match="onnxruntime backend"):
            make_build_plan(models["fp32"], options, version)
        return
    plan = make_build_plan(models["fp32"], options, version,
                           compute_capability=profile.hardware.gpu_compute_capability)
    assert plan.builder_flags == ("FP16",) and plan.profiles[0].max[0] == options["max_batch"]


def test_compile_plans_trt11_fp16_as_a_conversion(models):
    """`pipeline compile` for a TensorRT 11 profile with precision fp16 (or --trt-precision fp16)
    plans an AutoCast conversion that `pipeline engines` runs on the device, instead of failing."""
    from devices import load_profile
    from devices.profile import validate_profile
    from export.tensorrt.backend import build_plan
    from pipeline.export_cmd import with_tensorrt_precision

    raw = load_profile("nvidia-gpu").to_dict()
    raw["software"]["tensorrt_major"] = 11
    profile = validate_profile(raw)
    plan = build_plan(profile, models["fp32"])
    assert plan.trt_major == 11 and plan.precision == "fp16" and plan.onnx_conversion == "fp16"
    best = build_plan(with_tensorrt_precision(profile, "best"), models["fp32"])
    assert best.precision == "best"
    fp32 = build_plan(with_tensorrt_precision(profile, "fp32"), models["fp32"])
    assert fp32.onnx_conversion is None
    trt10 = build_plan(load_profile("nvidia-gpu"), models["fp32"])  # unchanged on TensorRT 10
    assert trt10.builder_flags == ("FP16",) and trt10.onnx_conversion is None


# ------------------------------------------------------------------- QDQ that TensorRT reads
def _qdq_with_zero_point(path: Path, zp: np.ndarray) -> Path:
    model = _conv_graph(["N", 3, 8, 8], qdq=True)
    for t in model.graph.initializer:
        if t.name == "zp":
            t.CopyFrom(numpy_helper.from_array(zp, "zp"))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("zp, why", [(np.array(128, np.uint8), "UINT8 zero point"),
                                     (np.array(3, np.int8), "nonzero zero point")])
def test_asymmetric_or_uint8_qdq_is_refused_by_the_plan(tmp_path, zp, why):
    """TensorRT's explicit quantization reads signed int8 Q/DQ with zero point 0 only: a uint8
    or asymmetric QDQ file (onnxruntime's default U8 activations) is refused at plan time,
    naming the node and the way to quantize for TensorRT."""
    path = _qdq_with_zero_point(tmp_path / "q.onnx", zp)
    assert why in inspect_onnx(path).qdq_problem
    for version in (TRT10, TRT11):
        with pytest.raises(TensorRTConfigError, match="TENSORRT_QDQ") as err:
            make_build_plan(path, {"precision": "int8"}, version)
        assert err.value.option == "precision" and why in str(err.value)


def test_quantize_piece_in_the_tensorrt_style_gives_a_plan(models, tmp_path):
    """`export.quantize.TENSORRT_QDQ` (what compile uses when the bundle has a tensorrt backend):
    int8 symmetric activations, fp32 biases; TensorRT 10 and 11 plan it as INT8, and ONNX Runtime
    runs the same file."""
    import onnxruntime as ort

    from export.quantize import TENSORRT_QDQ, quantize_piece

    x = np.random.default_rng(0).standard_normal((32, 3, 8, 8)).astype(np.float32)
    default = quantize_piece(models["fp32"], tmp_path / "u8.onnx", {"x": x})
    assert default["activation_type"] == "QUInt8"
    assert inspect_onnx(tmp_path / "u8.onnx").qdq_problem  # onnxruntime's default: not for TensorRT
    settings = quantize_piece(models["fp32"], tmp_path / "s8.onnx", {"x": x}, **TENSORRT_QDQ)
    assert settings["activation_type"] == "QInt8" and settings["symmetric_activations"]
    info = inspect_onnx(tmp_path / "s8.onnx")
    assert info.has_qdq and info.qdq_problem is None
    assert make_build_plan(info, {"precision": "int8"}, TRT10).builder_flags == ("INT8",)
    assert make_build_plan(info, {"precision": "int8"}, TRT11).builder_flags == ()
    out = ort.InferenceSession(str(tmp_path / "s8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x[:2]})
    assert out[0].shape == (2, 4, 8, 8)


def test_qdq_piece_precision():
    """A QDQ piece's engine precision: int8 whatever the profile says, except best (FP16 and
    INT8 on TensorRT 10); fp16 with Q/DQ nodes would be refused by the plan."""
    from export.tensorrt.backend import qdq_precision

    assert qdq_precision("fp16") == "int8" and qdq_precision("fp32") == "int8"
    assert qdq_precision("best") == "best"
