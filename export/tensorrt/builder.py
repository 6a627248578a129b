"""Apply an :class:`EngineBuildPlan` to a real ``tensorrt`` module and build serialized engines.

Runs ON the target device (e.g. a Jetson Orin): TensorRT plans are not portable across GPUs or
TensorRT versions. Every function takes the ``tensorrt`` module as an injectable ``trt``
argument (default: the guarded import), so the exact sequence of TensorRT calls is unit-tested
against a fake module. TensorRT itself has not been run in this project's CI or development
machines.

TensorRT Python calls used (present in 10.x and 11.x unless noted): ``trt.Logger``,
``trt.Builder``, ``builder.create_network(flags)``, ``builder.create_builder_config()``,
``builder.create_optimization_profile()``, ``builder.build_serialized_network(network, config)``,
``builder.num_DLA_cores``, ``trt.OnnxParser(network, logger).parse_from_file(path)``,
``config.set_flag(trt.BuilderFlag.X)``, ``config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, n)``,
``config.builder_optimization_level``, ``config.default_device_type = trt.DeviceType.DLA``,
``config.DLA_core``, ``profile.set_shape(name, min, opt, max)``, ``config.add_optimization_profile``,
``config.create_timing_cache(bytes)``, ``config.set_timing_cache(cache, ignore_mismatch)``,
``cache.serialize()``; ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (the default, and
ignored, in 11). INT8 is explicit quantization only: the ONNX carries Q/DQ nodes (``pipeline
compile --precision int8``, :mod:`export.quantize`) and the parser reads them; no
``int8_calibrator`` (implicit calibration was deprecated in TensorRT 10.1 and removed in 11).
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.tensorrt.cache import EngineCache, sha256_file, write_atomic
from export.tensorrt.config import (
    EngineBuildError,
    EngineBuildPlan,
    TensorRTError,
    TensorRTUnavailableError,
    inspect_onnx,
    make_build_plan,
    normalize_compute_capability,
    version_str,
)
from export.tensorrt.detect import gpu_compute_capability, import_tensorrt, tensorrt_version

_LOG = logging.getLogger("export.tensorrt")


def _default_log(msg: str) -> None:
    _LOG.info(msg)


def require_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailableError` with install hints."""
    trt = import_tensorrt()
    if trt is None:
        raise TensorRTUnavailableError(
            "TensorRT is not installed (import tensorrt failed). On Jetson it ships with JetPack "
            "(JetPack 6 -> TensorRT 10.3: apt install python3-libnvinfer); on x86/SBSA: pip install "
            "'tensorrt>=10'. Engines must be built on the target device.")
    return trt


def _to_bytes(buf: Any) -> bytes:
    if isinstance(buf, bytes):
        return buf
    if hasattr(buf, "tobytes"):
        return buf.tobytes()
    return bytes(memoryview(buf))


def _member(trt, enum_name: str, member: str):
    enum = getattr(trt, enum_name, None)
    value = getattr(enum, member, None) if enum is not None else None
    if value is None:
        raise EngineBuildError(f"trt.{enum_name}.{member} does not exist in TensorRT "
                               f"{getattr(trt, '__version__', '?')}; the build plan does not match this "
                               "TensorRT version")
    return value


def build_engine(onnx_path: str | Path, plan: EngineBuildPlan,
                 timing_cache_path: str | Path | None = None,
                 log: Callable[[str], None] | None = None, *, trt=None, verbose: bool = False) -> bytes:
    """Parse ``onnx_path``, apply ``plan`` and return the serialized engine bytes.

    INT8 comes from the Q/DQ nodes of the ONNX (explicit quantization), never a calibrator.
    ``timing_cache_path``: read (if present) and rewritten when ``plan.timing_cache``.
    """
    trt = trt if trt is not None else require_tensorrt()
    log = log or _default_log
    installed = tensorrt_version(trt)
    if installed is not None and installed != tuple(plan.trt_version):
        raise EngineBuildError(f"the build plan was made for TensorRT {version_str(plan.trt_version)} but "
                               f"TensorRT {version_str(installed)} is installed; make the plan with the "
                               "installed version (engines are not portable across TensorRT versions)")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file not found: {onnx_path}")

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)

    if plan.default_device_type == "DLA":
        cores = int(getattr(builder, "num_DLA_cores", 0) or 0)
        if plan.dla_core is None or plan.dla_core >= cores:
            raise EngineBuildError(
                f"tensorrt option 'dla_core': this device reports {cores} DLA core(s) to TensorRT "
                f"{version_str(plan.trt_version)}, so dla_core={plan.dla_core} is unavailable (Orin Nano "
                "and Thor have no DLA; DLA needs TensorRT <= 10.7 or >= 11.4.1 on JetPack 7.2.2+)")

    network_flags = 0
    if plan.strongly_typed:
        member = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
        if member is not None:  # default (and ignored) on TensorRT 11; opt-in on 10.x
            network_flags |= 1 << int(member)
        elif plan.trt_major < 11:
            raise EngineBuildError("this TensorRT has no NetworkDefinitionCreationFlag.STRONGLY_TYPED")
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors or ["(no detail)"]))

    net_inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        net_inputs[tensor.name] = tuple(tensor.shape)
    want = {s.name: s for s in plan.inputs}
    if set(net_inputs) != set(want):
        raise EngineBuildError(f"network inputs {sorted(net_inputs)} differ from the plan's {sorted(want)}: "
                               "the plan was made from another ONNX")
    for name, shape in net_inputs.items():
        if tuple(shape[1:]) != want[name].sample_shape:
            raise EngineBuildError(f"network input '{name}' has shape {shape}, the plan expects "
                                   f"(batch, {', '.join(map(str, want[name].sample_shape))})")

    config = builder.create_builder_config()
    for pool, nbytes in plan.memory_pool_limits:
        config.set_memory_pool_limit(_member(trt, "MemoryPoolType", pool), int(nbytes))
    for flag in plan.builder_flags:
        config.set_flag(_member(trt, "BuilderFlag", flag))
    if plan.builder_optimization_level is not None:
        config.builder_optimization_level = int(plan.builder_optimization_level)
    if plan.default_device_type == "DLA":
        config.default_device_type = _member(trt, "DeviceType", "DLA")
        config.DLA_core = int(plan.dla_core)

    if plan.profiles:
        profile = builder.create_optimization_profile()
        for p in plan.profiles:
            profile.set_shape(p.name, tuple(p.min), tuple(p.opt), tuple(p.max))
        config.add_optimization_profile(profile)

    timing_cache = None
    if plan.timing_cache:
        path = Path(timing_cache_path) if timing_cache_path is not None else None
        data = path.read_bytes() if path is not None and path.is_file() else b""
        timing_cache = config.create_timing_cache(data)
        ok = config.set_timing_cache(timing_cache, False)
        if ok is False and data:
            log(f"timing cache {path} does not match this device/TensorRT; starting a new one")
            timing_cache = config.create_timing_cache(b"")
            config.set_timing_cache(timing_cache, False)
        if path is None:
            log("timing cache enabled without a path: it is used for this build only")

    log(f"building TensorRT {version_str(plan.trt_version)} engine from {onnx_path.name} "
        f"(precision={plan.precision}, flags={list(plan.builder_flags)}, device={plan.default_device_type})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log)")
    engine = _to_bytes(serialized)
    if not engine:
        raise EngineBuildError(f"TensorRT returned an empty engine for {onnx_path}")
    if timing_cache is not None and timing_cache_path is not None:
        write_atomic(Path(timing_cache_path), _to_bytes(timing_cache.serialize()))
    return engine


