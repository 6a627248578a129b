"""The on-device runtime: load a bundle, predict with early exits under a deadline.

    from runtime import AdaptiveModel
    model = AdaptiveModel.load("my-bundle-x86-host")
    pred = model.predict(image_uint8_hwc, budget_ms=10.0)
    print(pred.class_name, pred.exit_index, pred.latency_ms)

Needs only numpy and one backend (onnxruntime by default); never imports torch. Names are
imported lazily on first access, so ``import runtime.manifest`` stays stdlib-only.
See docs/runtime.md (API) and docs/bundle.md (bundle format).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdaptiveModel": "runtime.model",
    "Prediction": "runtime.model",
    "BackendChoice": "runtime.model",
    "BackendUnavailableError": "runtime.model",
    "BackendFallbackWarning": "runtime.model",
    "select_backend": "runtime.model",
    "softmax": "runtime.model",
    "prepare_input": "runtime.preprocess",
    "normalize": "runtime.preprocess",
    "Deadline": "runtime.deadline",
    "FakeClock": "runtime.deadline",
    "LatencyModel": "runtime.deadline",
    "LatencyTable": "runtime.deadline",
    "OnlineLatency": "runtime.deadline",
    "Bundle": "runtime.bundle",
    "Manifest": "runtime.manifest",
    "load_manifest": "runtime.manifest",
    "BundleError": "runtime.errors",
    "BundleIntegrityError": "runtime.errors",
    "ManifestError": "runtime.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
