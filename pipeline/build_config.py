"""The build config: every choice of `pipeline build`, loadable from TOML/YAML, hashable per stage.

A build config file has one table per section (all optional; defaults below)::

    [build]                  # what to build, where
    device = "jetson"        # profile name, alias or .toml path
    out = "build"            # the build writes <out>/<profile name>/
    backends = "auto"        # or a list, e.g. ["tensorrt", "onnxruntime", "tvm"]

    [train]                  # any field of train.config.TrainConfig (the training recipe)
    model = "resnet20_adn"
    data = "fashion-mnist"
    epochs = 6

    [export]  [profile]  [calibrate]  [evaluate]  [acceptance]

Defaults < config file < command-line overrides. ``BuildConfig.to_toml()`` writes the effective
config (what ``<out>/<device>/build.toml`` holds); loading it again gives an equal config.
``section_hash(name)`` is the content hash a stage's cache key is made of (docs/build.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from runtime.backends import BACKENDS  # the registry's
from runtime.validate import Validator, type_name
from train.config import read_config_file

__all__ = ["BuildSection", "ExportSection", "ProfileSection", "CalibrateSection",
           "EvaluateSection", "AcceptanceSection", "BuildConfig", "load_build_file",
           "build_config", "dump_toml", "content_hash", "SECTIONS", "RULES_FOR_CURVES"]

RULES_FOR_CURVES = ("max_prob", "entropy", "patience", "lookahead")
PROFILE_MODES = ("quick", "standard", "full")


def _v(v: Optional[Validator]) -> Validator:
    return v if v is not None else Validator("build config")


@dataclass
class BuildSection:
    """What to build and where."""
    device: str = "x86-host"          # device profile: name, alias or .toml path
    out: str = "build"                # output root; the build writes <out>/<profile name>/
    checkpoint: Optional[str] = None  # skip training: export this checkpoint (model.pt)
    backends: Any = "auto"            # "auto" or a list of onnxruntime / tvm / tensorrt
    tune_trials: int = 0              # TVM MetaSchedule trials per piece (0: untuned)
    archive: bool = True              # also write <out>/<device>/bundle.tar.gz
    threads: int = 1                  # ONNX Runtime intra-op threads of the bundle run on this
                                      # host (0: the profile's, all usable cores); see docs/build.md
    precision: str = "auto"           # auto (the device profile's) | fp32 | int8 (QDQ pieces
                                      # kept where they measure faster: export/quantize.py)

    def validate(self, v: Optional[Validator] = None, p: str = "build") -> None:
        v = _v(v)
        v.str_(self.device.strip() if isinstance(self.device, str) else self.device, f"{p}.device")
        v.str_(self.out, f"{p}.out")
        v.opt_str(self.checkpoint, f"{p}.checkpoint")
        if isinstance(self.backends, str):
            if self.backends != "auto":
                parts = [b.strip() for b in self.backends.split(",") if b.strip()]
                self.backends = parts
        if not isinstance(self.backends, str):
            if not isinstance(self.backends, (list, tuple)) or not self.backends:
                v.fail(f"{p}.backends", f"expected \"auto\" or a non-empty list, got "
                                        f"{type_name(self.backends)}")
            for i, b in enumerate(self.backends):
                v.check(b in BACKENDS, f"{p}.backends[{i}]",
                        f"unknown backend {b!r}; known: {', '.join(BACKENDS)} (or \"auto\")")
            self.backends = list(dict.fromkeys(self.backends))
        v.int_(self.tune_trials, f"{p}.tune_trials", lo=0)
        v.int_(self.threads, f"{p}.threads", lo=0)
        v.bool_(self.archive, f"{p}.archive")
        v.enum(self.precision, f"{p}.precision", ("auto", "fp32", "int8"))


@dataclass
class ExportSection:
    """Export of the checkpoint to ONNX pieces (export.portable.export_checkpoint)."""
    opset: int = 17
    granularity: str = "stage"        # stage | split
    exporter: str = "torchscript"     # torchscript | dynamo
    parity_samples: int = 64
    exit_norms: str = "per-path"      # per-path: every norm's statistics re-estimated per skip
                                      # path after training, one piece per path
                                      # (train/path_norms.py); per-variant: the exit heads' norms
                                      # per stage variant (train/exit_norms.py); shared
    exit_norm_images: int = 4000      # training images for that

    def validate(self, v: Optional[Validator] = None, p: str = "export") -> None:
        v = _v(v)
        v.int_(self.opset, f"{p}.opset", lo=17)
        v.enum(self.granularity, f"{p}.granularity", ("stage", "split"))
        v.enum(self.exporter, f"{p}.exporter", ("torchscript", "dynamo"))
        v.int_(self.parity_samples, f"{p}.parity_samples", lo=1)
        v.enum(self.exit_norms, f"{p}.exit_norms", ("per-path", "per-variant", "shared"))
        if self.exit_norms == "per-path" and self.granularity != "stage":
            v.fail(f"{p}.exit_norms", f"'per-path' needs granularity 'stage' (got "
                                      f"{self.granularity!r}); use 'per-variant' or 'shared'")
        v.int_(self.exit_norm_images, f"{p}.exit_norm_images", lo=1)


@dataclass
class ProfileSection:
    """Latency tables: measured where the bundle runs here, estimated otherwise."""
    mode: str = "standard"            # quick | standard | full (devices.profiler settings)
    batches: list = field(default_factory=lambda: [1])

    def validate(self, v: Optional[Validator] = None, p: str = "profile") -> None:
        v = _v(v)
        v.enum(self.mode, f"{p}.mode", PROFILE_MODES)
        batches = list(self.batches) if isinstance(self.batches, tuple) else self.batches
        batches = v.list_of(batches, f"{p}.batches", lambda x, q: v.int_(x, q, lo=1), min_len=1)
        self.batches = sorted(set(batches))
        v.check(1 in self.batches, f"{p}.batches",
                "must include 1 (the stopping rule and the report use batch 1)")


@dataclass
class CalibrateSection:
    """Stopping-rule calibration on the validation split (export.calibration.calibrate)."""
    rule: str = "router"              # router (joint routing) | max_prob | entropy | patience |
                                      # lookahead | full
    max_drop: float = 0.5             # accuracy points vs full depth
    mean_budget_ms: Optional[float] = None  # target mean latency instead of max_drop
    risk_delta: Optional[float] = None      # risk-controlled fit (P(drop <= max_drop) >= 1-delta);
                                            # the router's default certificate is delta 0.05
    skip_config: str = "auto"         # "auto": the fastest configuration that meets the target;
                                      # "full" (FF..F); or one, e.g. "FTF"
    limit: int = 0                    # validation images (0: all)
    epsilon: float = 0.01             # target deadline miss rate of the router's budgets

    def validate(self, v: Optional[Validator] = None, p: str = "calibrate") -> None:
        from runtime.rules import RULES

        v = _v(v)
        v.enum(self.rule, f"{p}.rule", RULES)
        v.num(self.max_drop, f"{p}.max_drop", lo=0, hi=100)
        v.opt_num(self.mean_budget_ms, f"{p}.mean_budget_ms", lo=0, lo_open=True)
        v.opt_num(self.risk_delta, f"{p}.risk_delta", lo=0, lo_open=True, hi=1, hi_open=True)
        v.str_(self.skip_config, f"{p}.skip_config")
        v.check(self.skip_config in ("full", "auto") or set(self.skip_config) <= {"F", "T"},
                f"{p}.skip_config", "expected \"full\", \"auto\" or a string of F/T per stage, "
                f"got {self.skip_config!r}")
        v.int_(self.limit, f"{p}.limit", lo=0)
        v.num(self.epsilon, f"{p}.epsilon", lo=0, lo_open=True, hi=0.5)


@dataclass
class EvaluateSection:
    """Test-set evaluation through the runtime (pipeline/evaluate.py)."""
    limit: int = 0                    # test images (0: all)
    measure_limit: int = 0            # images measured end to end at batch 1 (0: = limit)
    rules: list = field(default_factory=lambda: list(RULES_FOR_CURVES))
    max_drops: list = field(default_factory=lambda: [0.25, 0.5, 1.0])
    budgets_ms: list = field(default_factory=list)  # empty: 3 between first-exit and full-depth p95
    headline_budget_ms: Optional[float] = None      # measured budget (default: the middle budget)
    batch_size: int = 256             # batch for the per-exit probabilities
    batch_threads: int = 1            # ONNX Runtime threads for those batches (0: usable cores)
    warmup: int = 50                  # untimed batch-1 calls of each measured variant first

    def validate(self, v: Optional[Validator] = None, p: str = "evaluate") -> None:
        v = _v(v)
        for name in ("limit", "measure_limit", "warmup", "batch_threads"):
            v.int_(getattr(self, name), f"{p}.{name}", lo=0)
        v.int_(self.batch_size, f"{p}.batch_size", lo=1)
        rules = list(self.rules) if isinstance(self.rules, tuple) else self.rules
        v.list_of(rules, f"{p}.rules", lambda x, q: v.enum(x, q, RULES_FOR_CURVES))
        for name in ("max_drops", "budgets_ms"):
            x = getattr(self, name)
            x = list(x) if isinstance(x, tuple) else x
            v.list_of(x, f"{p}.{name}", lambda y, q: v.num(y, q, lo=0, lo_open=name == "budgets_ms"))
        v.opt_num(self.headline_budget_ms, f"{p}.headline_budget_ms", lo=0, lo_open=True)
        self.rules = list(dict.fromkeys(self.rules))


@dataclass
class AcceptanceSection:
    """Targets the build checks and reports (pass/fail), measured on this host in one run."""
    max_drop: float = 0.5             # adaptive accuracy within this many points of full depth ...
    latency_ratio: float = 0.55       # ... at a mean latency <= this x the monolithic ORT session
    full_depth_overhead: float = 1.10  # segmented full depth <= this x the monolithic session
    budget_percentile: float = 99.0   # this percentile of the budgeted run stays within the budget

    def validate(self, v: Optional[Validator] = None, p: str = "acceptance") -> None:
        v = _v(v)
        for name in ("max_drop", "latency_ratio", "full_depth_overhead"):
            v.num(getattr(self, name), f"{p}.{name}", lo=0, lo_open=True)
        v.num(self.budget_percentile, f"{p}.budget_percentile", lo=0, lo_open=True, hi=100)


SECTIONS = ("build", "train", "export", "profile", "calibrate", "evaluate", "acceptance")
_CLASSES = {"build": BuildSection, "export": ExportSection, "profile": ProfileSection,
            "calibrate": CalibrateSection, "evaluate": EvaluateSection,
            "acceptance": AcceptanceSection}


def _train_cls():
    from train.config import TrainConfig
    return TrainConfig


def _tables(data: object, v: Validator) -> dict[str, dict]:
    """Check the section names and that each section is a table; ``{section: table}``."""
    if not isinstance(data, Mapping):
        v.fail("", f"top level must be a table/mapping, got {type_name(data)}")
    v.keys(dict(data), "", SECTIONS)
    out = {}
    for name, table in data.items():
        table = {} if table is None else table
        klass = _train_cls() if name == "train" else _CLASSES[name]
        out[name] = dict(v.keys(table, name, [f.name for f in dataclasses.fields(klass)]))
    return out


def _sections(data: object, v: Validator) -> dict[str, Any]:
    """Section objects (not yet validated) from ``{section: table}``; unknown keys refused."""
    tables = _tables(data, v)
    kw: dict[str, Any] = {}
    for name in SECTIONS:
        table = tables.get(name, {})
        if name == "train":
            kw[name] = _train_cls().from_dict(table, source=v.source, prefix="train")
        else:
            kw[name] = _CLASSES[name](**table)
    return kw


@dataclass
class BuildConfig:
    """Every choice of one build. ``train`` is a :class:`train.config.TrainConfig`."""
    build: BuildSection = field(default_factory=BuildSection)
    train: Any = None
    export: ExportSection = field(default_factory=ExportSection)
    profile: ProfileSection = field(default_factory=ProfileSection)
    calibrate: CalibrateSection = field(default_factory=CalibrateSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    acceptance: AcceptanceSection = field(default_factory=AcceptanceSection)

    def __post_init__(self) -> None:
        if self.train is None:
            self.train = _train_cls()()
        self.validate()

    def validate(self, source: str = "build config") -> None:
        """Check every section; ConfigError naming ``source`` and ``section.field``."""
        v = Validator(source)
        for name in _CLASSES:
            getattr(self, name).validate(v, name)
        self.train.validate(source, "train")

    # -- dict / TOML --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "BuildConfig":
        """Build from ``{section: table}``; unknown sections or keys, wrong types and values out
        of range raise ConfigError naming ``source`` and ``section.key``."""
        v = Validator(source)
        kw = _sections(data, v)
        for name in _CLASSES:
            kw[name].validate(v, name)
        return cls(**kw)

    def to_toml(self, header: str = "") -> str:
        text = dump_toml(self.to_dict())
        if header:
            comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
            text = comment + "\n" + text
        return text

    def replace(self, **sections: Any) -> "BuildConfig":
        return dataclasses.replace(self, **sections)

    # -- hashing ----------------------------------------------------------------------------

    def section_dict(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))

    def section_hash(self, name: str, *, exclude: tuple[str, ...] = ()) -> str:
        d = {k: v for k, v in self.section_dict(name).items() if k not in exclude}
        return content_hash(d)


def content_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys; non-JSON values as str)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------

def load_build_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON build config into a dict of sections."""
    return read_config_file(path, "build config file")