@dataclass(frozen=True)
class BuiltEngine:
    piece_id: str
    path: Path
    key: str
    built: bool  # False: an up-to-date engine was already in the cache
    plan: EngineBuildPlan


def build_bundle_engines(bundle_dir: str | Path, profile_options: Mapping[str, Any],
                         pieces: Sequence[tuple[str, str | Path] | tuple[str, str | Path, Mapping[str, Any]]],
                         *, trt=None,
                         compute_capability: Any = None,
                         fp16_converter: Callable[[Path, Path], Any] | None = None,
                         force: bool = False, log: Callable[[str], None] | None = None) -> list[BuiltEngine]:
    """Build (or reuse) the engine of every ``(piece_id, onnx_path)`` into ``bundle_dir/engines/``.

    What ``pipeline engines --bundle B`` runs on the device. ``profile_options`` is the device
    profile's ``tensorrt`` options dict; a ``(piece_id, onnx_path, options)`` entry builds that
    piece with its own options (an int8 piece of a mixed bundle: ``precision = "int8"``). INT8
    pieces are QDQ ONNX files (explicit quantization, :mod:`export.quantize`); there is no
    calibration step here. ``fp16_converter(src, dst)`` (e.g.
    :func:`export.tensorrt.convert_onnx_to_fp16`) is used on TensorRT >= 11 when FP16 is
    requested for an FP32-only ONNX. Up-to-date engines are kept unless ``force``.
    """
    trt = trt if trt is not None else require_tensorrt()
    log = log or _default_log
    version = tensorrt_version(trt)
    if version is None:
        raise TensorRTUnavailableError("cannot read tensorrt.__version__ from the TensorRT module")
    cc = compute_capability if compute_capability is not None else gpu_compute_capability()
    if cc is None:
        raise TensorRTError("cannot determine the GPU compute capability; pass compute_capability='8.7'")
    cc = normalize_compute_capability(cc)
    cache = EngineCache(bundle_dir, cc, version)
    results = []
    for entry in pieces:
        piece_id, onnx_path = entry[0], Path(entry[1])
        options = entry[2] if len(entry) > 2 and entry[2] is not None else profile_options
        plan = make_build_plan(onnx_path, options, version, compute_capability=cc,
                               allow_fp16_conversion=fp16_converter is not None)
        onnx_sha = sha256_file(onnx_path)
        key = cache.key(onnx_sha, plan)
        if not force and cache.lookup(piece_id, key) is not None:
            log(f"{piece_id}: engine up to date ({cache.plan_path(piece_id)})")
            results.append(BuiltEngine(piece_id, cache.plan_path(piece_id), key, False, plan))
            continue
        for note in plan.notes:
            log(f"{piece_id}: {note}")
        with tempfile.TemporaryDirectory(prefix="trt-onnx-") as tmp:
            build_onnx = onnx_path
            if plan.onnx_conversion == "fp16":
                build_onnx = Path(tmp) / f"{onnx_path.stem}.fp16.onnx"
                fp16_converter(onnx_path, build_onnx)
                if not inspect_onnx(build_onnx).has_fp16:
                    raise TensorRTError(f"{piece_id}: the FP16 converter produced no FP16 tensors in {build_onnx}")
            engine = build_engine(build_onnx, plan,
                                  cache.timing_cache_path if plan.timing_cache else None, log, trt=trt)
        path = cache.store(piece_id, engine, key, onnx_sha256=onnx_sha, plan=plan,
                           extra={"onnx_file": onnx_path.name, "onnx_conversion": plan.onnx_conversion})
        log(f"{piece_id}: stored {len(engine)} bytes at {path}")
        results.append(BuiltEngine(piece_id, path, key, True, plan))
    return results
