"""Model registry: ``@register_model`` entry points, ``create_model`` by name, listing and summaries."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from .base import AdaptiveDepthNet, all_skip_configs
from runtime.errors import UsageError

EntryFn = Callable[..., AdaptiveDepthNet]
F = TypeVar("F", bound=EntryFn)


@dataclass(frozen=True)
class ModelInfo:
    """What ``list_models`` reports about a registered model."""

    name: str
    family: str
    description: str
    default_img_size: int
    num_stages: int


_ENTRIES: dict[str, EntryFn] = {}
_META: dict[str, dict] = {}
_LEGACY: dict[str, dict] = {}


def register_model(fn: F | None = None, *, name: str | None = None, family: str = "",
                   description: str | None = None, default_img_size: int | None = None,
                   num_stages: int | None = None, legacy_config: dict | None = None):
    """Register an entry point ``fn(num_classes=, in_chans=, img_size=None, **kwargs) -> AdaptiveDepthNet``.

    Usable bare (``@register_model``) or with metadata; the description defaults to the first
    docstring line, and a missing image size / stage count is read off a model built on the meta device.
    ``legacy_config``: config keys whose default changed after checkpoints were written, with the
    value such a checkpoint was built with (:func:`checkpoint_model_config`).
    """
    def wrap(f: F) -> F:
        key = name or f.__name__
        if key in _ENTRIES:
            raise ValueError(f"model {key!r} is already registered")
        doc = (f.__doc__ or "").strip().splitlines()
        _ENTRIES[key] = f
        _META[key] = {"family": family, "description": description or (doc[0] if doc else ""),
                      "default_img_size": default_img_size, "num_stages": num_stages}
        _LEGACY[key] = dict(legacy_config or {})
        return f

    return wrap(fn) if fn is not None else wrap


def _entry(name: str) -> EntryFn:
    """A registered name, else an installed plugin (entry point) or a ``module:factory`` spec
    (``plugins.py``: importing a spec's module runs its code, see there)."""
    if name in _ENTRIES:
        return _ENTRIES[name]
    from . import plugins

    fn = plugins.resolve(name)
    if fn is None:
        extra = sorted(plugins.entry_points())
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(sorted(_ENTRIES) + extra)} "
                         "(or a model of your own as 'package.module:factory')")
    return fn


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, img_size: int | None = None,
                 **kwargs) -> AdaptiveDepthNet:
    """Build a registered model, an installed plugin model or a ``module:factory`` spec;
    ``img_size=None`` uses the model's default. Sets ``model.model_name`` (the name or spec) and
    ``model.model_kwargs`` (the extra ``kwargs``).

    ``create_model(model.model_name, **model.model_kwargs, **model.model_config())`` rebuilds an
    identical architecture (``model_config`` wins where both have a key).
    """
    fn = _entry(name)
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = fn(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if not isinstance(model, AdaptiveDepthNet):
        raise UsageError(f"model {name!r} returned a {type(model).__name__}, not an AdaptiveDepthNet "
                         "(wrap a backbone with train.models.compose.compose_adn)")
    model.model_name = name
    model.model_kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
    return model


def checkpoint_model_config(name: str, config: dict) -> dict:
    """The factory keyword arguments of a checkpoint's ``model_config``: keys a checkpoint from
    before a default changed does not have get the value it was built with (the model's
    ``legacy_config``)."""
    return {**_LEGACY.get(name, {}), **config}


def list_models(plugins: bool = True) -> list[ModelInfo]:
    """Every registered model, sorted by name, then (``plugins``) every installed plugin model
    (entry-point group ``adaptive_depth_pipeline.models``; one that fails to load is left out
    with a warning)."""
    infos = []
    for key in sorted(_ENTRIES):
        meta = dict(_META[key])
        if meta["default_img_size"] is None or meta["num_stages"] is None:
            with torch.device("meta"):
                model = _ENTRIES[key]()
            meta["default_img_size"] = meta["default_img_size"] or model.img_size
            meta["num_stages"] = meta["num_stages"] or model.num_stages
            _META[key].update(meta)
        infos.append(ModelInfo(name=key, **meta))
    if plugins:
        infos.extend(_plugin_infos())
    return infos


def _plugin_infos() -> list[ModelInfo]:
    import warnings

    from .plugins import entry_points

    infos = []
    for key, ep in sorted(entry_points().items()):
        if key in _ENTRIES:
            continue
        try:
            fn = ep.load()
            with torch.device("meta"):
                model = fn()
            doc = (getattr(fn, "__doc__", None) or "").strip().splitlines()
            infos.append(ModelInfo(name=key, family=f"plugin:{ep.value.partition(':')[0]}",
                                   description=doc[0] if doc else ep.value,
                                   default_img_size=int(model.img_size), num_stages=int(model.num_stages)))
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the listing
            warnings.warn(f"model plugin {key!r} ({ep.value}) left out: {type(exc).__name__}: {exc}")
    return infos


def model_summary(name: str, input_size: int | tuple[int, int] | None = None, in_chans: int = 3,
                  num_classes: int = 10) -> dict:
    """JSON-ready summary: params, stages and MACs per exit for each of the 2^S skip configs.

    ``input_size`` (side or (H, W)) defaults to the model's image size; the model is built at it.
    """
    from .macs import macs_per_exit, params_per_exit, piece_macs  # macs does not import the registry

    side = input_size if isinstance(input_size, int) or input_size is None else max(input_size)
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=side)
    hw = _hw(input_size if input_size is not None else model.img_size)
    pieces = piece_macs(model, hw)
    return {
        "name": name,
        "params": sum(p.numel() for p in model.parameters()),
        "stages": model.num_stages,
        "input_size": [in_chans, *hw],
        "params_per_exit": params_per_exit(model),
        "skip_configs": [{"skip": list(s), "macs_per_exit": macs_per_exit(model, s, hw, pieces=pieces)}
                         for s in all_skip_configs(model.num_stages)],
    }


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
