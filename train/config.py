"""Training configuration: one dataclass, loadable from TOML or YAML, overridable from the CLI."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from runtime.errors import ConfigError
from runtime.validate import Validator, field_path, short_repr, type_name


@dataclass
class TrainConfig:
    """Every choice of a training run. Defaults are the Fashion-MNIST recipe."""

    model: str = "resnet20_adn"  # registered name, installed plugin, or "package.module:factory"
    model_kwargs: dict[str, Any] | None = None  # extra keyword arguments of the model's factory
    data: str = "fashion-mnist"
    data_root: str | None = None
    img_size: int | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0
    out: str = "runs/train"

    epochs: int = 6
    batch_size: int = 128
    eval_batch_size: int = 1000
    max_steps: int | None = None  # stop early (smoke tests); the schedule still spans `epochs`
    optimizer: str = "adamw"  # adamw | sgd (AdamW converges faster in the short CPU schedule)
    lr: float = 3e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.3
    min_lr_ratio: float = 0.0
    label_smoothing: float = 0.1
    augment: bool = True

    # Adaptive Depth Networks: sub-path self-distillation (super-net teaches base-net).
    self_distill: bool = True
    alpha: float = 0.5
    kd_temperature: float = 1.0
    exit_weights: list[float] | None = None
    distill_from: str = "final"  # final | same-exit: what the exits learn from (docs/l_depth.md)
    # Mixed skip configurations (some stages skipped, some not) trained per step besides the
    # super-net and the base-net, drawn at random and distilled like the base-net (docs/training.md).
    # None: 1 when self_distill is on, the whole model trains and it has a mixed configuration,
    # else 0.
    mixed_subnets: int | None = None

    # L_depth (optimal-stopping regulariser). depth_loss = false drops it; depth_lambda = 0 keeps
    # its stopping-weighted cross-entropy without the cost of depth.
    depth_loss: bool = True
    depth_on: str = "super"  # super | super+base: the passes L_depth is applied to
    depth_lambda: float = 0.5
    depth_halting: str = "confidence"  # confidence | learned
    depth_tau: float = 0.8
    depth_temperature: float = 0.05
    depth_beta: float = 0.0
    depth_costs: list[float] | None = None  # per-segment costs (e.g. measured latency); default MACs

    channels_last: bool = True
    bf16: bool | str = "auto"  # True | False | "auto" (on where the hardware has native bf16)
    ema: bool = False
    ema_decay: float = 0.999
    threads: int | None = None
    save_every_steps: int = 0  # also checkpoint mid-epoch every N steps (0: epoch ends only)
    exit_threshold: float = 0.9  # confidence threshold for the reported mean exit depth

    # Start from loaded weights, optionally with the backbone frozen (docs/training.md).
    init_weights: str | None = None  # checkpoint / state dict of the same architecture, or torchvision format
    trainable: str = "all"  # all | exits | exits+last (exit heads, and the last stage)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "train config", prefix: str = "") -> None:
        """Type- and range-check every field; raise :class:`runtime.errors.ConfigError` naming
        ``source`` and the first bad field (``prefix.field``)."""
        check_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                     Validator(source), prefix)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config",
                  prefix: str = "") -> "TrainConfig":
        """Build from a dict (a config file's table): unknown keys, wrong types and values out of
        range raise ConfigError naming ``source`` and ``prefix.key`` (e.g. ``train.epochs``)."""
        v = Validator(source)
        v.keys(data, prefix, FIELDS)
        merged = {**_DEFAULTS, **data}
        check_fields(merged, v, prefix)
        return cls(**data)


#: Every option name, and its default.
FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
_DEFAULTS: dict[str, Any] = {f.name: (f.default if f.default is not dataclasses.MISSING
                                      else f.default_factory())  # type: ignore[misc]
                             for f in dataclasses.fields(TrainConfig)}


#: what a sub-network's exits learn from: the super-net's exit of the same index, or its final exit
DISTILL_FROM: tuple[str, ...] = ("same-exit", "final")
#: the passes L_depth is applied to
DEPTH_ON: tuple[str, ...] = ("super", "super+base")

#: what ``trainable`` may be: every parameter, the exit heads only, the heads and the last stage
TRAINABLE: tuple[str, ...] = ("all", "exits", "exits+last")


def _kwargs(v: Validator, x: object, p: str) -> dict:
    """A JSON object whose keys are Python identifiers (keyword arguments of a model factory)."""
    out = v.json_obj(x, p)
    for key in out:
        v.check(key.isidentifier(), field_path(p, key), "expected a keyword-argument name")
    return out


def _nonneg(v: Validator) -> Callable[[object, str], float]:
    return lambda x, p: v.num(x, p, lo=0)


#: field -> check(validator, value, path); every field of TrainConfig has one.
_CHECKS: dict[str, Callable[[Validator, Any, str], object]] = {
    "model": lambda v, x, p: v.str_(x, p),
    "model_kwargs": lambda v, x, p: None if x is None else _kwargs(v, x, p),
    "data": lambda v, x, p: v.str_(x, p),
    "data_root": lambda v, x, p: v.opt_str(x, p),
    "img_size": lambda v, x, p: v.opt_int(x, p, lo=1),
    "val_fraction": lambda v, x, p: v.num(x, p, lo=0, lo_open=True, hi=1, hi_open=True),
    "split_seed": lambda v, x, p: v.int_(x, p),
    "seed": lambda v, x, p: v.int_(x, p),
    "out": lambda v, x, p: v.str_(x, p),
    "epochs": lambda v, x, p: v.int_(x, p, lo=1),
    "batch_size": lambda v, x, p: v.int_(x, p, lo=1),
    "eval_batch_size": lambda v, x, p: v.int_(x, p, lo=1),
    "max_steps": lambda v, x, p: v.opt_int(x, p, lo=1),
    "optimizer": lambda v, x, p: v.enum(x, p, ("sgd", "adamw")),
    "lr": lambda v, x, p: v.num(x, p, lo=0, lo_open=True),
    "momentum": lambda v, x, p: v.num(x, p, lo=0),
    "weight_decay": lambda v, x, p: v.num(x, p, lo=0),
    "warmup_epochs": lambda v, x, p: v.num(x, p, lo=0),
    "min_lr_ratio": lambda v, x, p: v.num(x, p, lo=0, hi=1),
    "label_smoothing": lambda v, x, p: v.num(x, p, lo=0, hi=1, hi_open=True),
    "augment": lambda v, x, p: v.bool_(x, p),
    "self_distill": lambda v, x, p: v.bool_(x, p),
    "alpha": lambda v, x, p: v.num(x, p, lo=0, hi=1),
    "kd_temperature": lambda v, x, p: v.num(x, p, lo=0, lo_open=True),
    "exit_weights": lambda v, x, p: None if x is None else v.list_of(x, p, _nonneg(v), min_len=1),
    "distill_from": lambda v, x, p: v.enum(x, p, DISTILL_FROM),
    "mixed_subnets": lambda v, x, p: None if x is None else v.int_(x, p, lo=0),
    "depth_loss": lambda v, x, p: v.bool_(x, p),
    "depth_on": lambda v, x, p: v.enum(x, p, DEPTH_ON),
    "depth_lambda": lambda v, x, p: v.num(x, p, lo=0),
    "depth_halting": lambda v, x, p: v.enum(x, p, ("confidence", "learned")),
    "depth_tau": lambda v, x, p: v.num(x, p),
    "depth_temperature": lambda v, x, p: v.num(x, p, lo=0, lo_open=True),
    "depth_beta": lambda v, x, p: v.num(x, p),
    "depth_costs": lambda v, x, p: None if x is None else v.list_of(x, p, _nonneg(v), min_len=1),
    "channels_last": lambda v, x, p: v.bool_(x, p),
    "bf16": lambda v, x, p: v.check(isinstance(x, bool) or x == "auto", p,
                                    f"expected true, false or \"auto\", got {short_repr(x)}"),
    "ema": lambda v, x, p: v.bool_(x, p),
    "ema_decay": lambda v, x, p: v.num(x, p, lo=0, lo_open=True, hi=1, hi_open=True),
    "threads": lambda v, x, p: v.opt_int(x, p, lo=1),
    "save_every_steps": lambda v, x, p: v.int_(x, p, lo=0),
    "exit_threshold": lambda v, x, p: v.num(x, p, lo=0, lo_open=True, hi=1),
    "init_weights": lambda v, x, p: v.opt_str(x, p),
    "trainable": lambda v, x, p: v.enum(x, p, TRAINABLE),
}


def check_fields(values: Mapping[str, Any], v: Validator, prefix: str = "",
                 *, partial: bool = False) -> None:
    """Check ``values`` (every TrainConfig field) field by field, then across fields.
    ``partial``: ``values`` holds some fields only (one source's); check those, nothing across."""
    for name, check in _CHECKS.items():
        if name in values or not partial:
            check(v, values[name], field_path(prefix, name))
    if partial:
        return
    v.check(values["warmup_epochs"] < values["epochs"], field_path(prefix, "warmup_epochs"),
            f"expected a number < epochs ({values['epochs']}), got {short_repr(values['warmup_epochs'])}")
    v.check(values["self_distill"] or not values["mixed_subnets"], field_path(prefix, "mixed_subnets"),
            "mixed sub-networks are distilled from the super-net: they need self_distill = true")


def read_config_file(path: "str | os.PathLike[str]", what: str = "a config file") -> dict:
    """A TOML, YAML or JSON file's top-level table. A missing file raises FileNotFoundError;
    an unreadable, malformed or non-table one :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    text = path.read_text()
    suffix = path.suffix.lower()
    if suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(path, "", f"invalid TOML: {exc}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigError(path, "", "YAML configs need PyYAML (pip install pyyaml)") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(path, "", f"invalid YAML: {' '.join(str(exc).split())}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(path, "", f"invalid JSON: {exc}") from None
    else:
        raise ConfigError(path, "", f"{what} must be .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ConfigError(path, "", f"top level must be a table/mapping, got {type_name(data)}")
    return data


def read_config_table(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read a TOML/YAML/JSON config file: ``(table, prefix)``, where ``table`` is its ``[train]``
    table (prefix ``"train"``) when it has one, else the whole file (prefix ``""``).

    A missing file raises FileNotFoundError; an unreadable or malformed one ConfigError."""
    data = read_config_file(path)
    v = Validator(str(path))
    if "train" in data:
        return v.keys(data["train"], "train", FIELDS), "train"
    return data, ""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML file into a dict (a `[train]` table is used when present)."""
    return read_config_table(path)[0]


def build_config(file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < config file < explicit overrides (None values are ignored).

    The file is checked on its own first, so an error in it names the file and the field
    (``recipe.toml: train.epochs: expected an integer, got string``)."""
    data: dict[str, Any] = {}
    prefix = ""
    if file is not None:
        data, prefix = read_config_table(file)
        v = Validator(str(file))
        v.keys(data, prefix, FIELDS)
        check_fields(data, v, prefix, partial=True)
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given and file is not None:
        return TrainConfig.from_dict(data, source=str(file), prefix=prefix)
    source = "command-line options" if file is None else f"{file} with command-line options"
    return TrainConfig.from_dict({**data, **given}, source=source, prefix=prefix)
