"""Pure-Python TensorRT build configuration: device-profile options + ONNX + TRT version -> plan.

Nothing here imports ``tensorrt``. :func:`make_build_plan` turns the ``tensorrt`` options of a
device profile, the facts read from the ONNX file (:func:`inspect_onnx`) and the TensorRT version
of the *target device* into an :class:`EngineBuildPlan` that lists exactly what the builder will
apply: network creation flags (strong typing), builder flags, memory-pool limits, optimization
profiles, DLA settings. Every combination TensorRT would
reject (or silently mis-handle) is refused here with an error that names the option and the fix.

TensorRT 10 vs 11 (checked against NVIDIA's 10.x -> 11.x migration guide):

* 10.x: weakly typed networks by default; precision is *enabled* with ``BuilderFlag.FP16`` /
  ``BuilderFlag.INT8``. INT8 here is explicit quantization only: the ONNX carries Q/DQ nodes
  (``pipeline compile --precision int8``, :mod:`export.quantize`). Implicit INT8 with an
  ``IInt8EntropyCalibrator2`` (deprecated since 10.1, removed in 11) is not supported, so one
  QDQ ONNX serves TensorRT 10, TensorRT 11, ONNX Runtime and TVM alike.
* 11.x: every network is strongly typed (``STRONGLY_TYPED`` is the default; the flag is accepted
  and ignored). ``BuilderFlag.FP16/INT8/BF16/FP8``, ``int8_calibrator`` and the calibration profile
  were removed: precision comes from the ONNX tensor types (ModelOpt AutoCast for FP16, ModelOpt
  ONNX quantization for Q/DQ INT8).
* DLA: TensorRT 10.7 is documented as the last 10.x with DLA (JetPack 6 ships 10.3); 11.0-11.4.0
  have no DLA on Jetson; 11.4.1 restores it on Jetson AGX Orin under JetPack 7.2.2+ (strongly
  typed, so the ONNX must already be FP16 or Q/DQ). DLA needs static shapes (min == opt == max).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "fp16", "int8", "best")
OPTION_KEYS = ("precision", "dla_core", "workspace_mb", "min_batch", "opt_batch", "max_batch",
               "builder_optimization_level", "timing_cache")
# GPUs that have DLA cores: Jetson AGX Xavier / Xavier NX (sm_72) and Jetson Orin (sm_87).
# Note: Orin Nano is sm_87 too but has no DLA; the builder checks builder.num_DLA_cores.
DLA_COMPUTE_CAPABILITIES = frozenset({"7.2", "8.7"})
LAST_TRT10_WITH_DLA = (10, 7, 99)
FIRST_TRT11_WITH_DLA = (11, 4, 1)
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
PLAN_SCHEMA = 1

MODELOPT_AUTOCAST_CMD = ("python -m modelopt.onnx.autocast --onnx_path {onnx} --output_path "
                         "{stem}.fp16.onnx --low_precision_type fp16 --keep_io_types")
MODELOPT_QUANTIZE_CMD = ("python -m modelopt.onnx.quantization --onnx_path {onnx} --quantize_mode int8 "
                         "--calibration_data calib.npz --output_path {stem}.int8.onnx")


# --------------------------------------------------------------------------------------- errors
from runtime.backends.tensorrt_cache import EngineNotBuiltError as _RuntimeEngineNotBuiltError  # noqa: E402
from runtime.errors import PipelineError  # noqa: E402

class TensorRTError(PipelineError, RuntimeError):
    """Base class of every error raised by ``export.tensorrt``."""


class TensorRTConfigError(TensorRTError, ValueError):
    """A device-profile option (or its combination with the ONNX / TRT version) is invalid."""

    def __init__(self, option: str | None, message: str):
        self.option = option
        super().__init__(f"tensorrt option '{option}': {message}" if option else message)


class TensorRTUnavailableError(TensorRTError, ImportError):
    """The ``tensorrt`` Python package (or libnvinfer) is not installed on this machine."""


class EngineNotBuiltError(TensorRTError, _RuntimeEngineNotBuiltError):
    """No (valid) engine for this piece / GPU / TensorRT version: build it on the device first."""


class EngineBuildError(TensorRTError):
    """TensorRT failed to parse the ONNX or to build the engine."""


class Fp16OnnxRequiredError(TensorRTConfigError):
    """TensorRT 11 + FP16 requested, but the ONNX carries no FP16 tensors."""


class QdqOnnxRequiredError(TensorRTConfigError):
    """TensorRT 11 + INT8 requested, but the ONNX carries no Q/DQ nodes."""


# ----------------------------------------------------------------------------------- versions
# One implementation of the version / compute-capability rules, shared with the runtime's engine
# lookup (runtime/ must not import export/, so it lives there).
from runtime.backends import tensorrt_cache as _cache  # noqa: E402

normalize_compute_capability = _cache.normalize_compute_capability
sm_tag = _cache.sm_tag
version_str = _cache.version_str


def parse_trt_version(version: Any) -> tuple[int, int, int]:
    """``"10.3.0.30"`` / ``(10, 3)`` / ``[11, 4, 1]`` -> ``(major, minor, patch)``."""
    try:
        return _cache.parse_trt_version(version)
    except ValueError as exc:
        raise TensorRTConfigError(None, str(exc)) from None


# ---------------------------------------------------------------------------------------- ONNX
@dataclass(frozen=True)
class OnnxInput:
    name: str
    dims: tuple[int | str | None, ...]  # int: static; str: named dynamic dim; None: unnamed dynamic
    dtype: str                          # ONNX element type name, e.g. "FLOAT", "FLOAT16"


@dataclass(frozen=True)
class OnnxInfo:
    inputs: tuple[OnnxInput, ...]
    has_qdq: bool
    has_fp16: bool
    path: str | None = None
    qdq_problem: str | None = None  # why TensorRT cannot read its Q/DQ nodes (not int8, zp != 0)


def _qdq_problem(node, inits: Mapping[str, Any]) -> str | None:
    """Why a Q/DQ node is not TensorRT's explicit quantization (signed int8, zero point 0)."""
    from onnx import TensorProto, numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        if node.op_type == "QuantizeLinear" and not any(a.name == "output_dtype" for a in node.attribute):
            return f"{node.op_type} '{node.name}' has no zero point (uint8 by default)"
        return None
    zp = inits.get(node.input[2])
    if zp is None:  # computed: not checked here
        return None
    if zp.data_type != TensorProto.INT8:
        return (f"{node.op_type} '{node.name}' has a {TensorProto.DataType.Name(zp.data_type)} "
                "zero point (TensorRT reads int8 only)")
    if numpy_helper.to_array(zp).any():
        return f"{node.op_type} '{node.name}' has a nonzero zero point (TensorRT: symmetric only)"
    return None


