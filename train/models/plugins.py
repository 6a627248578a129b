"""Models defined outside this package: ``package.module:factory`` specs and installed plugins.

A model name that is not registered (``train/models/__init__.py``) is resolved, in order, as

1. an entry point of the group :data:`ENTRY_POINT_GROUP` (``adaptive_depth_pipeline.models``)
   declared by an installed distribution (``[project.entry-points."adaptive_depth_pipeline.models"]
   mynet = "mypkg.models:mynet"``);
2. a spec ``package.module:factory`` (``identifier(.identifier)*:identifier``): the module is
   imported with :func:`importlib.import_module` (so it must be importable: installed, or on
   ``PYTHONPATH``) and ``factory`` is looked up in it.

The factory is called like a registered entry point, ``factory(num_classes=, in_chans=,
img_size=, **kwargs)``, and must return an :class:`AdaptiveDepthNet`.

**Importing runs code.** A checkpoint records the spec (``model_name``) and loading it imports that
module: that is explicit intent of whoever wrote the spec, but a checkpoint from someone else
naming a module imports that module from *your* ``sys.path``. Nothing else is imported: a spec
that is not ``identifier(.identifier)*:identifier`` is refused before any import, and the
checkpoint itself is still read with ``weights_only=True`` (nothing is unpickled).
"""
from __future__ import annotations

import importlib
import keyword
from collections.abc import Callable
from importlib import metadata

from runtime.errors import UsageError

ENTRY_POINT_GROUP = "adaptive_depth_pipeline.models"


def is_spec(name: str) -> bool:
    """Whether ``name`` is meant as a ``module:factory`` spec (it has a colon)."""
    return ":" in name


def _identifier(part: str) -> bool:
    return part.isidentifier() and not keyword.iskeyword(part) and part.isascii()


def parse_spec(spec: str) -> tuple[str, str]:
    """``"pkg.mod:factory"`` -> ``("pkg.mod", "factory")``; anything else raises UsageError
    (before anything is imported)."""
    module, sep, factory = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and module and all(_identifier(p) for p in module.split("."))
            and _identifier(factory)):
        raise UsageError(f"model spec {spec!r} is not 'package.module:factory' "
                         "(identifier(.identifier)*:identifier)")
    return module, factory


def resolve_spec(spec: str) -> Callable:
    """Import the module of a ``module:factory`` spec and return the factory (UsageError if the
    module cannot be imported or has no callable ``factory``)."""
    module_name, factory = parse_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"model spec {spec!r}: no module named {exc.name!r} (install it or "
                             "put its folder on PYTHONPATH)") from None
        raise  # the user's module itself failed to import one of its dependencies
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise UsageError(f"model spec {spec!r}: module {module_name!r} has no callable {factory!r}")
    return fn


def entry_points() -> dict[str, metadata.EntryPoint]:
    """Installed plugin models: entry-point name -> entry point (group ENTRY_POINT_GROUP)."""
    try:
        found = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # Python < 3.10 API
        found = metadata.entry_points().get(ENTRY_POINT_GROUP, [])  # type: ignore[attr-defined]
    return {ep.name: ep for ep in found}


def resolve(name: str) -> Callable | None:
    """The factory of an unregistered model name: an installed entry point, else a
    ``module:factory`` spec; None when ``name`` is neither (an unknown plain name)."""
    eps = entry_points()
    if name in eps:
        fn = eps[name].load()
        if not callable(fn):
            raise UsageError(f"model plugin {name!r} ({eps[name].value}) is not callable")
        return fn
    if is_spec(name):
        return resolve_spec(name)
    return None

