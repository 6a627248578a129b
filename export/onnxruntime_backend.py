"""The ``onnxruntime`` backend: a graph-optimised ONNX per piece, plus the session options.

ONNX Runtime can save the graph it optimised (``SessionOptions.optimized_model_filepath``) so the
device skips those passes when it loads the model. ORT's documentation warns that a model saved
with the ``all`` level may contain layout optimisations (NCHWc) specific to the hardware it was
optimised on, and that a model pre-optimised for one execution provider should run with that
provider. So the level that is *saved* is capped (docs/export.md):

* ``extended`` when the CPU provider comes first (CPU-only profiles): fusions (Conv+Add+Relu,
  GELU, LayerNorm, attention...) into ORT contrib ops, independent of the CPU model;
* ``basic`` when any other provider comes first (CUDA, TensorRT, OpenVINO, XNNPACK, ...):
  constant folding and redundant-node elimination only. Basic rewrites run before graph
  partitioning and suit every provider; extended fusions are assigned per provider at
  optimisation time (here: the CPU provider), and the CPU contrib ops they write cannot run on
  TensorRT or OpenVINO.

The artifact records the saved level (``saved_optimization_level``) and the provider it was
saved for (``saved_for_provider``). The profile's own level (usually ``all``) is applied *online*
on the device when the session is created, together with the profile's providers, their
``provider_options`` and thread counts (``runtime.backends.onnxruntime_runner.ORTPieceRunner``
reads them from the options and the deployment record).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

LEVELS = ("disable", "basic", "extended", "all")
CPU_PROVIDER = "CPUExecutionProvider"


def _cap(level: str, cap: str) -> str:
    return LEVELS[min(LEVELS.index(level), LEVELS.index(cap))]


def saved_level(options: Mapping[str, Any]) -> str:
    """Optimisation level baked into the saved model for a profile's onnxruntime options."""
    level = options.get("graph_optimization_level", "all")
    if level not in LEVELS:
        raise ValueError(f"graph_optimization_level {level!r}: expected one of {', '.join(LEVELS)}")
    return _cap(level, "extended" if _first_provider(options) == CPU_PROVIDER else "basic")


def _first_provider(options: Mapping[str, Any]) -> str:
    providers = list(options.get("providers") or [CPU_PROVIDER])
    return providers[0] if providers else CPU_PROVIDER


def runner_settings(options: Mapping[str, Any]) -> dict[str, Any]:
    """The runner options of a profile's onnxruntime options (artifact and deployment record
    alike): providers, their ``provider_options`` (when the profile sets any), threads, the
    online optimisation level."""
    out: dict[str, Any] = {
        "providers": list(options.get("providers") or [CPU_PROVIDER]),
        "intra_op_threads": int(options.get("intra_op_threads") or 0),
        "inter_op_threads": int(options.get("inter_op_threads") or 0),
        "graph_optimization_level": options.get("graph_optimization_level", "all"),
    }
    if options.get("provider_options"):
        out["provider_options"] = {ep: dict(o) for ep, o in options["provider_options"].items()}
    return out


def target_for(arch: str, options: Mapping[str, Any]) -> str:
    """``x86_64-cpu`` / ``aarch64-cuda``: the artifact target for these options."""
    providers = list(options.get("providers") or ["CPUExecutionProvider"])
    first = providers[0] if providers else "CPUExecutionProvider"
    ep = first.replace("ExecutionProvider", "").lower() or "cpu"
    return f"{arch}-{ep}"


def runtime_options(options: Mapping[str, Any], saved: str) -> dict[str, Any]:
    """Artifact options: what the device's ORTPieceRunner uses, plus provenance."""
    import onnxruntime as ort

    return {
        **runner_settings(options),
        "saved_optimization_level": saved,
        "saved_for_provider": _first_provider(options),
        "optimized_with": {"onnxruntime": ort.__version__, "providers": [CPU_PROVIDER]},
    }


def optimize_onnx(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                  options: Mapping[str, Any]) -> dict[str, Any]:
    """Write the ORT-optimised model of ``onnx_path`` to ``out_path``; returns artifact options."""
    import onnxruntime as ort

    from runtime.backends.onnxruntime_runner import session_options

    saved = saved_level(options)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    so = session_options(intra_op_threads=1, inter_op_threads=1, graph_optimization_level=saved,
                         optimized_model_path=out_path)
    ort.InferenceSession(str(onnx_path), sess_options=so, providers=["CPUExecutionProvider"])
    if not out_path.is_file() or out_path.stat().st_size == 0:
        raise RuntimeError(f"onnxruntime did not write the optimised model {out_path}")
    return runtime_options(options, saved)


# -- backend registry interface (export/backends.py) ---------------------------------------------

def check_profile(profile) -> None:
    """ONNX Runtime compiles for any profile (a base dependency: always importable)."""
    import onnxruntime  # noqa: F401  (a base dependency)


def target_name(profile) -> str:
    from export.backends import artifact_id

    return artifact_id(target_for(profile.arch, profile.backend("onnxruntime").options))


def compile_piece(profile, onnx_path: Path, root: Path, piece_id: str, *, target: str,
                  **_kw: Any) -> tuple[str, dict, str]:
    """The ORT-optimised ONNX of one piece under ``onnxruntime/<target>/``."""
    rel = f"onnxruntime/{target}/{piece_id}.onnx"
    opts = optimize_onnx(onnx_path, root / rel, profile.backend("onnxruntime").options)
    return rel, opts, f"saved at level '{opts['saved_optimization_level']}'"


def deployment(profile, target: str):
    """(requirements, runner options): the architecture whose CPU the graph was saved for,
    and the profile's providers (with their options), threads and online optimisation level."""
    from runtime.manifest import Requirements

    runner = runner_settings(profile.backend("onnxruntime").options)
    return Requirements(arch=None if target == "portable" else profile.arch), runner


def can_verify_here(profile) -> bool:
    return True