def build_config(file: str | Path | None = None,
                 overrides: Optional[Mapping[str, Any]] = None) -> BuildConfig:
    """Defaults < ``file`` < ``overrides``.

    ``overrides``: ``{"section.key": value}`` (None values are ignored), e.g.
    ``{"build.device": "jetson", "train.epochs": 1, "evaluate.limit": 500}``.
    The file is checked on its own first, so an error in it names the file and the field
    (``recipe.toml: evaluate.limit: expected an integer, got string``).
    """
    data: dict[str, Any] = {}
    if file is not None:
        loaded = load_build_file(file)
        v = Validator(str(file))
        for name, table in _tables(loaded, v).items():
            if name == "train":  # fields it sets; across fields once the options are in
                from train.config import check_fields

                check_fields(table, v, "train", partial=True)
            else:
                _CLASSES[name](**table).validate(v, name)
            data[name] = table
    given = {k: x for k, x in (overrides or {}).items() if x is not None}
    for key, value in given.items():
        section, _, name = key.partition(".")
        if not name or section not in SECTIONS:
            raise ValueError(f"override {key!r}: expected 'section.key' with a section of "
                             f"{', '.join(SECTIONS)}")  # a programming error: callers pass these
        data.setdefault(section, {})[name] = value
    if file is None:
        source = "command-line options"
    else:
        source = f"{file} with command-line options" if given else str(file)
    return BuildConfig.from_dict(data, source=source)


