"""Portable bundle + device profile (+ backend) -> device bundle.

``compile_bundle(bundle_dir, profile)`` copies the portable ONNX pieces (so the device bundle can
be recompiled) and adds, per backend, one artifact per piece:

* ``onnxruntime``: the ORT-optimised ONNX (:mod:`export.onnxruntime_backend`), with the
  profile's providers, thread counts and optimisation level in the artifact options;
* ``tvm``: a shared library per piece from ``export.tvm.compile_onnx`` for the profile's TVM
  target (optionally MetaSchedule-tuned with ``tune_trials``);
* ``tensorrt``: the piece's ONNX (the same file as the portable artifact) plus the engine build
  plan in the options. Engines are not portable: ``pipeline engines --bundle B`` builds them on
  the device.

Compiled artifacts that can run here are checked against ONNX Runtime on the portable ONNX
(every exit of every skip config, max |diff| <= 1e-4 on the logits). The directory is written
atomically; the manifest names the device profile.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from export.onnx_export import ExportError
from export.parity import compare_runners, ort_runner
from export.portable import _check_out, tool_version, write_archive
from runtime.jsonsafe import json_safe
from runtime.atomic import atomic_directory
from runtime.bundle import Bundle
from runtime.manifest import MANIFEST_NAME, Manifest, save_manifest, utc_now_iso

Progress = Callable[[str], None]
COMPILE_BACKENDS = ("onnxruntime", "tvm", "tensorrt")
VERIFY_SAMPLES = 4
UNTUNED_NOTE = ("untuned TVM CPU code is far slower than ONNX Runtime here (20-70x on the ResNet "
                "pieces, docs/export.md): tune with --tune-trials N; the profile's backend order "
                "decides which backend the runtime prefers")

_ID_BAD = re.compile(r"[^A-Za-z0-9_.+\-]")


def _ident(text: str) -> str:
    s = _ID_BAD.sub("-", text).strip("-.") or "target"
    return s[:128]


class BackendUnavailable(ValueError):
    """A backend cannot be compiled here (or not for this profile)."""


class CompileError(ExportError):
    """A backend failed to compile a piece."""


# ---------------------------------------------------------------------------------------------
# per-backend availability and targets
# ---------------------------------------------------------------------------------------------

def _tvm_target_name(target: dict, arch: str) -> str:
    from export.tvm import target_slug
    return _ident(target_slug(target))


def _tvm_device(target: dict) -> str:
    return "cuda" if target.get("kind") == "cuda" else "cpu"


def check_backend(profile, backend: str) -> None:
    """Raise :class:`BackendUnavailable` saying why ``backend`` cannot be compiled here."""
    spec = profile.backend(backend)
    if backend not in COMPILE_BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; known: {', '.join(COMPILE_BACKENDS)}")
    if spec is None:
        raise BackendUnavailable(f"profile {profile.name!r} has no {backend} backend "
                                 f"(it has: {', '.join(profile.backend_order()) or 'none'})")
    if backend == "onnxruntime":
        import onnxruntime  # noqa: F401  (a hard dependency)
    elif backend == "tvm":
        try:
            from export.tvm import cross_compiler, validate_target
            from export.tvm.compile import require_tvm
        except ImportError as exc:
            raise BackendUnavailable(f"tvm: cannot import export.tvm ({exc})") from None
        try:
            require_tvm()
        except ImportError as exc:
            raise BackendUnavailable(f"tvm: {exc}") from None
        target = spec.options.get("target") or {}
        try:
            validate_target(target, check_with_tvm=False)
        except ValueError as exc:
            raise BackendUnavailable(f"tvm: bad target in profile {profile.name!r}: {exc}") from None
        if target.get("kind") == "cuda" and shutil.which("nvcc") is None:
            raise BackendUnavailable("tvm: the profile's target is CUDA and nvcc is not on PATH "
                                     "(kernels are compiled ahead of time)")
        cxx = cross_compiler(target)
        if shutil.which(cxx) is None:
            raise BackendUnavailable(f"tvm: linking for this target needs {cxx}, which is not on PATH"
                                     + (" (apt install g++-aarch64-linux-gnu)" if "aarch64" in cxx else ""))
    elif backend == "tensorrt":
        if not profile.hardware.has_gpu:
            raise BackendUnavailable(f"tensorrt: profile {profile.name!r} has no GPU")
        major = profile.software.tensorrt_major
        if major is None:
            raise BackendUnavailable(f"tensorrt: profile {profile.name!r} sets no software.tensorrt_major")
        if major < 10:
            raise BackendUnavailable(f"tensorrt: profile {profile.name!r} expects TensorRT {major}; this "
                                     "backend supports TensorRT >= 10 (use its onnxruntime backend)")


# ---------------------------------------------------------------------------------------------
# compilers: (profile, spec options, onnx path, out dir, rel stem) -> (relpath, options)
# ---------------------------------------------------------------------------------------------

def _compile_ort(profile, options: dict, onnx_path: Path, root: Path, piece_id: str, *, target: str, **_kw):
    from export.onnxruntime_backend import optimize_onnx

    rel = f"onnxruntime/{target}/{piece_id}.onnx"
    opts = optimize_onnx(onnx_path, root / rel, options)
    return rel, opts, f"saved at level '{opts['saved_optimization_level']}'"


def _compile_tvm(profile, options: dict, onnx_path: Path, root: Path, piece_id: str, *, target: str,
                 tune_trials: int = 0, tuning_db_dir: Path | None = None, **_kw):
    from export.tvm import compile_onnx

    rel = f"tvm/{target}/{piece_id}.so"
    tvm_target = dict(options["target"])
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    artifact = compile_onnx(onnx_path, tvm_target, root / rel, tune_trials=tune_trials,
                            tuning_db_dir=tuning_db_dir, progress=None)
    info = _artifact_info(artifact)
    lib = Path(info.pop("path", root / rel)).resolve()
    rel = lib.relative_to(root.resolve()).as_posix()
    meta = lib.with_name(lib.name + ".json")  # the runner reads names/batch from this sidecar
    if meta.is_file():
        from runtime.manifest import sha256_file
        info["metadata"] = {"file": meta.relative_to(root.resolve()).as_posix(),
                            "sha256": sha256_file(meta), "size_bytes": meta.stat().st_size}
    opts = {"target": tvm_target, "opt_level": options.get("opt_level", 3), "device": _tvm_device(tvm_target),
            "tune_trials": int(tune_trials), "tuned": bool(tune_trials), **info}
    what = "tuned" if opts.get("tuned") else "untuned"
    return rel, json_safe(opts), f"{what} {tvm_target.get('kind')}, batch {opts.get('batch') or 'any'}"


def _artifact_info(artifact: Any) -> dict:
    """JSON-able fields of export.tvm's TVMArtifact (whatever its exact shape)."""
    if artifact is None:
        return {}
    if hasattr(artifact, "to_dict"):
        d = dict(artifact.to_dict())
    elif hasattr(artifact, "__dataclass_fields__"):
        d = {k: getattr(artifact, k) for k in artifact.__dataclass_fields__}
    elif isinstance(artifact, dict):
        d = dict(artifact)
    else:
        return {}
    out = {}
    for k, v in d.items():
        if k in ("path", "file", "library"):
            if v is not None and Path(v).is_absolute():
                out["path"] = str(v)
            continue
        if k in ("target", "tuning_db"):  # the profile's dict is kept; cache paths are host-local
            continue
        out[k] = v
    return out


