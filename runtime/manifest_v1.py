"""Reading schema v1 manifests: their stopping fields and deployment facts sat in free-form
annotations and artifact options; :func:`upgrade_v1` moves them into the v2 schema in memory.

v1 bundles record no ISA flags, so their TVM libraries are checked by architecture only.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from .backends import BACKENDS, PORTABLE, runner_options
from .host import normalize_arch
from .manifest import Deployment, DeploymentTarget, Manifest, Requirements

_CC = re.compile(r"\d{1,2}\.\d{1,2}")


def upgrade_v1(m: Manifest) -> None:
    """Fill ``m.stopping.skip_config / skip_accuracy`` and ``m.deployment`` from a v1
    manifest's annotations and artifact options; mark it schema v2."""
    ann = m.annotations if isinstance(m.annotations, dict) else {}
    st = m.stopping
    if st.calibrated:
        acc = ann.get("skip_accuracy")
        if isinstance(acc, dict) and set(acc) == set(m.skip_configs) and all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1
                for a in acc.values()):
            st.skip_accuracy = {c: float(acc[c]) for c in m.skip_configs}
        cal = ann.get("calibration")
        cfg = cal.get("skip_config") if isinstance(cal, dict) else None
        if cfg in m.skip_configs:
            st.skip_config = cfg
    if m.deployment is None and m.device is not None:
        m.deployment = _deployment(m, ann)
    from .manifest import SCHEMA_VERSION
    m.schema_version = SCHEMA_VERSION


def _deployment(m: Manifest, ann: dict) -> Deployment:
    compile_info = ann.get("compile") if isinstance(ann.get("compile"), dict) else {}
    listed = compile_info.get("backend_order") or ("tensorrt", "onnxruntime", "tvm")
    order = [b for b in listed if b in BACKENDS]
    targets = []
    ort_options: dict[str, Any] = {}
    for backend, target in m.available_targets():
        options = _first_artifact_options(m, backend, target)
        if backend == "onnxruntime" and not ort_options:
            ort_options = runner_options(backend, options, strict=False)
        targets.append(DeploymentTarget(backend=backend, target=target,
                                        requires=_requirements(backend, target, options)))
    for t in targets:
        if t.backend == PORTABLE:
            t.runner_options = dict(ort_options)
    return Deployment(profile=m.device or "unknown", backend_order=order, targets=targets)


def _first_artifact_options(m: Manifest, backend: str, target: str) -> dict:
    for p in m.pieces:
        for a in p.find_artifacts(backend, target):
            return dict(a.options or {})
    return {}


def _arch_of(text: str) -> Optional[str]:
    arch = normalize_arch(str(text).split("-")[0])
    return arch if arch in ("x86_64", "aarch64", "arm") else None


def _requirements(backend: str, target: str, options: dict) -> Requirements:
    if backend == "onnxruntime":
        return Requirements(arch=_arch_of(target))
    if backend == "tvm":
        tgt = options.get("target") if isinstance(options.get("target"), dict) else {}
        triple = str(tgt.get("mtriple") or (tgt.get("host") or {}).get("mtriple") or "")
        cuda = tgt.get("kind") == "cuda" or options.get("device") == "cuda"
        return Requirements(arch=_arch_of(triple) if triple else _arch_of(target), gpu=cuda)
    if backend == "tensorrt":
        cc = options.get("compute_capability")
        major = options.get("trt_major")
        cc = str(cc) if cc is not None and _CC.fullmatch(str(cc)) else None
        return Requirements(gpu=True, gpu_compute_capability=cc,
                            tensorrt_major=int(major) if isinstance(major, int) else None)
    return Requirements()
