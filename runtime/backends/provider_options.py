"""ONNX Runtime execution-provider options: the known options per provider, checked, resolved.

A device profile's onnxruntime backend may carry ``provider_options``, a table per execution
provider (docs/devices.md)::

    [backends.options.provider_options.TensorrtExecutionProvider]
    trt_engine_cache_enable = true
    trt_engine_cache_path = "onnxruntime-trt"      # inside the bundle's engines/ directory

They flow like the thread counts: profile -> the onnxruntime artifacts' options and the
deployment record's ``runner_options`` (runtime/manifest.py) -> ``ORTPieceRunner`` ->
``InferenceSession(providers=[(name, options), ...])``, and only providers this onnxruntime has
get them. :data:`KNOWN` is the one table of options and types (from the ONNX Runtime provider
documentation); :func:`check` validates with the shared :class:`runtime.validate.Validator`.
Stdlib only.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Optional

from runtime.backends.tensorrt_cache import ENGINES_DIR
from runtime.validate import Validator, field_path

__all__ = ["KNOWN", "TRT_EP", "CACHE_PATH", "DEFAULT_CACHE_DIR", "ENGINES_DIR", "check",
           "session_providers"]

TRT_EP = "TensorrtExecutionProvider"
CACHE_PATH = "trt_engine_cache_path"
#: The TensorRT EP's engine cache: ``<bundle>/engines/<path>`` (default below).
DEFAULT_CACHE_DIR = "onnxruntime-tensorrt"

_UINT = ("int", 0)
_POS = ("int", 1)
_BOOL = ("bool",)
_RELPATH = ("relpath",)
_DEVICE_TYPE = ("str", re.compile(r"[A-Z][A-Z0-9_.:,]*"), "a device like 'CPU', 'GPU.0' or "
                "'HETERO:GPU,CPU'")

#: provider -> option -> type: ("int", minimum), ("bool",), ("enum", choices), ("str", pattern,
#: what), ("relpath",) (a path inside the bundle's engines/ directory).
KNOWN: dict[str, dict[str, tuple]] = {
    TRT_EP: {
        "device_id": _UINT,
        "trt_engine_cache_enable": _BOOL,
        CACHE_PATH: _RELPATH,
        "trt_fp16_enable": _BOOL,
        "trt_int8_enable": _BOOL,
        "trt_max_workspace_size": _POS,
    },
    "CUDAExecutionProvider": {
        "device_id": _UINT,
        "arena_extend_strategy": ("enum", ("kNextPowerOfTwo", "kSameAsRequested")),
        "cudnn_conv_algo_search": ("enum", ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")),
        "gpu_mem_limit": _POS,
    },
    "OpenVINOExecutionProvider": {
        "device_type": _DEVICE_TYPE,
        "precision": ("enum", ("FP32", "FP16", "ACCURACY")),
        "num_of_threads": _POS,
    },
    "XnnpackExecutionProvider": {
        "intra_op_num_threads": _POS,
    },
}


def _relpath(v: Validator, value: object, path: str) -> str:
    from runtime.manifest import check_relpath  # runtime.manifest imports this module

    text = v.str_(value, path)
    why = check_relpath(text)
    if why:
        v.fail(path, f"expected a relative path inside the bundle's {ENGINES_DIR}/ directory: {why}")
    return text


def _option(v: Validator, kind: tuple, value: object, path: str) -> Any:
    if kind[0] == "int":
        return v.int_(value, path, lo=kind[1])
    if kind[0] == "bool":
        return v.bool_(value, path)
    if kind[0] == "enum":
        return v.enum(value, path, kind[1])
    if kind[0] == "str":
        return v.str_(value, path, pattern=kind[1], what=kind[2])
    return _relpath(v, value, path)


def check(v: Validator, raw: object, path: str,
          providers: Optional[list[str]] = None) -> dict[str, dict[str, Any]]:
    """Validated ``provider_options`` (provider -> option -> value) at ``path``.

    An unknown provider or option, or a wrong type, fails through ``v`` naming the field. With
    ``providers``, the options of a (known) provider the list does not name are checked and
    left out (a profile that ``extends`` another may change its providers)."""
    table = v.obj(raw, path, (), KNOWN)
    out: dict[str, dict[str, Any]] = {}
    for ep, opts in table.items():
        p = field_path(path, ep)
        known = KNOWN[ep]
        opts = v.obj(opts, p, (), known)
        checked = {k: _option(v, known[k], val, field_path(p, k)) for k, val in opts.items()}
        if providers is None or ep in providers:
            out[ep] = checked
    return out


def _cache_dir(bundle_root: Optional[Path], rel: str, source: object) -> str:
    if bundle_root is None:
        from runtime.errors import ConfigError

        raise ConfigError(source, f"options.provider_options.{TRT_EP}.{CACHE_PATH}",
                          "the TensorRT EP's engine cache lives in the bundle's engines/ "
                          "directory, but no manifest.json was found above this file")
    return str(Path(bundle_root) / ENGINES_DIR / rel)


def session_providers(providers: list[str], options: Optional[Mapping[str, Mapping[str, Any]]],
                      bundle_root: Optional[Path], source: object = "") -> list[tuple[str, dict]]:
    """``InferenceSession(providers=...)``: ``(name, options)`` for each provider in
    ``providers`` (those this onnxruntime has). The TensorRT EP's engine cache, when enabled,
    goes to ``<bundle_root>/engines/<trt_engine_cache_path or onnxruntime-tensorrt>``."""
    out = []
    for ep in providers:
        opts = dict((options or {}).get(ep) or {})
        if ep == TRT_EP and (opts.get("trt_engine_cache_enable") or CACHE_PATH in opts):
            opts[CACHE_PATH] = _cache_dir(bundle_root, opts.get(CACHE_PATH, DEFAULT_CACHE_DIR),
                                          source)
        out.append((ep, opts))
    return out
