"""The ``tensorrt`` backend's registry interface (export/backends.py): engine build plans.

Engines are built on the device (``pipeline engines``), so compiling a piece records its build
plan beside the portable ONNX; nothing of TensorRT is imported here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.jsonsafe import json_safe


def check_profile(profile) -> None:
    """A GPU profile that names a TensorRT major this backend supports (>= 10)."""
    from export.backends import BackendUnavailable

    if not profile.hardware.has_gpu:
        raise BackendUnavailable(f"tensorrt: profile {profile.name!r} has no GPU")
    major = profile.software.tensorrt_major
    if major is None:
        raise BackendUnavailable(f"tensorrt: profile {profile.name!r} sets no software.tensorrt_major")
    if major < 10:
        raise BackendUnavailable(f"tensorrt: profile {profile.name!r} expects TensorRT {major}; this "
                                 "backend supports TensorRT >= 10 (use its onnxruntime backend)")


def target_name(profile) -> str:
    from export.backends import artifact_id
    from export.tensorrt import sm_tag

    return artifact_id(f"{sm_tag(profile.hardware.gpu_compute_capability)}"
                       f"-trt{profile.software.tensorrt_major}")


def build_plan(profile, onnx_path: Path):
    """The engine build plan of one piece's ONNX for this profile (raises ValueError if none).

    FP16 on TensorRT >= 11 with an FP32-only ONNX is planned as a conversion
    (``onnx_conversion = "fp16"``): `pipeline engines` runs ModelOpt AutoCast
    (:func:`export.tensorrt.convert_onnx_to_fp16`) on the device before building, so a TensorRT
    11 profile with ``precision = "fp16"`` (or ``pipeline compile --trt-precision fp16``) works
    from the command line. TensorRT 10 plans are unchanged (FP16 is a builder flag there)."""
    from export.tensorrt import make_build_plan

    return make_build_plan(onnx_path, profile.backend("tensorrt").options,
                           f"{profile.software.tensorrt_major}",
                           compute_capability=profile.hardware.gpu_compute_capability,
                           allow_fp16_conversion=True)


def compile_piece(profile, onnx_path: Path, root: Path, piece_id: str, *, onnx_rel: str,
                  **_kw: Any) -> tuple[str, dict, str]:
    """The piece's ONNX itself, with the engine build plan in its options."""
    plan = build_plan(profile, onnx_path)
    major = profile.software.tensorrt_major
    opts = {"build_plan": plan.to_dict(), "profile_options": dict(profile.backend("tensorrt").options),
            "trt_major": int(major), "compute_capability": profile.hardware.gpu_compute_capability,
            "engines": "built on the device: pipeline engines --bundle <B> (engines/<sm>_trt<ver>/)"}
    return onnx_rel, json_safe(opts), f"engine build plan for TensorRT {major}.x"


def deployment(profile, target: str):
    """A GPU of the profile's compute capability and the profile's TensorRT major."""
    from runtime.manifest import Requirements

    return (Requirements(gpu=True, gpu_compute_capability=profile.hardware.gpu_compute_capability,
                         tensorrt_major=int(profile.software.tensorrt_major)), {})


def can_verify_here(profile) -> bool:
    return False