def _iter_graphs(graph):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _iter_graphs(attr.g)
            for sub in attr.graphs:
                yield from _iter_graphs(sub)


def inspect_onnx(source: str | Path | Any) -> OnnxInfo:
    """Read input names/shapes and whether the model carries Q/DQ nodes or FP16 tensors.

    ``source`` is a path or an ``onnx.ModelProto``. External weight files are not loaded (only
    the graph is needed).
    """
    import onnx
    from onnx import TensorProto

    path = None
    if isinstance(source, (str, Path)):
        path = str(source)
        if not Path(path).is_file():
            raise FileNotFoundError(f"ONNX file not found: {path}")
        model = onnx.load(path, load_external_data=False)
    else:
        model = source
    fp16 = TensorProto.FLOAT16
    graph = model.graph
    init_names = {t.name for t in graph.initializer}
    inputs = []
    for vi in graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            raise TensorRTConfigError(None, f"ONNX input '{vi.name}' has no shape; re-export with shapes")
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tt.shape.dim)
        inputs.append(OnnxInput(vi.name, dims, TensorProto.DataType.Name(tt.elem_type)))

    has_qdq = has_fp16 = False
    problem = None
    graphs = list(_iter_graphs(graph))
    for fn in model.functions:
        for node in fn.node:
            has_qdq |= node.op_type in QDQ_OPS and node.domain in ("", "ai.onnx")
    for g in graphs:
        if any(t.data_type == fp16 for t in g.initializer):
            has_fp16 = True
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type == fp16:
                has_fp16 = True
        inits = {t.name: t for t in g.initializer}
        for node in g.node:
            if node.op_type in QDQ_OPS and node.domain in ("", "ai.onnx"):
                has_qdq = True
                problem = problem or _qdq_problem(node, inits)
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == fp16:
                    has_fp16 = True
                if attr.HasField("t") and attr.t.data_type == fp16:
                    has_fp16 = True
    return OnnxInfo(tuple(inputs), has_qdq, has_fp16, path, problem)