# ---------------------------------------------------------------------------------------------
# a small TOML writer (the stdlib reads TOML but cannot write it)
# ---------------------------------------------------------------------------------------------

def _toml_key(key: str) -> str:
    if key and all(c.isalnum() or c in "-_" for c in key):
        return key
    return json.dumps(key)


def _toml_value(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{where}: cannot write {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        items = [x for x in v if x is not None]
        if len(items) != len(v):
            raise ValueError(f"{where}: TOML lists cannot hold null")
        return "[" + ", ".join(_toml_value(x, where) for x in items) + "]"
    if isinstance(v, Mapping):
        parts = [f"{_toml_key(str(k))} = {_toml_value(x, where)}" for k, x in v.items()
                 if x is not None]
        return "{ " + ", ".join(parts) + " }" if parts else "{}"
    raise ValueError(f"{where}: cannot write {type(v).__name__} to TOML")


def dump_toml(data: Mapping[str, Mapping[str, Any]]) -> str:
    """``{section: {key: value}}`` as TOML. None values are left out (TOML has no null; every
    field that may be None defaults to None, so reading the file back gives the same config)."""
    out: list[str] = []
    for section, table in data.items():
        out.append(f"[{_toml_key(section)}]")
        for key, value in table.items():
            if value is None:
                continue
            out.append(f"{_toml_key(key)} = {_toml_value(value, f'[{section}].{key}')}")
        out.append("")
    return "\n".join(out)