def _trt_plan(profile, options: dict, onnx_path: Path):
    from export.tensorrt import make_build_plan

    return make_build_plan(onnx_path, options, f"{profile.software.tensorrt_major}",
                           compute_capability=profile.hardware.gpu_compute_capability)


def _compile_trt(profile, options: dict, onnx_path: Path, root: Path, piece_id: str, *, onnx_rel: str, **_kw):
    plan = _trt_plan(profile, options, onnx_path)
    opts = {"build_plan": plan.to_dict(), "profile_options": dict(options),
            "trt_major": int(profile.software.tensorrt_major),
            "compute_capability": profile.hardware.gpu_compute_capability,
            "engines": "built on the device: pipeline engines --bundle <B> (engines/<sm>_trt<ver>/)"}
    return onnx_rel, json_safe(opts), f"engine build plan for TensorRT {profile.software.tensorrt_major}.x"


_COMPILERS = {"onnxruntime": _compile_ort, "tvm": _compile_tvm, "tensorrt": _compile_trt}


def _target(profile, backend: str) -> str:
    options = profile.backend(backend).options
    if backend == "onnxruntime":
        from export.onnxruntime_backend import target_name
        return _ident(target_name(profile.arch, options))
    if backend == "tvm":
        return _tvm_target_name(options.get("target") or {}, profile.arch)
    from export.tensorrt import sm_tag
    return _ident(f"{sm_tag(profile.hardware.gpu_compute_capability)}-trt{profile.software.tensorrt_major}")


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
            raise ValueError(f"{src.manifest_path}: piece {p.id!r} has no portable ONNX artifact; "
                             "compile needs a bundle written by `pipeline export` (or a device bundle "
                             "that kept its ONNX files)")
        p.artifacts = [a for a in p.artifacts if a.backend == "onnx"]
    m.latency = []
    return m


def _verify_inputs(m: Manifest, n: int = VERIFY_SAMPLES) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, *m.input.shape)).astype(np.float32)


