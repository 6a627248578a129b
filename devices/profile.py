"""Device profile dataclasses and validation.

A device profile describes one deployment target: its hardware, the software stack it
is expected to run, the compile backends to try (in order of preference) with their
options, a default latency budget, and peak compute / memory bandwidth for roofline
estimates.  Profiles are data (TOML files in ``devices/profiles/``); this module turns
a parsed TOML table into validated :class:`Profile` objects.  Every validation error
(:class:`ProfileError`, a :class:`runtime.errors.ConfigError`) names the file and the
offending field, e.g.::

    my-board.toml: backends[1].options.intra_op_threads: expected an integer, got string

Fields are checked by the shared :class:`runtime.validate.Validator`.  Stdlib only (plus
``runtime.errors`` / ``runtime.validate``, both stdlib only): this module runs on-device and
must never import torch, train/ or export/.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from runtime.errors import ConfigError, PipelineError
from runtime.validate import Validator, type_name

from runtime.backends import BACKENDS  # the registry's; a profile lists them in its own order
from runtime.backends import provider_options as _provider_options
from runtime.host import normalize_arch

__all__ = [
    "ARCHES",
    "BACKENDS",
    "BackendSpec",
    "Hardware",
    "PeakSpec",
    "Profile",
    "ProfileError",
    "ProfileNotFoundError",
    "Software",
    "validate_profile",
]

SCHEMA_VERSION = 1

#: Normalised CPU architectures (``platform.machine()`` values are mapped onto these).
ARCHES = ("x86_64", "aarch64")

TRT_PRECISIONS = ("fp32", "fp16", "int8", "best")
#: Precision of the pieces `pipeline compile` builds for a profile (``precision`` at top level):
#: ``int8`` quantizes the onnxruntime pieces that measure faster and keep accuracy (docs/export.md).
PRECISIONS = ("fp32", "int8")
ORT_GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
TVM_TUNING = ("none", "meta_schedule")


# --------------------------------------------------------------------------- errors


class ProfileError(ConfigError):
    """A device profile could not be found, parsed or validated (a ConfigError, so a ValueError).

    ``str(err)`` is a single line ``FILE: FIELD: MESSAGE``, or ``profile 'NAME': FIELD:
    MESSAGE`` when the profile has no file (a dict given to :func:`validate_profile`).
    ``profile`` is the profile's name, ``field`` the path of the bad field ("" for file-level
    problems), ``message`` (= ``reason``) the message without the prefix; ``file`` the file
    label (or the ``profile 'NAME'`` label).
    """

    def __init__(self, profile: str | None, field: str | None, message: str, *,
                 file: object = None):
        self.profile = profile
        self.message = message
        label = None
        if file is not None:
            label = str(file)
        elif profile is not None:
            label = f"profile '{profile}'"
        self.file = label or "device profile"
        self.field = field or ""
        self.reason = message
        PipelineError.__init__(self, ": ".join([x for x in (label, field) if x] + [message]))

    def __reduce__(self):  # picklable whatever the subclass's constructor takes
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))


class ProfileNotFoundError(ProfileError, LookupError):
    """No profile with that name, alias or path exists."""

    def __init__(self, message: str, available: Iterable[str] = ()):
        self.available = list(available)
        super().__init__(None, None, message)


def _rebuild(cls, state, args):
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


# --------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class Hardware:
    """Static hardware description.

    ``memory_gb`` is system RAM (on Jetson this is unified memory shared by CPU, GPU
    and DLA); ``gpu_memory_gb`` is dedicated VRAM for discrete GPUs only.
    """

    cpu_model: str
    cpu_cores: int
    memory_gb: float
    cpu_core_type: str | None = None  # LLVM-style core name: cortex-a78ae, carmel, ...
    cpu_max_ghz: float | None = None
    isa: tuple[str, ...] = ()  # ISA features compiled code may rely on (neon, avx2, ...)
    gpu_name: str | None = None
    gpu_arch: str | None = None  # ampere, volta, hopper, ...
    gpu_compute_capability: str | None = None  # "8.7"
    gpu_cuda_cores: int | None = None
    gpu_tensor_cores: int | None = None
    gpu_memory_gb: float | None = None
    dla_cores: int = 0

    @property
    def has_gpu(self) -> bool:
        return self.gpu_compute_capability is not None

    @property
    def cuda_arch(self) -> str | None:
        """``"sm_87"`` for compute capability ``"8.7"``; None without a GPU."""
        cc = self.gpu_compute_capability
        return None if cc is None else "sm_" + cc.replace(".", "")


@dataclass(frozen=True)
class Software:
    """Software stack the profile expects on the device (informational + checks)."""

    os: str | None = None
    jetpack: str | None = None
    l4t: str | None = None
    cuda: str | None = None
    cudnn: str | None = None
    tensorrt_major: int | None = None


@dataclass(frozen=True)
class PeakSpec:
    """Peak throughput for roofline estimates.

    Compute is in GFLOP/s (1 MAC = 2 FLOP) or TOPS (int8, 1 MAC = 2 ops); all are
    *dense* (no structured-sparsity doubling).  ``dla_int8_tops`` is per DLA core,
    because one TensorRT engine runs on one DLA core.  ``memory_bandwidth_gbs`` is
    system DRAM bandwidth (shared by CPU and an integrated GPU/DLA);
    ``gpu_memory_bandwidth_gbs`` is set only for discrete GPUs with their own VRAM.
    """

    cpu_fp32_gflops: float
    memory_bandwidth_gbs: float
    gpu_fp32_gflops: float | None = None
    gpu_fp16_gflops: float | None = None  # tensor-core dense fp16
    gpu_int8_tops: float | None = None  # tensor-core dense int8
    gpu_memory_bandwidth_gbs: float | None = None
    dla_int8_tops: float | None = None  # per DLA core, dense

    @property
    def gpu_bandwidth_gbs(self) -> float:
        """Bandwidth the GPU sees: its VRAM if discrete, otherwise system DRAM."""
        return self.gpu_memory_bandwidth_gbs or self.memory_bandwidth_gbs


@dataclass
class BackendSpec:
    """One compile backend with its options (validated per backend)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": copy.deepcopy(self.options)}


