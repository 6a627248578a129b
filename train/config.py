"""Training configuration: one dataclass, loadable from TOML or YAML, overridable from the CLI."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class TrainConfig:
    """Every choice of a training run. Defaults are the Fashion-MNIST recipe."""

    model: str = "resnet20_adn"
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

    # L_depth (optimal-stopping regulariser); depth_lambda = 0 disables it.
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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0, "must be > 0"),
            ("optimizer", self.optimizer in ("sgd", "adamw"), "must be 'sgd' or 'adamw'"),
            ("val_fraction", 0.0 < self.val_fraction < 1.0, "must be in (0, 1)"),
            ("label_smoothing", 0.0 <= self.label_smoothing < 1.0, "must be in [0, 1)"),
            ("alpha", 0.0 <= self.alpha <= 1.0, "must be in [0, 1]"),
            ("kd_temperature", self.kd_temperature > 0, "must be > 0"),
            ("depth_lambda", self.depth_lambda >= 0, "must be >= 0"),
            ("depth_halting", self.depth_halting in ("confidence", "learned"),
             "must be 'confidence' or 'learned'"),
            ("warmup_epochs", 0 <= self.warmup_epochs < self.epochs, "must be in [0, epochs)"),
            ("ema_decay", 0.0 < self.ema_decay < 1.0, "must be in (0, 1)"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1"),
            ("exit_threshold", 0.0 < self.exit_threshold <= 1.0, "must be in (0, 1]"),
            ("bf16", isinstance(self.bf16, bool) or self.bf16 == "auto", "must be true, false or 'auto'"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"train config: {name}={getattr(self, name)!r} {why}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown training option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        return cls(**data)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML file into a dict (a `[train]` table is used when present)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
    elif path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ValueError(f"{path}: YAML configs need PyYAML (pip install pyyaml)") from None
        data = yaml.safe_load(text) or {}
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: config must be .toml, .yaml/.yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a table/mapping")
    return data.get("train", data)


def build_config(file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < config file < explicit overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    if file is not None:
        data.update(load_config_file(file))
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data, source=str(file or "options"))
