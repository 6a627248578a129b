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

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = ["BuildSection", "ExportSection", "ProfileSection", "CalibrateSection",
           "EvaluateSection", "AcceptanceSection", "BuildConfig", "load_build_file",
           "build_config", "dump_toml", "content_hash", "SECTIONS", "RULES_FOR_CURVES"]

BACKENDS = ("onnxruntime", "tvm", "tensorrt")
RULES_FOR_CURVES = ("max_prob", "entropy", "patience", "lookahead")
PROFILE_MODES = ("quick", "standard", "full")


def _fail(where: str, msg: str) -> None:
    raise ValueError(f"build config: {where}: {msg}")


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


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

    def validate(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            _fail("[build].device", f"expected a device profile name, got {self.device!r}")
        if not isinstance(self.out, str) or not self.out:
            _fail("[build].out", f"expected a directory, got {self.out!r}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            _fail("[build].checkpoint", f"expected a path, got {self.checkpoint!r}")
        if isinstance(self.backends, str):
            if self.backends != "auto":
                parts = [p.strip() for p in self.backends.split(",") if p.strip()]
                self.backends = parts
        if not isinstance(self.backends, str):
            if not isinstance(self.backends, (list, tuple)) or not self.backends:
                _fail("[build].backends",
                      f"expected \"auto\" or a non-empty list, got {self.backends!r}")
            bad = [b for b in self.backends if b not in BACKENDS]
            if bad:
                _fail("[build].backends", f"unknown backend(s) {', '.join(map(str, bad))}; known: "
                      f"{', '.join(BACKENDS)} (or \"auto\")")
            self.backends = list(dict.fromkeys(self.backends))
        for name in ("tune_trials", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail(f"[build].{name}", f"expected an integer >= 0, got {v!r}")
        if not isinstance(self.archive, bool):
            _fail("[build].archive", f"expected true or false, got {self.archive!r}")


@dataclass
class ExportSection:
    """Export of the checkpoint to ONNX pieces (export.portable.export_checkpoint)."""
    opset: int = 17
    granularity: str = "stage"        # stage | split
    exporter: str = "torchscript"     # torchscript | dynamo
    parity_samples: int = 64

    def validate(self) -> None:
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or self.opset < 17:
            _fail("[export].opset", f"expected an integer >= 17, got {self.opset!r}")
        if self.granularity not in ("stage", "split"):
            _fail("[export].granularity", f"expected 'stage' or 'split', got {self.granularity!r}")
        if self.exporter not in ("torchscript", "dynamo"):
            _fail("[export].exporter", f"expected 'torchscript' or 'dynamo', got {self.exporter!r}")
        if isinstance(self.parity_samples, bool) or not isinstance(self.parity_samples, int) \
                or self.parity_samples < 1:
            _fail("[export].parity_samples", f"expected an integer >= 1, got {self.parity_samples!r}")


@dataclass
class ProfileSection:
    """Latency tables: measured where the bundle runs here, estimated otherwise."""
    mode: str = "standard"            # quick | standard | full (devices.profiler settings)
    batches: list = field(default_factory=lambda: [1])

    def validate(self) -> None:
        if self.mode not in PROFILE_MODES:
            _fail("[profile].mode", f"expected one of {', '.join(PROFILE_MODES)}, got {self.mode!r}")
        if not isinstance(self.batches, (list, tuple)) or not self.batches or any(
                isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches):
            _fail("[profile].batches", f"expected a list of integers >= 1, got {self.batches!r}")
        self.batches = sorted(set(self.batches))
        if 1 not in self.batches:
            _fail("[profile].batches", "must include 1 (the stopping rule and the report use batch 1)")


@dataclass
class CalibrateSection:
    """Stopping-rule calibration on the validation split (runtime.calibration.calibrate)."""
    rule: str = "max_prob"            # max_prob | entropy | patience | lookahead | full
    max_drop: float = 0.5             # accuracy points vs full depth
    mean_budget_ms: Optional[float] = None  # target mean latency instead of max_drop
    risk_delta: Optional[float] = None      # risk-controlled fit (P(drop <= max_drop) >= 1-delta)
    skip_config: str = "auto"         # "auto": the fastest configuration that meets the target;
                                      # "full" (FF..F); or one, e.g. "FTF"
    limit: int = 0                    # validation images (0: all)

    def validate(self) -> None:
        from runtime.rules import RULES

        if self.rule not in RULES:
            _fail("[calibrate].rule", f"unknown rule {self.rule!r}; known: {', '.join(RULES)}")
        if not _is_num(self.max_drop) or not 0 <= float(self.max_drop) <= 100:
            _fail("[calibrate].max_drop",
                  f"expected accuracy points in [0, 100], got {self.max_drop!r}")
        if self.mean_budget_ms is not None and (not _is_num(self.mean_budget_ms)
                                                or float(self.mean_budget_ms) <= 0):
            _fail("[calibrate].mean_budget_ms", f"expected a number > 0, got {self.mean_budget_ms!r}")
        if self.risk_delta is not None and (not _is_num(self.risk_delta)
                                            or not 0 < float(self.risk_delta) < 1):
            _fail("[calibrate].risk_delta", f"expected a number in (0, 1), got {self.risk_delta!r}")
        if not isinstance(self.skip_config, str) or not (
                self.skip_config in ("full", "auto") or (self.skip_config
                                                         and set(self.skip_config) <= {"F", "T"})):
            _fail("[calibrate].skip_config", "expected \"full\", \"auto\" or a string of F/T per "
                  f"stage, got {self.skip_config!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            _fail("[calibrate].limit", f"expected an integer >= 0, got {self.limit!r}")


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

    def validate(self) -> None:
        from runtime.rules import RULES

        for name in ("limit", "measure_limit", "warmup", "batch_threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail(f"[evaluate].{name}", f"expected an integer >= 0, got {v!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
                or self.batch_size < 1:
            _fail("[evaluate].batch_size", f"expected an integer >= 1, got {self.batch_size!r}")
        if not isinstance(self.rules, (list, tuple)) or any(r not in RULES or r == "full"
                                                            for r in self.rules):
            _fail("[evaluate].rules", f"expected a list of {', '.join(RULES_FOR_CURVES)}, got "
                  f"{self.rules!r}")
        for name in ("max_drops", "budgets_ms"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or any(not _is_num(x) or x < 0 for x in v):
                _fail(f"[evaluate].{name}", f"expected a list of numbers >= 0, got {v!r}")
        if any(b <= 0 for b in self.budgets_ms):
            _fail("[evaluate].budgets_ms", "budgets must be > 0 ms")
        if self.headline_budget_ms is not None and (not _is_num(self.headline_budget_ms)
                                                    or self.headline_budget_ms <= 0):
            _fail("[evaluate].headline_budget_ms", f"expected a number > 0, got "
                  f"{self.headline_budget_ms!r}")
        self.rules = list(dict.fromkeys(self.rules))


@dataclass
class AcceptanceSection:
    """Targets the build checks and reports (pass/fail), measured on this host in one run."""
    max_drop: float = 0.5             # adaptive accuracy within this many points of full depth ...
    latency_ratio: float = 0.6        # ... at a mean latency <= this x the monolithic ORT session
    full_depth_overhead: float = 1.10  # segmented full depth <= this x the monolithic session
    budget_percentile: float = 99.0   # this percentile of the budgeted run stays within the budget

    def validate(self) -> None:
        for name in ("max_drop", "latency_ratio", "full_depth_overhead", "budget_percentile"):
            v = getattr(self, name)
            if not _is_num(v) or v <= 0:
                _fail(f"[acceptance].{name}", f"expected a number > 0, got {v!r}")
        if self.budget_percentile > 100:
            _fail("[acceptance].budget_percentile", "expected a percentile in (0, 100]")


SECTIONS = ("build", "train", "export", "profile", "calibrate", "evaluate", "acceptance")
_CLASSES = {"build": BuildSection, "export": ExportSection, "profile": ProfileSection,
            "calibrate": CalibrateSection, "evaluate": EvaluateSection,
            "acceptance": AcceptanceSection}


def _train_cls():
    from train.config import TrainConfig
    return TrainConfig


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

    def validate(self) -> None:
        for name in _CLASSES:
            getattr(self, name).validate()
        self.train.validate()

    # -- dict / TOML --------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "BuildConfig":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: top level must be a table/mapping")
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {', '.join(f'[{u}]' for u in unknown)}; "
                             f"known: {', '.join(f'[{s}]' for s in SECTIONS)}")
        kw: dict[str, Any] = {}
        for name in SECTIONS:
            table = data.get(name) or {}
            if not isinstance(table, Mapping):
                raise ValueError(f"{source}: [{name}] must be a table, got {type(table).__name__}")
            klass = _train_cls() if name == "train" else _CLASSES[name]
            known = {f.name for f in dataclasses.fields(klass)}
            bad = sorted(set(table) - known)
            if bad:
                raise ValueError(f"{source}: unknown key(s) in [{name}]: {', '.join(bad)}; known: "
                                 f"{', '.join(sorted(known))}")
            try:
                kw[name] = klass(**dict(table))
            except TypeError as exc:
                raise ValueError(f"{source}: [{name}]: {exc}") from None
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"build config file not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from None
    else:
        raise ValueError(f"{path}: a build config must be .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a table/mapping")
    return data


def build_config(file: str | Path | None = None,
                 overrides: Optional[Mapping[str, Any]] = None) -> BuildConfig:
    """Defaults < ``file`` < ``overrides``.

    ``overrides``: ``{"section.key": value}`` (None values are ignored), e.g.
    ``{"build.device": "jetson", "train.epochs": 1, "evaluate.limit": 500}``.
    """
    data: dict[str, dict[str, Any]] = {}
    source = str(file) if file is not None else "options"
    if file is not None:
        for name, table in load_build_file(file).items():
            data[name] = dict(table) if isinstance(table, Mapping) else table
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, name = key.partition(".")
        if not name:
            raise ValueError(f"override {key!r}: expected 'section.key'")
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"{source}: [{section}] must be a table")
        table[name] = value
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
