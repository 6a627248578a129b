"""Portable bundle + device profile (+ backend) -> device bundle.

``compile_bundle(bundle_dir, profile)`` copies the portable ONNX pieces (so the device bundle can
be recompiled) and adds, per backend, one artifact per piece:

* ``onnxruntime``: the ORT-optimised ONNX (:mod:`export.onnxruntime_backend`);
* ``tvm``: a shared library per piece from ``export.tvm.compile_onnx`` for the profile's TVM
  target (optionally MetaSchedule-tuned with ``tune_trials``);
* ``tensorrt``: the piece's ONNX (the same file as the portable artifact; in an int8 bundle the
  int8 pieces' QDQ file, with an ``int8`` plan) plus the engine build plan in the options.
  Engines are not portable: ``pipeline engines --bundle B`` builds them on the device.

Each backend is its export module in the registry (:mod:`export.backends`). The manifest's
deployment record resolves the profile for the runtime: backend order, what each target needs of
the machine, and its runner options (providers, threads, ...).

Compiled artifacts that can run here are checked against ONNX Runtime on the portable ONNX
(every exit of every skip config, max |diff| <= 1e-4 on the logits). The directory is written
atomically; the manifest names the device profile.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import CompileError
from export.parity import compare_runners, ort_runner
from export.portable import _check_out, tool_version, write_archive
from runtime.jsonsafe import json_safe
from runtime.atomic import atomic_directory
from runtime.bundle import Bundle
from export.manifest_builder import add_artifact_file
from runtime.manifest import (MANIFEST_NAME, Deployment, DeploymentTarget, Manifest, save_manifest,
                              utc_now_iso)
from export.backends import BackendUnavailable, check_backend, export_module, portable_target
from runtime.errors import UsageError

Progress = Callable[[str], None]
VERIFY_SAMPLES = 4
#: ``compile_bundle(precision=...)`` / ``pipeline compile --precision``.
PRECISIONS = ("fp32", "int8")


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def _load_profile(profile):
    if isinstance(profile, (str, os.PathLike)):
        from devices import load_profile
        return load_profile(profile)
    return profile


def default_out_dir(bundle_dir: Path, profile_name: str) -> Path:
    name = bundle_dir.name
    for suffix in (".tar.gz", ".tgz"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return bundle_dir.with_name(f"{name}-{profile_name}")


def _portable_manifest(src: Bundle) -> Manifest:
    m = src.manifest.copy()
    for p in m.pieces:
        if not p.find_artifacts("onnx"):
            raise UsageError(f"{src.manifest_path}: piece {p.id!r} has no portable ONNX artifact; "
                             "compile needs a bundle written by `pipeline export` (or a device bundle "
                             "that kept its ONNX files)")
        p.artifacts = [a for a in p.artifacts if a.backend == "onnx"]
    m.latency = []
    return m


def _verify_inputs(m: Manifest, n: int = VERIFY_SAMPLES) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, *m.input.shape)).astype(np.float32)


def compile_bundle(bundle_dir: str | os.PathLike, profile, *, backends: Sequence[str] | None = None,
                   out_dir: str | os.PathLike | None = None, tune_trials: int = 0,
                   progress: Progress | None = print, overwrite: bool = False, archive: bool = False,
                   verify: bool = True, tuning_db_dir: str | os.PathLike | None = None,
                   precision: str | None = None, calib_images: np.ndarray | None = None,
                   quantize_options: dict[str, Any] | None = None) -> Path:
    """Compile the portable bundle at ``bundle_dir`` (a directory or .tar.gz) for ``profile``.

    ``profile``: a :class:`devices.Profile` or a profile name/alias/path. ``backends``: None ->
    every backend of the profile that can be compiled here, in profile order (others are
    reported and skipped); otherwise exactly these (an unavailable one is an error).
    ``out_dir`` defaults to ``<bundle_dir>-<profile name>`` next to the bundle. Returns it.

    ``precision``: ``"fp32"`` or ``"int8"`` (default: the profile's ``precision``). ``int8``
    quantizes the onnxruntime pieces (:func:`export.quantize.quantize_manifest`) with
    ``calib_images`` (validation images, uint8 NHWC or float32 NCHW; required), keeping each
    piece in int8 only where it measures faster and keeps its exit's argmax
    (``quantize_options``: ``min_speedup``, ``max_agreement_drop``, ``exclude``, ...). With a
    tensorrt backend the int8 pieces' tensorrt artifacts read the same QDQ files at TensorRT
    precision ``int8`` (:func:`export.tensorrt.backend.use_qdq_pieces`).
    """
    progress = progress or (lambda _m: None)
    if tune_trials < 0:
        raise UsageError(f"tune_trials must be >= 0, got {tune_trials}")
    profile = _load_profile(profile)
    precision = precision or getattr(profile, "precision", None) or "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "int8" and calib_images is None:
        raise UsageError("precision int8 needs calibration images (validation images of the "
                         "model's data set: --calib-npz FILE, or calib_images=)")
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        raise FileNotFoundError(f"bundle not found: {bundle_dir}")
    out = Path(out_dir) if out_dir is not None else default_out_dir(bundle_dir, profile.name)
    _check_out(out, overwrite)

    explicit = backends is not None
    wanted = list(dict.fromkeys(backends)) if explicit else profile.backend_order()
    chosen, skipped = [], {}
    for b in wanted:
        try:
            check_backend(profile, b)
            chosen.append(b)
        except BackendUnavailable as exc:
            if explicit:
                raise
            skipped[b] = str(exc)
            progress(f"skip    {b}: {exc}")
    if not chosen:
        raise UsageError(f"nothing to compile for profile {profile.name!r}: "
                         + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
    if precision == "int8" and "onnxruntime" not in chosen:
        raise UsageError("precision int8 quantizes the onnxruntime pieces; this compile has no "
                         f"onnxruntime backend ({', '.join(chosen)})")

    with ExitStack() as stack:
        if bundle_dir.is_file():
            from runtime.archive import unpack_bundle
            tmp_src = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bundle-src-")))
            bundle_dir = unpack_bundle(bundle_dir, tmp_src / "bundle")
        src = Bundle.open(bundle_dir)
        manifest = _portable_manifest(src)
        if explicit is False and "tensorrt" in chosen:  # a plan that cannot be made skips the backend
            try:
                for p in manifest.pieces:
                    export_module("tensorrt").build_plan(profile, src.artifact_path(p.id, "onnx"))
            except ValueError as exc:
                chosen.remove("tensorrt")
                skipped["tensorrt"] = str(exc)
                progress(f"skip    tensorrt: {exc}")
        manifest.device = profile.name
        t_all = time.perf_counter()
        progress(f"compile {src.root.name} for {profile.name} ({profile.arch}): "
                 f"{', '.join(chosen)}; {len(manifest.pieces)} pieces")
        untuned = "tvm" in chosen and not tune_trials
        if untuned:
            from export.tvm.backend import UNTUNED_NOTE
            progress(f"note    {UNTUNED_NOTE}")
        report: dict[str, Any] = {}
        with atomic_directory(out, overwrite=overwrite) as tmp:
            onnx_paths = {}
            for p in manifest.pieces:
                a = p.find_artifacts("onnx")[0]
                dst = tmp / a.file
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src.resolve(a.file), dst)
                onnx_paths[p.id] = dst
            targets: dict[str, str] = {}
            for backend in list(chosen):
                module = export_module(backend)
                target = targets[backend] = module.target_name(profile)
                t_b = time.perf_counter()
                for i, p in enumerate(manifest.pieces):
                    t0 = time.perf_counter()
                    onnx_rel = p.find_artifacts("onnx")[0].file
                    try:
                        rel, opts, note = module.compile_piece(
                            profile, onnx_paths[p.id], tmp, p.id, onnx_rel=onnx_rel,
                            target=target, tune_trials=tune_trials,
                            tuning_db_dir=Path(tuning_db_dir) if tuning_db_dir else None)
                    except Exception as exc:  # noqa: BLE001 - backends raise many types
                        why = " ".join(str(exc).split()) or type(exc).__name__
                        if explicit or i > 0:  # tool problems show on the first piece
                            raise CompileError(f"{backend} compile of piece {p.id!r} for {profile.name} "
                                               f"failed: {why}") from exc
                        chosen.remove(backend)
                        skipped[backend] = why
                        if backend != "tensorrt":  # leave no stray files behind
                            shutil.rmtree(tmp / backend / target, ignore_errors=True)
                            with contextlib.suppress(OSError):
                                (tmp / backend).rmdir()
                        progress(f"skip    {backend}: {why}")
                        break
                    art = add_artifact_file(manifest, tmp, p.id, rel, backend=backend, target=target,
                                                     options=opts, replace=True)
                    progress(f"{backend:<11} {p.id:<28} {(time.perf_counter() - t0) * 1e3:8.0f} ms  "
                             f"{art.size_bytes / 1024:8.1f} KiB  {target}  {note}")
                if backend not in chosen:
                    continue
                entry: dict[str, Any] = {"target": target, "seconds": round(time.perf_counter() - t_b, 3)}
                if verify and module.can_verify_here(profile):
                    entry["max_logits_diff_vs_onnxruntime"] = _verify(manifest, tmp, backend, target, progress)
                elif verify:
                    entry["verified"] = f"not runnable on this host ({profile.arch} target)"
                report[backend] = entry
            if not chosen:
                raise UsageError(f"nothing could be compiled for profile {profile.name!r}: "
                                 + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
            if precision == "int8":
                _quantize(manifest, tmp, profile, chosen, calib_images, quantize_options, progress)
            manifest.deployment = _deployment(profile, chosen, targets)
            manifest.annotations = {**manifest.annotations, "compile": json_safe({
                "profile": profile.name, "profile_source": profile.source, "arch": profile.arch,
                "backends": report, "skipped": skipped, "tune_trials": tune_trials,
                "precision": precision,
                "created": utc_now_iso(), "tool_version": tool_version(),
                "notes": [UNTUNED_NOTE] if untuned else [],
            })}
            save_manifest(manifest, tmp / MANIFEST_NAME)
            Bundle.open(tmp)
        progress(f"wrote {out} ({', '.join(chosen)}; {time.perf_counter() - t_all:.1f} s)")
    if archive:
        write_archive(out, overwrite=overwrite, progress=progress)
    return out


def _quantize(manifest: Manifest, root: Path, profile, chosen: list[str], images: np.ndarray,
              options: dict[str, Any] | None, progress: Progress) -> None:
    """INT8 onnxruntime pieces where they pay (the report goes to annotations.quantize); with a
    tensorrt backend the QDQ files are TensorRT's kind (int8, zero point 0) and the int8 pieces'
    tensorrt artifacts read them (explicit quantization)."""
    from export.quantize import TENSORRT_QDQ, quantize_manifest, target_facts

    if "onnxruntime" not in chosen:
        raise UsageError("precision int8 quantizes the onnxruntime pieces; this compile has no "
                         f"onnxruntime backend ({', '.join(chosen)})")
    trt = "tensorrt" in chosen
    kw = {**target_facts(profile), **(TENSORRT_QDQ if trt else {}), **dict(options or {})}
    report = quantize_manifest(manifest, root, images, progress=progress, **kw)
    if trt:
        from export.tensorrt.backend import use_qdq_pieces

        use_qdq_pieces(manifest, root, progress=progress)
    still = {a.file for p in manifest.pieces for a in p.artifacts}
    for rel in report.get("replaced_files", []):
        if rel not in still:
            with contextlib.suppress(OSError):
                (root / rel).unlink()
    progress(f"int8    {len(report['accepted'])} of {len(report['pieces'])} pieces int8 "
             f"({report['latency_kind']} on {report['target']}); fp32: "
             f"{', '.join(report['rejected']) or 'none'}")


def _deployment(profile, chosen: list[str], targets: dict[str, str]) -> Deployment:
    """The profile resolved for the runtime: backend order, and per target what it needs of
    the machine and its runner options (the portable ONNX last)."""
    entries = []
    for backend in chosen:
        requires, runner = export_module(backend).deployment(profile, targets[backend])
        entries.append(DeploymentTarget(backend=backend, target=targets[backend],
                                        requires=requires, runner_options=json_safe(runner)))
    entries.append(portable_target(profile))
    return Deployment(profile=profile.name,
                      backend_order=[b for b in profile.backend_order() if b in chosen],
                      targets=entries)


def _verify(manifest: Manifest, root: Path, backend: str, target: str, progress: Progress) -> float:
    """Chained exits of every config: compiled ``backend`` against ORT on the portable ONNX."""
    from runtime.backends import open_runner, runner_options

    x = _verify_inputs(manifest)
    ref = ort_runner({p.id: root / p.find_artifacts("onnx")[0].file for p in manifest.pieces}, threads=1)
    runners: dict[str, Any] = {}

    def run(pid: str, feeds):
        r = runners.get(pid)
        if r is None:
            a = manifest.piece(pid).find_artifacts(backend, target)[0]
            opts = runner_options(backend, a.options, strict=False)
            if backend == "onnxruntime":  # check the saved graph on the CPU provider here
                opts.update(providers=["CPUExecutionProvider"], intra_op_threads=1)
            r = runners[pid] = open_runner(backend, root / a.file, opts)
        outs = r.run({n: feeds[n] for n in r.input_names})
        names = [t.name for t in manifest.piece(pid).outputs]
        by_name = dict(zip(r.output_names, outs))
        return [by_name[n] for n in names]

    t0 = time.perf_counter()
    worst = compare_runners(manifest, ref, run, x, backend)
    progress(f"verify  {backend}: {len(manifest.execution)} skip configs x {manifest.stages} exits vs "
             f"onnxruntime on the portable ONNX ({len(x)} random inputs): max |logits diff| {worst:.1e} "
             f"[{(time.perf_counter() - t0) * 1e3:.0f} ms]")
    return worst
