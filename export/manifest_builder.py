"""Build a bundle manifest step by step: start one, add pieces, hash artifact files into it,
set the execution plan. The schema and its validation live in runtime/manifest.py; this is the
build side's half (the device never builds a manifest).

    m = new_manifest(model_name="resnet20-ee", family="resnet", num_classes=10, ...)
    add_piece(m, Piece(id="stage0.full", ...))
    add_artifact_file(m, bundle_dir, "stage0.full", "onnx/stage0.full.onnx",
                      backend="onnx", target="portable")   # computes sha256/size
    set_execution(m, "FFF", [["stage0.full"], ["stage1.full"], ["stage2.full"]])
    save_manifest(m, bundle_dir / "manifest.json")   # validates, then writes atomically
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from runtime.errors import UnsafePathError
from runtime.manifest import (Artifact, ExitInfo, InputSpec, Manifest, ModelInfo, Piece,
                              RawInputSpec, Source, all_skip_configs, check_relpath, sha256_file,
                              utc_now_iso)

__all__ = ["new_manifest", "artifact_from_file", "add_piece", "add_artifact", "add_artifact_file",
           "set_execution"]


def new_manifest(*, model_name: str, family: str, num_classes: int, params: int,
                 input_shape: Iterable[int], mean: Iterable[float], std: Iterable[float],
                 stages: int, tool_version: str, class_names: Optional[Iterable[str]] = None,
                 skip_configs: Optional[Iterable[str]] = None, device: Optional[str] = None,
                 source: Optional[Source] = None, created: Optional[str] = None,
                 input_dtype: str = "float32", raw: Optional[RawInputSpec] = None,
                 annotations: Optional[dict] = None) -> Manifest:
    """Start a manifest for export/ to fill in (pieces, artifacts, execution, latency...).

    Defaults: class names "0".."num_classes-1", all 2**stages skip configs, exit k after
    stage k, no stopping rule, empty latency table, ``created`` = now (UTC). The result is
    not valid until pieces and an execution plan for every skip config are added;
    ``validate()`` / ``save_manifest`` check it.
    """
    return Manifest(
        model=ModelInfo(name=model_name, family=family, num_classes=num_classes, params=params),
        input=InputSpec(shape=list(input_shape), mean=[float(x) for x in mean],
                        std=[float(x) for x in std], dtype=input_dtype,
                        raw=raw if raw is not None else RawInputSpec()),
        class_names=list(class_names) if class_names is not None
        else [str(i) for i in range(num_classes)],
        stages=stages,
        skip_configs=list(skip_configs) if skip_configs is not None else all_skip_configs(stages),
        exits=[ExitInfo(index=k, stage=k) for k in range(stages)],
        pieces=[], execution={}, tool_version=tool_version,
        created=created or utc_now_iso(), device=device,
        source=source if source is not None else Source(),
        annotations=dict(annotations or {}))


def artifact_from_file(bundle_root: os.PathLike | str, file: str, *, backend: str,
                       target: str, options: Optional[dict] = None) -> Artifact:
    """Describe ``bundle_root/file`` (must exist), computing its sha256 and size."""
    why = check_relpath(file)
    if why:
        raise UnsafePathError(os.path.join(os.fspath(bundle_root), str(file)), why,
                              relpath=str(file), bundle=bundle_root)
    full = Path(bundle_root) / file
    return Artifact(backend=backend, target=target, file=file, sha256=sha256_file(full),
                    size_bytes=full.stat().st_size, options=dict(options or {}))


def add_piece(m: Manifest, piece: Piece) -> Piece:
    """Append a piece; its id must be new (ValueError otherwise)."""
    if any(p.id == piece.id for p in m.pieces):
        raise ValueError(f"duplicate piece id {piece.id!r}")
    m.pieces.append(piece)
    return piece


def add_artifact(piece: Piece, artifact: Artifact, *, replace: bool = False) -> Artifact:
    """Attach ``artifact`` to ``piece``; (backend, target) must be new unless ``replace``."""
    for i, a in enumerate(piece.artifacts):
        if a.backend == artifact.backend and a.target == artifact.target:
            if not replace:
                raise ValueError(f"piece {piece.id!r} already has an artifact for "
                                 f"({artifact.backend!r}, {artifact.target!r})")
            piece.artifacts[i] = artifact
            return artifact
    piece.artifacts.append(artifact)
    return artifact


def add_artifact_file(m: Manifest, bundle_root: os.PathLike | str, piece_id: str, file: str, *,
                      backend: str, target: str, options: Optional[dict] = None,
                      replace: bool = False) -> Artifact:
    """Hash ``bundle_root/file`` and attach it to ``piece_id`` as (backend, target)."""
    art = artifact_from_file(bundle_root, file, backend=backend, target=target, options=options)
    return add_artifact(m.piece(piece_id), art, replace=replace)


def set_execution(m: Manifest, skip_config: str, segments: Iterable[Iterable[str]]) -> None:
    """Set the piece ids to run per segment (one list per exit) for ``skip_config``."""
    m.execution[skip_config] = [list(seg) for seg in segments]
