"""Execution-provider options: profile validation, the manifest, the onnxruntime runner's session
arguments (a real InferenceSession on the CPU provider), and the saved optimisation level."""
from __future__ import annotations

import json
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from devices import load_profile
from devices.profile import ProfileError, validate_profile
from export.onnxruntime_backend import runner_settings, saved_level
from runtime.backends import onnxruntime_runner as ortr
from runtime.backends.provider_options import DEFAULT_CACHE_DIR, KNOWN, session_providers
from runtime.errors import ConfigError, ManifestError
from runtime.manifest import Deployment
from runtime.validate import Validator

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"


def _with_ort(options: dict, name: str = "jetson-orin-nano") -> dict:
    raw = load_profile(name).to_dict()
    for b in raw["backends"]:
        if b["name"] == "onnxruntime":
            b["options"].update(options)
    return raw


def _ort_index(raw: dict) -> int:
    return [b["name"] for b in raw["backends"]].index("onnxruntime")


# ------------------------------------------------------------------------------- profile


def test_known_table_covers_the_documented_options():
    assert {"trt_engine_cache_enable", "trt_engine_cache_path", "trt_fp16_enable",
            "trt_int8_enable", "device_id"} <= set(KNOWN[TRT])
    assert {"device_id", "arena_extend_strategy", "cudnn_conv_algo_search"} <= set(KNOWN[CUDA])
    assert {"device_type", "precision", "num_of_threads"} <= set(KNOWN["OpenVINOExecutionProvider"])
    assert set(KNOWN["XnnpackExecutionProvider"]) == {"intra_op_num_threads"}


def test_shipped_jetson_profile_carries_cuda_options():
    opts = load_profile("jetson-orin-nano").backend("onnxruntime").options
    assert opts["provider_options"] == {CUDA: {"device_id": 0,
                                               "arena_extend_strategy": "kSameAsRequested"}}
    assert "provider_options" not in load_profile("x86-host").backend("onnxruntime").options


def test_toml_table_per_provider_loads_and_round_trips(tmp_path):
    path = tmp_path / "trt-board.toml"
    path.write_text(textwrap.dedent("""
        name = "trt-board"
        extends = "jetson-orin-nano"
        [[backends]]
        name = "onnxruntime"
        [backends.options]
        providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        [backends.options.provider_options.TensorrtExecutionProvider]
        trt_engine_cache_enable = true
        trt_engine_cache_path = "ort-trt"
        trt_fp16_enable = true
        device_id = 0
    """))
    p = load_profile(str(path))
    po = p.backend("onnxruntime").options["provider_options"]
    assert po[TRT] == {"trt_engine_cache_enable": True, "trt_engine_cache_path": "ort-trt",
                       "trt_fp16_enable": True, "device_id": 0}
    assert po[CUDA]["arena_extend_strategy"] == "kSameAsRequested"  # inherited
    assert validate_profile(p.to_dict()).backend("onnxruntime").options == p.backend("onnxruntime").options


@pytest.mark.parametrize("options, field, reason", [
    ({CUDA: {"device_idx": 0}}, f"provider_options.{CUDA}.device_idx", "unknown key"),
    ({CUDA: {"device_id": "0"}}, f"provider_options.{CUDA}.device_id", "expected an integer"),
    ({CUDA: {"device_id": True}}, f"provider_options.{CUDA}.device_id", "expected an integer"),
    ({CUDA: {"device_id": -1}}, f"provider_options.{CUDA}.device_id", ">= 0"),
    ({CUDA: {"cudnn_conv_algo_search": "FAST"}}, f"provider_options.{CUDA}.cudnn_conv_algo_search",
     "expected one of"),
    ({"FooExecutionProvider": {}}, "provider_options.FooExecutionProvider", "unknown key"),
    ({CUDA: 3}, f"provider_options.{CUDA}", "expected an object"),
    ({TRT: {"trt_engine_cache_path": "/var/cache/trt"}}, f"provider_options.{TRT}.trt_engine_cache_path",
     "absolute path"),
    ({TRT: {"trt_engine_cache_path": "../../outside"}}, f"provider_options.{TRT}.trt_engine_cache_path",
     "'..'"),
    ({TRT: {"trt_engine_cache_enable": "yes"}}, f"provider_options.{TRT}.trt_engine_cache_enable",
     "expected true or false"),
    ({"OpenVINOExecutionProvider": {"precision": "INT4"}},
     "provider_options.OpenVINOExecutionProvider.precision", "expected one of"),
    ({"XnnpackExecutionProvider": {"intra_op_num_threads": 0}},
     "provider_options.XnnpackExecutionProvider.intra_op_num_threads", ">= 1"),
])
def test_bad_provider_options_are_one_line_naming_file_and_field(options, field, reason):
    raw = _with_ort({"provider_options": options})
    with pytest.raises(ProfileError) as err:
        validate_profile(raw, "my-board.toml")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("my-board.toml: ")
    assert err.value.field == f"backends[{_ort_index(raw)}].options.{field}", msg
    assert reason in msg, msg


