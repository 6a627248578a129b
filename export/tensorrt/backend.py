"""The ``tensorrt`` backend's registry interface (export/backends.py): engine build plans.

Engines are built on the device (``pipeline engines``), so compiling a piece records its build
plan beside the portable ONNX; nothing of TensorRT is imported here. In an INT8 bundle
(``pipeline compile --precision int8``) :func:`use_qdq_pieces` points the tensorrt artifact of
every int8 piece at its QDQ ONNX with an ``int8`` plan (explicit quantization).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

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
            "precision": plan.precision,
            "trt_major": int(major), "compute_capability": profile.hardware.gpu_compute_capability,
            "engines": "built on the device: pipeline engines --bundle <B> (engines/<sm>_trt<ver>/)"}
    return onnx_rel, json_safe(opts), f"engine build plan for TensorRT {major}.x"


def qdq_precision(profile_precision: str) -> str:
    """The engine precision of a QDQ piece: ``best`` stays (FP16 + INT8 on TensorRT 10),
    anything else becomes ``int8`` (fp16 with Q/DQ nodes is refused by the plan)."""
    return "best" if profile_precision == "best" else "int8"


def use_qdq_pieces(manifest, root: Path, *, progress: Optional[Callable[[str], None]] = None) -> list[str]:
    """Point the tensorrt artifacts of the int8 pieces at their QDQ ONNX; returns the piece ids.

    An int8 piece is one whose onnxruntime artifact has ``precision: "int8"`` (written by
    :func:`export.quantize.quantize_manifest`). Its tensorrt artifact then names that file, its
    build plan is remade from it at :func:`qdq_precision` (the artifact's ``profile_options``,
    ``trt_major`` and ``compute_capability``), and ``precision`` / ``qdq_from`` record it, so
    ``pipeline engines`` builds an explicitly quantized engine. Other pieces keep the FP32
    ONNX and the profile's precision. Works from the manifest alone (files under ``root``)."""
    from export.manifest_builder import add_artifact_file
    from export.tensorrt import make_build_plan

    root = Path(root)
    done = []
    for p in manifest.pieces:
        qdq = [a for a in p.find_artifacts("onnxruntime") if a.options.get("precision") == "int8"]
        if not qdq:
            continue
        for art in p.find_artifacts("tensorrt"):
            opts = dict(art.options)
            popts = dict(opts.get("profile_options") or {})
            precision = qdq_precision(str(popts.get("precision", "fp16")))
            if art.file == qdq[0].file and opts.get("precision") == precision:
                continue
            plan = make_build_plan(root / qdq[0].file, {**popts, "precision": precision},
                                   f"{opts['trt_major']}", compute_capability=opts.get("compute_capability"),
                                   allow_fp16_conversion=True)
            opts.update(build_plan=plan.to_dict(), precision=precision, qdq_from=qdq[0].target)
            add_artifact_file(manifest, root, p.id, qdq[0].file, backend="tensorrt", target=art.target,
                              options=json_safe(opts), replace=True)
            done.append(p.id)
    if done and progress:
        progress(f"int8    tensorrt: {len(done)} pieces read their QDQ ONNX (explicit quantization): "
                 f"{', '.join(done)}")
    return done


def deployment(profile, target: str):
    """A GPU of the profile's compute capability and the profile's TensorRT major."""
    from runtime.manifest import Requirements

    return (Requirements(gpu=True, gpu_compute_capability=profile.hardware.gpu_compute_capability,
                         tensorrt_major=int(profile.software.tensorrt_major)), {})


def can_verify_here(profile) -> bool:
    return False