@dataclass
class Profile:
    """A validated device profile.  Build one with :func:`validate_profile` or
    :func:`devices.registry.load_profile`."""

    name: str
    aliases: tuple[str, ...]
    description: str
    hardware: Hardware
    software: Software
    backends: list[BackendSpec]
    latency_budget_ms: float
    peak: PeakSpec
    arch: str
    source: str | None = None  # file it was loaded from ("builtin:NAME.toml" if shipped)
    extends: str | None = None
    detected: dict[str, Any] = field(default_factory=dict)  # what load-time detection filled
    extra: dict[str, Any] = field(default_factory=dict)  # free-form [extra] table
    precision: str = "fp32"  # "int8": quantize the onnxruntime pieces where it pays

    def backend(self, name: str) -> BackendSpec | None:
        for spec in self.backends:
            if spec.name == name:
                return spec
        return None

    def backend_order(self) -> list[str]:
        return [b.name for b in self.backends]

    def tvm_target(self) -> dict[str, Any] | None:
        """The TVM JSON-dict target (a copy), or None if the profile has no tvm backend."""
        spec = self.backend("tvm")
        return None if spec is None else copy.deepcopy(spec.options["target"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict in the same shape as the TOML file (plus provenance).

        ``validate_profile(p.to_dict())`` rebuilds an equal profile.
        """
        hw = {k: v for k, v in _asdict(self.hardware).items() if v is not None}
        hw["isa"] = list(self.hardware.isa)
        sw = {k: v for k, v in _asdict(self.software).items() if v is not None}
        peak = {k: v for k, v in _asdict(self.peak).items() if v is not None}
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "aliases": list(self.aliases),
            "description": self.description,
            "arch": self.arch,
            "latency_budget_ms": self.latency_budget_ms,
            "hardware": hw,
            "software": sw,
            "peak": peak,
            "backends": [b.to_dict() for b in self.backends],
        }
        if self.precision != "fp32":
            out["precision"] = self.precision
        if self.extra:
            out["extra"] = copy.deepcopy(self.extra)
        if self.extends:
            out["extends"] = self.extends
        if self.detected:
            out["detected"] = copy.deepcopy(self.detected)
        if self.source:
            out["source"] = self.source
        return out

    def is_host_compatible(
        self, fingerprint: Mapping[str, Any] | None = None, *, check_gpu: bool = False
    ) -> bool:
        """True if code compiled for this profile's CPU can run on the given machine.

        Same architecture, and every ISA feature the profile lists in ``hardware.isa``
        is present on the machine (so an ``avx512f`` bundle is rejected on an AVX2-only
        box).  ``fingerprint`` defaults to :func:`devices.host.fingerprint()`.  With
        ``check_gpu=True`` the machine must also have a GPU of the profile's compute
        capability (TensorRT engines and CUDA kernels are arch-specific).
        """
        if fingerprint is None:
            from .host import fingerprint as _fp

            fingerprint = _fp()
        if fingerprint.get("arch") != self.arch:
            return False
        have = set(fingerprint.get("isa") or ())
        if not set(self.hardware.isa) <= have:
            return False
        if check_gpu and self.hardware.has_gpu:
            ccs = {g.get("compute_capability") for g in fingerprint.get("gpus") or ()}
            if self.hardware.gpu_compute_capability not in ccs:
                return False
        return True


def _asdict(obj: Any) -> dict[str, Any]:
    return {k: copy.deepcopy(getattr(obj, k)) for k in obj.__dataclass_fields__}


# ---------------------------------------------------------------------- validation

def _type_name(value: Any) -> str:
    return type_name(value)


def _bound(x: float) -> float:
    """0.0 -> 0, so a message reads ``> 0`` rather than ``> 0.0``."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


class _Checker(Validator):
    """Reads typed fields out of a raw dict, raising ProfileError naming the file and field."""

    def __init__(self, label: str, file: str | None = None):
        self.label = label
        super().__init__(file or label,
                         lambda _src, path, reason: ProfileError(label, path, reason, file=file))

    def table(self, raw: Any, path: str) -> dict:
        if not isinstance(raw, dict):
            self.fail(path, f"expected an object (a TOML table), got {type_name(raw)}")
        return raw

    def unknown(self, table: Mapping, allowed: Iterable[str], prefix: str) -> None:
        allowed = sorted(allowed)
        for key in table:
            if key not in allowed:
                self.fail(_join(prefix, key), f"unknown key (allowed: {', '.join(allowed)})")

    def get(
        self,
        table: Mapping,
        key: str,
        prefix: str,
        kind: str,
        *,
        required: bool = False,
        default: Any = None,
        choices: Iterable[str] | None = None,
        minimum: float | None = None,
        maximum: float | None = None,
        exclusive_min: bool = False,
    ) -> Any:
        path = _join(prefix, key)
        if key not in table or table[key] is None:
            if required:
                self.fail(path, "missing required field")
            return default
        value = table[key]
        lo = None if minimum is None else _bound(minimum)
        hi = None if maximum is None else _bound(maximum)
        if kind == "int":
            if exclusive_min and lo is not None:
                return self.int_(value, path, lo=int(lo) + 1, hi=hi)
            return self.int_(value, path, lo=lo, hi=hi)
        if kind == "float":
            return self.num(value, path, lo=lo, lo_open=exclusive_min, hi=hi)
        if kind == "str":
            value = self.str_(value, path, allow_empty=True)
            if choices is not None:
                self.enum(value, path, tuple(choices))
            return value
        if kind == "bool":
            return self.bool_(value, path)
        if kind == "str_list":
            return self.list_of(value, path, lambda x, p: self.str_(x, p, allow_empty=True))
        if kind == "table":
            return self.table(value, path)
        raise AssertionError(kind)


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _num(x: float) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_CC_RE = re.compile(r"^\d+\.\d+$")
_SM_RE = re.compile(r"^sm_(\d+)([a-z]?)$")

_TOP_KEYS = (
    "schema_version",
    "name",
    "aliases",
    "description",
    "arch",
    "latency_budget_ms",
    "hardware",
    "software",
    "peak",
    "backends",
    "extra",
    "precision",
    # provenance / load-time keys (consumed by the registry, tolerated here)
    "extends",
    "detect",
    "default_compute_capability",
    "gpu_variants",
    "detected",
    "source",
)


def validate_profile(raw: Mapping[str, Any], source: str | None = None) -> Profile:
    """Validate a parsed profile table and build a :class:`Profile`.

    ``raw`` is the TOML table after ``extends`` merging and load-time detection (see
    :mod:`devices.registry`).  Raises :class:`ProfileError` naming the first bad field.
    """
    label = _label(raw, source)
    file = source if source is not None else (
        raw.get("source") if isinstance(raw, Mapping) and isinstance(raw.get("source"), str) else None)
    c = _Checker(label, file)
    if not isinstance(raw, Mapping):
        c.fail("", f"expected a table at top level, got {_type_name(raw)}")
    raw = dict(raw)
    c.unknown(raw, _TOP_KEYS, "")

    version = c.get(raw, "schema_version", "", "int", default=SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        c.fail("schema_version", f"unsupported version {version} (this code reads {SCHEMA_VERSION})")
    name = c.get(raw, "name", "", "str", required=True)
    if not _NAME_RE.match(name):
        c.fail("name", f"must be lower-case letters, digits, '-', '_' or '.', got {name!r}")
    aliases = c.get(raw, "aliases", "", "str_list", default=[])
    for i, alias in enumerate(aliases):
        if not _NAME_RE.match(alias):
            c.fail(f"aliases[{i}]", f"must be lower-case letters, digits, '-', '_' or '.', got {alias!r}")
        if alias == name:
            c.fail(f"aliases[{i}]", f"alias {alias!r} repeats the profile name")
    description = c.get(raw, "description", "", "str", default="")
    arch = c.get(raw, "arch", "", "str", required=True, choices=ARCHES)
    budget = c.get(
        raw, "latency_budget_ms", "", "float", required=True, minimum=0.0, exclusive_min=True
    )

    hardware = _hardware(c, raw.get("hardware"), "hardware")
    software = _software(c, raw.get("software", {}), "software")
    peak = _peak(c, raw.get("peak"), "peak", hardware)
    backends = _backends(c, raw.get("backends"), arch, hardware, software)
    extra = c.get(raw, "extra", "", "table", default={})
    precision = c.get(raw, "precision", "", "str", default="fp32", choices=PRECISIONS)
    if precision == "int8" and not any(b.name == "onnxruntime" for b in backends):
        c.fail("precision", "int8 pieces are built for the onnxruntime backend; this profile has none")
    extends = c.get(raw, "extends", "", "str")
    detected = c.get(raw, "detected", "", "table", default={})
    src = raw.get("source") if source is None else source
    return Profile(
        name=name,
        aliases=tuple(aliases),
        description=description,
        hardware=hardware,
        software=software,
        backends=backends,
        latency_budget_ms=budget,
        peak=peak,
        arch=arch,
        source=src if isinstance(src, str) else None,
        extends=extends,
        detected=copy.deepcopy(detected),
        extra=copy.deepcopy(extra),
        precision=precision,
    )


def _label(raw: Any, source: str | None) -> str:
    if isinstance(raw, Mapping) and isinstance(raw.get("name"), str):
        return raw["name"]
    if source:
        stem = str(source).replace("\\", "/").rsplit("/", 1)[-1]
        return stem[:-5] if stem.endswith(".toml") else stem
    return "<unnamed>"


def _hardware(c: _Checker, raw: Any, p: str) -> Hardware:
    if raw is None:
        c.fail(p, "missing required field")
    t = c.table(raw, p)
    fields = Hardware.__dataclass_fields__
    c.unknown(t, fields, p)
    cc = c.get(t, "gpu_compute_capability", p, "str")
    if cc is not None and not _CC_RE.match(cc):
        c.fail(_join(p, "gpu_compute_capability"), f"expected 'MAJOR.MINOR' like '8.7', got {cc!r}")
    hw = Hardware(
        cpu_model=c.get(t, "cpu_model", p, "str", required=True),
        cpu_cores=c.get(t, "cpu_cores", p, "int", required=True, minimum=1),
        memory_gb=c.get(t, "memory_gb", p, "float", required=True, minimum=0, exclusive_min=True),
        cpu_core_type=c.get(t, "cpu_core_type", p, "str"),
        cpu_max_ghz=c.get(t, "cpu_max_ghz", p, "float", minimum=0, exclusive_min=True),
        isa=tuple(c.get(t, "isa", p, "str_list", default=[])),
        gpu_name=c.get(t, "gpu_name", p, "str"),
        gpu_arch=c.get(t, "gpu_arch", p, "str"),
        gpu_compute_capability=cc,
        gpu_cuda_cores=c.get(t, "gpu_cuda_cores", p, "int", minimum=1),
        gpu_tensor_cores=c.get(t, "gpu_tensor_cores", p, "int", minimum=0),
        gpu_memory_gb=c.get(t, "gpu_memory_gb", p, "float", minimum=0, exclusive_min=True),
        dla_cores=c.get(t, "dla_cores", p, "int", default=0, minimum=0),
    )
    if hw.dla_cores and not hw.has_gpu:
        c.fail(_join(p, "dla_cores"), "DLA cores need a GPU (set hardware.gpu_compute_capability)")
    return hw


def _software(c: _Checker, raw: Any, p: str) -> Software:
    t = c.table(raw, p)
    c.unknown(t, Software.__dataclass_fields__, p)
    return Software(
        os=c.get(t, "os", p, "str"),
        jetpack=c.get(t, "jetpack", p, "str"),
        l4t=c.get(t, "l4t", p, "str"),
        cuda=c.get(t, "cuda", p, "str"),
        cudnn=c.get(t, "cudnn", p, "str"),
        tensorrt_major=c.get(t, "tensorrt_major", p, "int", minimum=1),
    )


def _peak(c: _Checker, raw: Any, p: str, hw: Hardware) -> PeakSpec:
    if raw is None:
        c.fail(p, "missing required field")
    t = c.table(raw, p)
    c.unknown(t, PeakSpec.__dataclass_fields__, p)

    def pos(key: str, required: bool = False) -> float | None:
        return c.get(t, key, p, "float", required=required, minimum=0.0, exclusive_min=True)

    peak = PeakSpec(
        cpu_fp32_gflops=pos("cpu_fp32_gflops", True),
        memory_bandwidth_gbs=pos("memory_bandwidth_gbs", True),
        gpu_fp32_gflops=pos("gpu_fp32_gflops"),
        gpu_fp16_gflops=pos("gpu_fp16_gflops"),
        gpu_int8_tops=pos("gpu_int8_tops"),
        gpu_memory_bandwidth_gbs=pos("gpu_memory_bandwidth_gbs"),
        dla_int8_tops=pos("dla_int8_tops"),
    )
    if hw.has_gpu and peak.gpu_fp32_gflops is None:
        c.fail(_join(p, "gpu_fp32_gflops"), "missing required field (hardware has a GPU)")
    if not hw.has_gpu:
        for key in ("gpu_fp32_gflops", "gpu_fp16_gflops", "gpu_int8_tops", "gpu_memory_bandwidth_gbs"):
            if getattr(peak, key) is not None:
                c.fail(_join(p, key), "set, but hardware has no GPU (hardware.gpu_compute_capability)")
    if hw.dla_cores and peak.dla_int8_tops is None:
        c.fail(_join(p, "dla_int8_tops"), "missing required field (hardware.dla_cores > 0)")
    if not hw.dla_cores and peak.dla_int8_tops is not None:
        c.fail(_join(p, "dla_int8_tops"), "set, but hardware.dla_cores is 0")
    return peak


def _backends(c: _Checker, raw: Any, arch: str, hw: Hardware, sw: Software) -> list[BackendSpec]:
    if raw is None:
        c.fail("backends", "missing required field")
    if not isinstance(raw, list):
        c.fail("backends", f"expected list of tables ([[backends]]), got {_type_name(raw)}")
    if not raw:
        c.fail("backends", "must list at least one backend")
    out: list[BackendSpec] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        p = f"backends[{i}]"
        t = c.table(entry, p)
        c.unknown(t, ("name", "options"), p)
        name = c.get(t, "name", p, "str", required=True)
        if name not in BACKENDS:
            c.fail(_join(p, "name"), f"unknown backend {name!r} (expected one of: {', '.join(BACKENDS)})")
        if name in seen:
            c.fail(_join(p, "name"), f"backend {name!r} listed twice")
        seen.add(name)
        opts = c.get(t, "options", p, "table", default={})
        validator = _OPTION_VALIDATORS[name]
        out.append(BackendSpec(name, validator(c, copy.deepcopy(opts), _join(p, "options"), arch, hw, sw)))
    return out


def _tensorrt_options(c: _Checker, o: dict, p: str, arch: str, hw: Hardware, sw: Software) -> dict:
    keys = (
        "precision",
        "dla_core",
        "workspace_mb",
        "min_batch",
        "opt_batch",
        "max_batch",
        "builder_optimization_level",
        "timing_cache",
    )
    c.unknown(o, keys, p)
    if not hw.has_gpu:
        c.fail(p[: -len(".options")] + ".name", "tensorrt needs a GPU (set hardware.gpu_compute_capability)")
    out: dict[str, Any] = {}
    out["precision"] = c.get(o, "precision", p, "str", default="fp16", choices=TRT_PRECISIONS)
    dla = c.get(o, "dla_core", p, "int", minimum=0)
    if dla is not None:
        if dla >= hw.dla_cores:
            c.fail(_join(p, "dla_core"), f"DLA core {dla} does not exist (hardware.dla_cores = {hw.dla_cores})")
        if out["precision"] == "fp32":
            c.fail(_join(p, "dla_core"), "DLA runs fp16 or int8 only; set precision to fp16, int8 or best")
        out["dla_core"] = dla
    out["workspace_mb"] = c.get(o, "workspace_mb", p, "int", default=1024, minimum=1)
    mn = c.get(o, "min_batch", p, "int", default=1, minimum=1)
    opt = c.get(o, "opt_batch", p, "int", default=mn, minimum=1)
    mx = c.get(o, "max_batch", p, "int", default=max(opt, mn), minimum=1)
    if not mn <= opt <= mx:
        c.fail(_join(p, "opt_batch"), f"need min_batch <= opt_batch <= max_batch, got {mn} <= {opt} <= {mx}")
    out.update(min_batch=mn, opt_batch=opt, max_batch=mx)
    out["builder_optimization_level"] = c.get(
        o, "builder_optimization_level", p, "int", default=3, minimum=0, maximum=5
    )
    out["timing_cache"] = c.get(o, "timing_cache", p, "bool", default=True)
    return out


_EP_RE = re.compile(r"^[A-Za-z0-9]+ExecutionProvider$")
_GPU_EPS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _onnxruntime_options(c: _Checker, o: dict, p: str, arch: str, hw: Hardware, sw: Software) -> dict:
    c.unknown(o, ("providers", "intra_op_threads", "inter_op_threads", "graph_optimization_level",
                  "provider_options"), p)
    providers = c.get(o, "providers", p, "str_list", default=["CPUExecutionProvider"])
    if not providers:
        c.fail(_join(p, "providers"), "must list at least one execution provider")
    for i, ep in enumerate(providers):
        if not _EP_RE.match(ep):
            c.fail(f"{p}.providers[{i}]", f"expected an ONNX Runtime provider name like 'CPUExecutionProvider', got {ep!r}")
        if ep in _GPU_EPS and not hw.has_gpu:
            c.fail(f"{p}.providers[{i}]", f"{ep} needs a GPU (hardware.gpu_compute_capability)")
    if len(set(providers)) != len(providers):
        c.fail(_join(p, "providers"), "lists a provider twice")
    out = {
        "providers": providers,
        "intra_op_threads": c.get(o, "intra_op_threads", p, "int", default=0, minimum=0),
        "inter_op_threads": c.get(o, "inter_op_threads", p, "int", default=0, minimum=0),
        "graph_optimization_level": c.get(
            o, "graph_optimization_level", p, "str", default="all", choices=ORT_GRAPH_OPT_LEVELS
        ),
    }
    if o.get("provider_options") is not None:  # per provider, checked against the known options
        per_ep = _provider_options.check(c, o["provider_options"], _join(p, "provider_options"),
                                         providers)
        if per_ep:  # only the listed providers' (an extending profile may change providers)
            out["provider_options"] = per_ep
    return out


def _tvm_options(c: _Checker, o: dict, p: str, arch: str, hw: Hardware, sw: Software) -> dict:
    c.unknown(o, ("target", "opt_level", "tuning", "tuning_trials"), p)
    target = c.get(o, "target", p, "table", required=True)
    target = _tvm_target(c, target, _join(p, "target"), arch, hw, top=True)
    return {
        "target": target,
        "opt_level": c.get(o, "opt_level", p, "int", default=3, minimum=0, maximum=3),
        "tuning": c.get(o, "tuning", p, "str", default="none", choices=TVM_TUNING),
        "tuning_trials": c.get(o, "tuning_trials", p, "int", default=0, minimum=0),
    }


_TVM_TARGET_KEYS = {
    "kind": "str",
    "mtriple": "str",
    "mcpu": "str",
    "mattr": "str_list",
    "num-cores": "int",
    "arch": "str",
    "keys": "str_list",
    "libs": "str_list",
    "device": "str",
    "model": "str",
    "mabi": "str",
    "mfloat-abi": "str",
    "opt-level": "int",
    "max_num_threads": "int",
    "max_threads_per_block": "int",
    "max_shared_memory_per_block": "int",
    "thread_warp_size": "int",
    "registers_per_block": "int",
    "l2_cache_size_bytes": "int",
    "host": "table",
}


def _tvm_target(c: _Checker, t: dict, p: str, arch: str, hw: Hardware, top: bool) -> dict:
    """JSON-dict target for apache-tvm 0.27 (``tvm.target.Target(dict)``)."""
    c.unknown(t, _TVM_TARGET_KEYS, p)
    out: dict[str, Any] = {}
    for key, kind in _TVM_TARGET_KEYS.items():
        if key in t and key != "host":
            out[key] = c.get(t, key, p, kind, minimum=1 if kind == "int" else None)
    kind = c.get(t, "kind", p, "str", required=True, choices=("llvm", "cuda", "c"))
    if kind in ("llvm", "c"):
        triple = out.get("mtriple")
        if triple is not None:
            t_arch = normalize_arch(triple.split("-", 1)[0])
            if t_arch != arch:
                c.fail(_join(p, "mtriple"), f"{triple!r} does not match arch {arch!r}")
        if "host" in t:
            c.fail(_join(p, "host"), "only a cuda target takes a host target")
        if "arch" in out:
            c.fail(_join(p, "arch"), "'arch' is for cuda targets; use mcpu/mattr for llvm")
    elif kind == "cuda":
        if not top:
            c.fail(_join(p, "kind"), "a host target must be llvm or c")
        if not hw.has_gpu:
            c.fail(_join(p, "kind"), "cuda target needs a GPU (hardware.gpu_compute_capability)")
        sm = c.get(t, "arch", p, "str", required=True)
        m = _SM_RE.match(sm)
        if not m:
            c.fail(_join(p, "arch"), f"expected 'sm_XY' like 'sm_87', got {sm!r}")
        if m.group(1) != hw.gpu_compute_capability.replace(".", ""):
            c.fail(
                _join(p, "arch"),
                f"{sm!r} does not match hardware.gpu_compute_capability {hw.gpu_compute_capability!r}",
            )
        host = c.get(t, "host", p, "table", required=True)
        out["host"] = _tvm_target(c, host, _join(p, "host"), arch, hw, top=False)
    return out


_OPTION_VALIDATORS: dict[str, Callable[..., dict]] = {
    "tensorrt": _tensorrt_options,
    "onnxruntime": _onnxruntime_options,
    "tvm": _tvm_options,
}