def test_options_of_an_unlisted_provider_are_checked_then_left_out():
    raw = _with_ort({"providers": [CPU], "provider_options": {CUDA: {"device_id": 1}}})
    assert "provider_options" not in validate_profile(raw).backend("onnxruntime").options
    raw = _with_ort({"providers": [CPU], "provider_options": {CUDA: {"device_id": "1"}}})
    with pytest.raises(ProfileError, match="device_id: expected an integer"):
        validate_profile(raw)


# ------------------------------------------------------------------------------- manifest


def _deployment(runner_options: dict) -> dict:
    return {"profile": "p", "backend_order": ["onnxruntime"],
            "targets": [{"backend": "onnxruntime", "target": "aarch64-cuda",
                         "runner_options": runner_options}]}


def test_manifest_carries_and_checks_provider_options():
    from runtime.manifest import _V

    good = {"providers": [CUDA, CPU], "provider_options": {CUDA: {"device_id": 0}}}
    dep = Deployment._parse(_V("manifest.json"), _deployment(good), "deployment")
    assert dep.targets[0].runner_options["provider_options"] == {CUDA: {"device_id": 0}}
    assert json.loads(json.dumps(dep.to_dict()))["targets"][0]["runner_options"] == good
    bad = {"providers": [TRT], "provider_options": {TRT: {"trt_engine_cache_path": "../x"}}}
    with pytest.raises(ManifestError) as err:
        Deployment._parse(_V("manifest.json"), _deployment(bad), "deployment")
    assert ("deployment.targets[0].runner_options.provider_options.TensorrtExecutionProvider."
            "trt_engine_cache_path") in str(err.value)


# ------------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def bundle_like(tmp_path_factory) -> Path:
    """A directory with a manifest.json and a tiny ONNX below it (the runner finds the bundle
    root by walking up to manifest.json)."""
    root = tmp_path_factory.mktemp("bundle")
    (root / "manifest.json").write_text("{}")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = root / "onnxruntime" / "t" / "piece.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    return path


def test_session_providers_resolve_the_engine_cache_inside_the_bundle(tmp_path):
    opts = {TRT: {"trt_engine_cache_enable": True, "device_id": 0}, CUDA: {"device_id": 1}}
    got = session_providers([TRT, CUDA, CPU], opts, tmp_path)
    assert got == [(TRT, {"trt_engine_cache_enable": True, "device_id": 0,
                          "trt_engine_cache_path": str(tmp_path / "engines" / DEFAULT_CACHE_DIR)}),
                   (CUDA, {"device_id": 1}), (CPU, {})]
    got = session_providers([TRT], {TRT: {"trt_engine_cache_path": "a/b"}}, tmp_path)
    assert got[0][1]["trt_engine_cache_path"] == str(tmp_path / "engines" / "a" / "b")
    # only the providers given (those this onnxruntime has) get options
    assert session_providers([CPU], opts, None) == [(CPU, {})]
    with pytest.raises(ConfigError, match="trt_engine_cache_path.*no manifest.json"):
        session_providers([TRT], {TRT: {"trt_engine_cache_enable": True}}, None, "piece.onnx")


