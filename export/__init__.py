"""Export: checkpoint -> portable bundle (ONNX pieces) -> device bundles (onnxruntime, tvm, tensorrt).

Public API (see docs/export.md)::

    from export import export_checkpoint, compile_bundle
    export_checkpoint("runs/x/model.pt", "bundles/x")               # -> Path (portable bundle)
    compile_bundle("bundles/x", "raspberry-pi-5")                    # -> Path bundles/x-raspberry-pi-5

Names are imported lazily: ``import export.tensorrt`` (or ``export.tvm``) must not pull in torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "export_checkpoint": "export.portable",
    "export_model": "export.portable",
    "load_parity_images": "export.portable",
    "compile_bundle": "export.compile",
    "check_backend": "export.backends",
    "BackendUnavailable": "export.backends",
    "ParityError": "export.parity",
    "ExportError": "export.errors",
    "segment_plan": "export.segments",
    "SegmentPlan": "export.segments",
    "PieceDef": "export.segments",
    "GRANULARITIES": "export.segments",
    "DEFAULT_GRANULARITY": "export.segments",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
