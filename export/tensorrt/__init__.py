"""TensorRT backend: per-device engine build plans, on-device engine builds, engine cache.

Importing this package never imports ``tensorrt``: the configuration logic is pure Python and
every TensorRT call goes through an injectable ``trt`` module. TensorRT has not been run in this
project's CI or development machines; the configuration logic is unit-tested against a fake
module. See docs/tensorrt.md.
"""
from export.tensorrt.builder import BuiltEngine, build_bundle_engines, build_engine, require_tensorrt
from export.tensorrt.cache import (
    ENGINES_DIR,
    EngineCache,
    device_dir_name,
    engine_cache_key,
    require_engine,
    sha256_file,
)
from export.tensorrt.config import (
    EngineBuildError,
    EngineBuildPlan,
    EngineNotBuiltError,
    Fp16OnnxRequiredError,
    InputSpec,
    OnnxInfo,
    QdqOnnxRequiredError,
    ShapeProfile,
    TensorRTConfigError,
    TensorRTError,
    TensorRTOptions,
    TensorRTUnavailableError,
    convert_onnx_to_fp16,
    inspect_onnx,
    make_build_plan,
    normalize_compute_capability,
    parse_trt_version,
    sm_tag,
    validate_options,
)
from export.tensorrt.detect import gpu_compute_capability, tensorrt_version

__all__ = [
    "BuiltEngine", "ENGINES_DIR", "EngineBuildError",
    "EngineBuildPlan", "EngineCache", "EngineNotBuiltError", "Fp16OnnxRequiredError", "InputSpec",
    "OnnxInfo", "QdqOnnxRequiredError", "ShapeProfile", "TensorRTConfigError", "TensorRTError",
    "TensorRTOptions", "TensorRTUnavailableError", "build_bundle_engines", "build_engine",
    "convert_onnx_to_fp16", "device_dir_name", "engine_cache_key",
    "gpu_compute_capability", "inspect_onnx", "make_build_plan",
    "normalize_compute_capability", "parse_trt_version", "require_engine", "require_tensorrt",
    "sha256_file", "sm_tag", "tensorrt_version", "validate_options",
]