def test_real_session_gets_only_present_providers_with_their_options(bundle_like):
    opts = {TRT: {"trt_engine_cache_enable": True}, CUDA: {"device_id": 0}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ortr.ProviderUnavailableWarning)
        r = ortr.ORTPieceRunner(bundle_like, providers=[TRT, CUDA, CPU], provider_options=opts,
                                intra_op_threads=1)
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    assert [p for p, _ in r.session_providers] == [p for p in (TRT, CUDA) if p in have] + [CPU]
    assert r.providers[-1] == CPU
    x = np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)
    np.testing.assert_array_equal(r.run({"x": x})[0], np.maximum(x, 0))


def test_runner_passes_options_as_provider_tuples(bundle_like, monkeypatch):
    """The plumbing into InferenceSession: with the TensorRT and CUDA providers reported
    present, the session is asked for (name, options) tuples, the engine cache in the bundle."""
    import onnxruntime as ort

    seen = {}
    real = ort.InferenceSession

    def recording(source, sess_options=None, providers=None, **kw):
        seen["providers"] = providers
        return real(source, sess_options=sess_options, providers=[CPU])

    monkeypatch.setattr(ortr, "available_providers", lambda req: [p for p in req if p != CPU] + [CPU])
    monkeypatch.setattr(ort, "InferenceSession", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ortr.ProviderUnavailableWarning)
        ortr.ORTPieceRunner(bundle_like, providers=[TRT, CUDA, CPU], intra_op_threads=1,
                            provider_options={TRT: {"trt_engine_cache_enable": True,
                                                    "trt_engine_cache_path": "ort"},
                                              CUDA: {"cudnn_conv_algo_search": "HEURISTIC"}})
    root = bundle_like.parents[2]
    assert seen["providers"] == [
        (TRT, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(root / "engines" / "ort")}),
        (CUDA, {"cudnn_conv_algo_search": "HEURISTIC"}), (CPU, {})]


def test_runner_refuses_bad_provider_options_naming_the_artifact(bundle_like):
    with pytest.raises(ConfigError) as err:
        ortr.ORTPieceRunner(bundle_like, provider_options={CUDA: {"gpu_mem_limit": "1G"}})
    assert str(err.value).startswith(f"{bundle_like}: options.provider_options.{CUDA}.gpu_mem_limit: ")
    with pytest.raises(ConfigError, match="unknown key"):
        ortr.ORTPieceRunner(bundle_like, provider_options={"NoSuchExecutionProvider": {}})


# ------------------------------------------------------------------------------- saved level


@pytest.mark.parametrize("providers, level", [
    ([CPU], "extended"),
    ([CUDA, CPU], "basic"),
    ([TRT, CUDA, CPU], "basic"),
    (["OpenVINOExecutionProvider", CPU], "basic"),
    (["XnnpackExecutionProvider", CPU], "basic"),
])
def test_saved_level_suits_the_first_provider(providers, level):
    assert saved_level({"providers": providers, "graph_optimization_level": "all"}) == level
    assert saved_level({"providers": providers, "graph_optimization_level": "disable"}) == "disable"


def test_runner_settings_carry_provider_options_only_when_set():
    plain = runner_settings({"providers": [CPU], "intra_op_threads": 2})
    assert "provider_options" not in plain and plain["intra_op_threads"] == 2
    po = {CUDA: {"device_id": 0}}
    assert runner_settings({"providers": [CUDA, CPU], "provider_options": po})["provider_options"] == po


def test_optimize_onnx_records_level_and_provider(bundle_like, tmp_path):
    from export.onnxruntime_backend import optimize_onnx

    opts = optimize_onnx(bundle_like, tmp_path / "o.onnx",
                         {"providers": ["XnnpackExecutionProvider", CPU],
                          "provider_options": {"XnnpackExecutionProvider": {"intra_op_num_threads": 2}}})
    assert opts["saved_optimization_level"] == "basic"
    assert opts["saved_for_provider"] == "XnnpackExecutionProvider"
    assert opts["provider_options"] == {"XnnpackExecutionProvider": {"intra_op_num_threads": 2}}
    opts = optimize_onnx(bundle_like, tmp_path / "c.onnx", {"providers": [CPU]})
    assert opts["saved_optimization_level"] == "extended" and opts["saved_for_provider"] == CPU


def test_validator_is_the_shared_one():
    from runtime.backends import provider_options

    assert provider_options.Validator is Validator