def _can_run_here(profile, backend: str) -> bool:
    if backend == "onnxruntime":
        return True
    if backend == "tvm":
        target = profile.backend("tvm").options.get("target") or {}
        return target.get("kind", "llvm") == "llvm" and profile.is_host_compatible()
    return False


def compile_bundle(bundle_dir: str | os.PathLike, profile, *, backends: Sequence[str] | None = None,
                   out_dir: str | os.PathLike | None = None, tune_trials: int = 0,
                   progress: Progress | None = print, overwrite: bool = False, archive: bool = False,
                   verify: bool = True, tuning_db_dir: str | os.PathLike | None = None) -> Path:
    """Compile the portable bundle at ``bundle_dir`` (a directory or .tar.gz) for ``profile``.

    ``profile``: a :class:`devices.Profile` or a profile name/alias/path. ``backends``: None ->
    every backend of the profile that can be compiled here, in profile order (others are
    reported and skipped); otherwise exactly these (an unavailable one is an error).
    ``out_dir`` defaults to ``<bundle_dir>-<profile name>`` next to the bundle. Returns it.
    """
    progress = progress or (lambda _m: None)
    if tune_trials < 0:
        raise ValueError(f"tune_trials must be >= 0, got {tune_trials}")
    profile = _load_profile(profile)
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
        raise ValueError(f"nothing to compile for profile {profile.name!r}: "
                         + "; ".join(f"{b}: {why}" for b, why in skipped.items()))

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
                    _trt_plan(profile, profile.backend("tensorrt").options,
                              src.artifact_path(p.id, "onnx"))
            except ValueError as exc:
                chosen.remove("tensorrt")
                skipped["tensorrt"] = str(exc)
                progress(f"skip    tensorrt: {exc}")
        manifest.device = profile.name
        t_all = time.perf_counter()
        progress(f"compile {src.root.name} for {profile.name} ({profile.arch}): "
                 f"{', '.join(chosen)}; {len(manifest.pieces)} pieces")
        if "tvm" in chosen and not tune_trials:
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
            for backend in list(chosen):
                spec_options = dict(profile.backend(backend).options)
                target = _target(profile, backend)
                t_b = time.perf_counter()
                for i, p in enumerate(manifest.pieces):
                    t0 = time.perf_counter()
                    onnx_rel = p.find_artifacts("onnx")[0].file
                    try:
                        rel, opts, note = _COMPILERS[backend](
                            profile, spec_options, onnx_paths[p.id], tmp, p.id, onnx_rel=onnx_rel,
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
                    art = manifest.add_artifact_file(tmp, p.id, rel, backend=backend, target=target,
                                                     options=opts, replace=True)
                    progress(f"{backend:<11} {p.id:<28} {(time.perf_counter() - t0) * 1e3:8.0f} ms  "
                             f"{art.size_bytes / 1024:8.1f} KiB  {target}  {note}")
                if backend not in chosen:
                    continue
                entry: dict[str, Any] = {"target": target, "seconds": round(time.perf_counter() - t_b, 3)}
                if verify and _can_run_here(profile, backend):
                    entry["max_logits_diff_vs_onnxruntime"] = _verify(manifest, tmp, backend, target, progress)
                elif verify:
                    entry["verified"] = f"not runnable on this host ({profile.arch} target)"
                report[backend] = entry
            if not chosen:
                raise ValueError(f"nothing could be compiled for profile {profile.name!r}: "
                                 + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
            manifest.annotations = {**manifest.annotations, "compile": json_safe({
                "profile": profile.name, "profile_source": profile.source, "arch": profile.arch,
                "backend_order": [b for b in profile.backend_order() if b in chosen],
                "backends": report, "skipped": skipped, "tune_trials": tune_trials,
                "created": utc_now_iso(), "tool_version": tool_version(),
                "notes": [UNTUNED_NOTE] if "tvm" in chosen and not tune_trials else [],
            })}
            save_manifest(manifest, tmp / MANIFEST_NAME)
            Bundle.open(tmp)
        progress(f"wrote {out} ({', '.join(chosen)}; {time.perf_counter() - t_all:.1f} s)")
    if archive:
        write_archive(out, overwrite=overwrite, progress=progress)
    return out


def _verify(manifest: Manifest, root: Path, backend: str, target: str, progress: Progress) -> float:
    """Chained exits of every config: compiled ``backend`` against ORT on the portable ONNX."""
    from runtime.backends import open_runner

    x = _verify_inputs(manifest)
    ref = ort_runner({p.id: root / p.find_artifacts("onnx")[0].file for p in manifest.pieces}, threads=1)
    runners: dict[str, Any] = {}

    def run(pid: str, feeds):
        r = runners.get(pid)
        if r is None:
            a = manifest.piece(pid).find_artifacts(backend, target)[0]
            opts = dict(a.options)
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