# ---------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class TensorRTOptions:
    precision: str
    dla_core: int | None = None
    workspace_mb: int | None = None
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    builder_optimization_level: int | None = None
    timing_cache: bool = False

    @property
    def batch_given(self) -> bool:
        return any(v is not None for v in (self.min_batch, self.opt_batch, self.max_batch))

    def batch_range(self) -> tuple[int, int, int]:
        """(min, opt, max); defaults: min 1, opt = min, max = max(opt, min)."""
        lo = 1 if self.min_batch is None else self.min_batch
        opt = lo if self.opt_batch is None else self.opt_batch
        hi = max(opt, lo) if self.max_batch is None else self.max_batch
        return lo, opt, hi


def _int_option(opts: Mapping[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    value = opts.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TensorRTConfigError(key, f"must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise TensorRTConfigError(key, f"must be {rng}, got {value}")
    return value


def validate_options(options: Mapping[str, Any] | TensorRTOptions) -> TensorRTOptions:
    """Check a device profile's ``tensorrt`` options dict and return it normalized."""
    if isinstance(options, TensorRTOptions):
        return options
    if not isinstance(options, Mapping):
        raise TensorRTConfigError(None, f"tensorrt options must be a mapping, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise TensorRTConfigError(unknown[0], f"unknown option (allowed: {', '.join(OPTION_KEYS)})")
    precision = options.get("precision")
    if precision is None:
        raise TensorRTConfigError("precision", f"is required (one of {', '.join(PRECISIONS)})")
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise TensorRTConfigError("precision", f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    timing_cache = options.get("timing_cache", False)
    if not isinstance(timing_cache, bool):
        raise TensorRTConfigError("timing_cache", f"must be true or false, got {timing_cache!r}")
    opts = TensorRTOptions(
        precision=precision.lower(),
        dla_core=_int_option(options, "dla_core", 0),
        workspace_mb=_int_option(options, "workspace_mb", 1),
        min_batch=_int_option(options, "min_batch", 1),
        opt_batch=_int_option(options, "opt_batch", 1),
        max_batch=_int_option(options, "max_batch", 1),
        builder_optimization_level=_int_option(options, "builder_optimization_level", 0, 5),
        timing_cache=timing_cache,
    )
    lo, opt, hi = opts.batch_range()
    if not lo <= opt <= hi:
        # With the defaults, opt < min only if opt_batch was given, opt > max only if max_batch was.
        bad = "opt_batch" if opt < lo else "max_batch"
        raise TensorRTConfigError(bad, f"batch profile must satisfy min_batch <= opt_batch <= max_batch, "
                                       f"got min={lo} opt={opt} max={hi}")
    return opts


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class InputSpec:
    name: str
    sample_shape: tuple[int, ...]  # per-sample shape (without the batch axis)
    dtype: str
    dynamic_batch: bool
    static_batch: int | None = None


@dataclass(frozen=True)
class ShapeProfile:
    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class EngineBuildPlan:
    """Exactly what :func:`export.tensorrt.builder.build_engine` applies to TensorRT.

    ``builder_flags`` are ``trt.BuilderFlag`` member names; ``memory_pool_limits`` pairs
    ``trt.MemoryPoolType`` member names with bytes; ``default_device_type`` is a
    ``trt.DeviceType`` member name.
    """
    trt_version: tuple[int, int, int]
    precision: str
    inputs: tuple[InputSpec, ...]
    strongly_typed: bool
    builder_flags: tuple[str, ...] = ()
    memory_pool_limits: tuple[tuple[str, int], ...] = ()
    profiles: tuple[ShapeProfile, ...] = ()
    default_device_type: str = "GPU"
    dla_core: int | None = None
    builder_optimization_level: int | None = None
    timing_cache: bool = False
    onnx_has_qdq: bool = False
    onnx_has_fp16: bool = False
    onnx_conversion: str | None = None  # "fp16": run an AutoCast hook on the ONNX before building
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def trt_major(self) -> int:
        return self.trt_version[0]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def plan_hash(self) -> str:
        """Hash of everything that determines the engine (not notes, not timing-cache use)."""
        d = self.to_dict()
        d.pop("notes", None)
        d.pop("timing_cache", None)
        d["schema"] = PLAN_SCHEMA
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _input_specs(info: OnnxInfo, opts: TensorRTOptions) -> tuple[tuple[InputSpec, ...], tuple[ShapeProfile, ...]]:
    if not info.inputs:
        raise TensorRTConfigError(None, "the ONNX model has no graph inputs")
    lo, opt, hi = opts.batch_range()
    specs, profiles = [], []
    for inp in info.inputs:
        if not inp.dims:
            raise TensorRTConfigError(None, f"ONNX input '{inp.name}' is a scalar; expected a batch axis")
        batch, rest = inp.dims[0], inp.dims[1:]
        for axis, d in enumerate(rest, start=1):
            if not isinstance(d, int) or d <= 0:
                raise TensorRTConfigError(
                    None, f"ONNX input '{inp.name}' has a dynamic non-batch dimension {d!r} at axis "
                          f"{axis}; only the batch axis may be dynamic - re-export with fixed sizes")
        sample = tuple(int(d) for d in rest)
        if isinstance(batch, int) and batch > 0:
            if opts.batch_given and (lo, opt, hi) != (batch, batch, batch):
                key = ("max_batch" if opts.max_batch is not None
                       else "opt_batch" if opts.opt_batch is not None else "min_batch")
                raise TensorRTConfigError(
                    key, f"ONNX input '{inp.name}' has a static batch of {batch} but the profile asks for "
                         f"min/opt/max = {lo}/{opt}/{hi}; re-export the segment with a dynamic batch axis "
                         f"or set min_batch = opt_batch = max_batch = {batch}")
            specs.append(InputSpec(inp.name, sample, inp.dtype, False, batch))
        else:
            specs.append(InputSpec(inp.name, sample, inp.dtype, True, None))
            profiles.append(ShapeProfile(inp.name, (lo, *sample), (opt, *sample), (hi, *sample)))
    return tuple(specs), tuple(profiles)


def make_build_plan(onnx: str | Path | Any | OnnxInfo,
                    options: Mapping[str, Any] | TensorRTOptions,
                    trt_version: Any,
                    *,
                    compute_capability: Any = None,
                    allow_fp16_conversion: bool = False) -> EngineBuildPlan:
    """Validate ``options`` against the ONNX and the TensorRT version and return the build plan.

    ``allow_fp16_conversion``: on TensorRT >= 11 an FP16 (or DLA) request on an FP32-only ONNX
    is normally an error; with this set, the plan instead records ``onnx_conversion="fp16"`` and
    the caller must run an FP16 converter (e.g. :func:`convert_onnx_to_fp16`, ModelOpt AutoCast)
    on the ONNX before building (``build_bundle_engines(fp16_converter=...)`` does this).
    """
    info = onnx if isinstance(onnx, OnnxInfo) else inspect_onnx(onnx)
    opts = validate_options(options)
    version = parse_trt_version(trt_version)
    if version[0] < 10:
        raise TensorRTConfigError(None, f"TensorRT {version_str(version)} is not supported: this backend "
                                        "targets TensorRT 10.x (JetPack 6) and 11.x; JetPack 5 devices "
                                        "(Xavier, TensorRT 8.5) should use the onnxruntime backend")
    onnx_name = Path(info.path).name if info.path else "model.onnx"
    stem = Path(onnx_name).stem
    if info.has_qdq and info.qdq_problem:
        raise TensorRTConfigError(
            "precision", f"{onnx_name}: {info.qdq_problem}; TensorRT's explicit quantization reads "
                         "signed int8 Q/DQ with zero point 0. Quantize with int8 symmetric "
                         "activations (export.quantize.TENSORRT_QDQ, what `pipeline compile "
                         "--precision int8` uses when the bundle has a tensorrt backend) or ModelOpt: "
                         f"`{MODELOPT_QUANTIZE_CMD.format(onnx=onnx_name, stem=stem)}`")
    specs, profiles = _input_specs(info, opts)
    notes: list[str] = []
    flags: list[str] = []
    precision = opts.precision
    dla = opts.dla_core is not None
    conversion = None

    if dla:
        if compute_capability is not None:
            cc = normalize_compute_capability(compute_capability)
            if cc not in DLA_COMPUTE_CAPABILITIES:
                raise TensorRTConfigError(
                    "dla_core", f"this GPU (compute capability {cc}) has no DLA; DLA exists only on "
                                "Jetson Xavier (7.2) and Orin (8.7) - remove dla_core from the profile")
        lo, opt, hi = opts.batch_range()
        if profiles and not lo == opt == hi:
            raise TensorRTConfigError(
                "dla_core", f"DLA does not support dynamic shapes: min_batch/opt_batch/max_batch must be "
                            f"equal (got {lo}/{opt}/{hi})")

    if version[0] == 10:
        strongly_typed = False
        if info.has_qdq and precision in ("fp32", "fp16"):
            raise TensorRTConfigError(
                "precision", f"'{precision}' but {onnx_name} contains QuantizeLinear/DequantizeLinear "
                             "nodes (explicit quantization); set precision to 'int8' or 'best', or ship "
                             "the unquantized ONNX")
        if precision == "int8" and not info.has_qdq:
            raise QdqOnnxRequiredError(
                "precision", f"'int8' needs an explicitly quantized ONNX (QuantizeLinear/"
                             f"DequantizeLinear nodes) but {onnx_name} has none; implicit INT8 "
                             "calibration is not supported (deprecated in TensorRT 10.1, removed in "
                             "11). Ship a static QDQ ONNX (export.quantize.quantize_piece, what "
                             "`pipeline compile --precision int8` builds) or quantize with ModelOpt: "
                             f"`{MODELOPT_QUANTIZE_CMD.format(onnx=onnx_name, stem=stem)}`")
        if precision in ("fp16", "best"):
            flags.append("FP16")
        if precision == "int8" or (precision == "best" and info.has_qdq):
            flags.append("INT8")
            notes.append("explicit quantization: INT8 from the Q/DQ nodes of the ONNX")
        elif precision == "best":
            notes.append("'best' on an ONNX without Q/DQ nodes: FP16 only (INT8 needs a QDQ ONNX)")
        if dla:
            if precision == "fp32":
                raise TensorRTConfigError(
                    "dla_core", "DLA runs only FP16/INT8 layers on TensorRT 10; set precision to 'fp16', "
                                "'int8' or 'best' (or remove dla_core)")
            if "FP16" not in flags:
                flags.append("FP16")
                notes.append("DLA + int8: FP16 also enabled so DLA layers without INT8 support stay on DLA")
            flags.append("GPU_FALLBACK")
            if version > LAST_TRT10_WITH_DLA:
                notes.append(f"NVIDIA documents TensorRT 10.7 as the last 10.x release with DLA; "
                             f"{version_str(version)} may report no DLA cores (checked at build time)")
    else:
        strongly_typed = True
        notes.append("strongly typed network (TensorRT >= 11): precision comes from the ONNX tensor types")
        if precision == "fp32" and (info.has_fp16 or info.has_qdq):
            what = "Q/DQ nodes" if info.has_qdq else "FP16 tensors"
            raise TensorRTConfigError(
                "precision", f"'fp32' but {onnx_name} carries {what}; on TensorRT {version_str(version)} the "
                             "engine follows the ONNX types - ship the FP32 ONNX or set precision to "
                             f"'{'int8' if info.has_qdq else 'fp16'}'")
        if precision == "fp16":
            if info.has_qdq:
                raise TensorRTConfigError(
                    "precision", f"'fp16' but {onnx_name} contains Q/DQ nodes (INT8); set precision to "
                                 "'int8' or ship the unquantized ONNX")
            if not info.has_fp16:
                if not allow_fp16_conversion:
                    raise Fp16OnnxRequiredError(
                        "precision", f"'fp16' on TensorRT {version_str(version)} needs an ONNX that already "
                                     f"carries FP16 (BuilderFlag.FP16 was removed in 11.0) but {onnx_name} is "
                                     f"FP32-only. Convert it with ModelOpt AutoCast: "
                                     f"`{MODELOPT_AUTOCAST_CMD.format(onnx=onnx_name, stem=stem)}`, or pass "
                                     "fp16_converter=export.tensorrt.convert_onnx_to_fp16 to build_bundle_engines")
                conversion = "fp16"
                notes.append("the FP32 ONNX is converted to FP16 (AutoCast hook) before building")
        if precision == "int8" and not info.has_qdq:
            raise QdqOnnxRequiredError(
                "precision", f"'int8' on TensorRT {version_str(version)} needs an explicitly quantized ONNX "
                             f"(QuantizeLinear/DequantizeLinear nodes) but {onnx_name} has none; implicit "
                             "INT8 calibration (BuilderFlag.INT8 + calibrator) was removed in 11.0. "
                             "Quantize it with export.quantize.quantize_piece (static QDQ) or ModelOpt: "
                             f"`{MODELOPT_QUANTIZE_CMD.format(onnx=onnx_name, stem=stem)}`")
        if precision == "best":
            if not (info.has_fp16 or info.has_qdq):
                if allow_fp16_conversion:
                    conversion = "fp16"
                    notes.append("'best' on an FP32-only ONNX: converted to FP16 (AutoCast hook) before building")
                else:
                    notes.append("'best' on an FP32-only ONNX builds an FP32/TF32 engine on TensorRT >= 11; "
                                 "convert with ModelOpt AutoCast or quantize with ModelOpt for lower precision")
        if dla:
            if version < FIRST_TRT11_WITH_DLA:
                raise TensorRTConfigError(
                    "dla_core", f"TensorRT {version_str(version)} has no DLA support on Jetson (DLA was "
                                "removed in 11.0 and restored in 11.4.1 for Jetson AGX Orin on JetPack "
                                "7.2.2+); use TensorRT 10.x (<= 10.7) or 11.4.1+, or remove dla_core")
            if precision == "fp32":
                raise TensorRTConfigError("dla_core", "DLA runs only FP16/INT8 layers; set precision to "
                                                      "'fp16', 'int8' or 'best' with a matching ONNX")
            if not (info.has_fp16 or info.has_qdq or conversion):
                raise Fp16OnnxRequiredError(
                    "dla_core", f"DLA on TensorRT {version_str(version)} is strongly typed and needs an FP16 "
                                f"or Q/DQ ONNX but {onnx_name} is FP32-only; convert it with "
                                f"`python -m modelopt.onnx.autocast --target_dla --low_precision_type fp16 "
                                f"--onnx_path {onnx_name} --output_path {stem}.fp16.onnx`")
            flags.append("GPU_FALLBACK")
            notes.append("DLA on TensorRT 11 is supported on Jetson AGX Orin with JetPack 7.2.2+ only")

    pools = ()
    if opts.workspace_mb is not None:
        pools = (("WORKSPACE", opts.workspace_mb * 1024 * 1024),)
    if not profiles:
        notes.append("all inputs have a static batch: no optimization profile is added")
    elif not opts.batch_given:
        notes.append("no min/opt/max_batch given: the dynamic batch axis is fixed to 1")

    return EngineBuildPlan(
        trt_version=version,
        precision=precision,
        inputs=specs,
        strongly_typed=strongly_typed,
        builder_flags=tuple(flags),
        memory_pool_limits=pools,
        profiles=profiles,
        default_device_type="DLA" if dla else "GPU",
        dla_core=opts.dla_core,
        builder_optimization_level=opts.builder_optimization_level,
        timing_cache=opts.timing_cache,
        onnx_has_qdq=info.has_qdq,
        onnx_has_fp16=info.has_fp16,
        onnx_conversion=conversion,
        notes=tuple(notes),
    )


# ------------------------------------------------------------------------------ FP16 converter hook
def convert_onnx_to_fp16(src: str | Path, dst: str | Path, *, keep_io_types: bool = True) -> Path:
    """FP32 ONNX -> mixed FP16 ONNX with NVIDIA ModelOpt AutoCast (needed for FP16 on TRT >= 11).

    I/O types stay FP32 by default, so callers still feed and read float32 arrays and the
    tensors passed between exit segments keep their dtype. Requires ``nvidia-modelopt[onnx]``;
    not installed (nor exercised) in this project's development environment.
    """
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
    except ImportError as exc:
        raise TensorRTError(
            "FP16 conversion needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]' (or run "
            f"`{MODELOPT_AUTOCAST_CMD.format(onnx=Path(src).name, stem=Path(src).stem)}` yourself and "
            "ship the FP16 ONNX)") from exc
    import onnx

    model = convert_to_mixed_precision(onnx_path=str(src), low_precision_type="fp16",
                                       keep_io_types=keep_io_types)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dst))
    return dst
