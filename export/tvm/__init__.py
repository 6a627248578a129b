"""Apache TVM backend of the export side: targets, compilation, MetaSchedule tuning.

``tvm`` itself is imported lazily, so importing this package works without TVM installed; the
functions that need it raise an ImportError naming the packages to install.
"""

from .compile import TVMArtifact, compile_onnx, metadata_path
from .targets import (
    TargetError,
    cross_compiler,
    default_cuda_host,
    target_arch,
    target_slug,
    to_tvm_target,
    validate_target,
)
from .tune import default_tuning_root, sha256_file, tuning_cache_key

__all__ = [
    "TVMArtifact",
    "TargetError",
    "compile_onnx",
    "cross_compiler",
    "default_cuda_host",
    "default_tuning_root",
    "metadata_path",
    "sha256_file",
    "target_arch",
    "target_slug",
    "to_tvm_target",
    "tuning_cache_key",
    "validate_target",
]
