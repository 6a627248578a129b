"""Checkpoint -> portable bundle: ONNX pieces for all 2^S skip configs, checked against torch.

``export_checkpoint(checkpoint, out_dir)`` rebuilds the trained model, cuts it into pieces
(:mod:`export.segments`), exports every piece to ONNX (:mod:`export.onnx_export`), runs the
parity gate on validation images of the checkpoint's dataset (:mod:`export.parity`) and writes
the bundle directory atomically: ``manifest.json`` + ``onnx/<piece>.onnx``, backend ``onnx``,
target ``portable``, ``device: null``, no stopping rule, no latency.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from export.onnx_export import (DEFAULT_EXPORTER, DEFAULT_OPSET, check_onnx, check_opset,
                                export_module)
from export.parity import check_chains, check_pieces, ort_runner
from export.segments import (DEFAULT_GRANULARITY, INPUT_NAME, SegmentPlan, piece_inputs,
                             piece_macs_table, piece_params, segment_plan)
from runtime.atomic import atomic_directory
from runtime.errors import UsageError
from runtime.bundle import Bundle
from export.manifest_builder import add_artifact_file, add_piece, new_manifest, set_execution
from runtime.manifest import (MANIFEST_NAME, Piece, PreprocessSpec, RawInputSpec, Source, TensorSpec,
                              save_manifest, sha256_file)
from runtime.jsonsafe import json_safe
from train.path_norms import PATH_MODELS_ATTR, attach_path_models

ONNX_DIR = "onnx"
PORTABLE_TARGET = "portable"
Progress = Callable[[str], None]


def tool_version() -> str:
    try:
        from importlib.metadata import version
        return version("adaptive-depth-pipeline")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "0.1.0"


def onnx_relpath(piece_id: str) -> str:
    return f"{ONNX_DIR}/{piece_id}.onnx"


# ---------------------------------------------------------------------------------------------
# checkpoint metadata
# ---------------------------------------------------------------------------------------------

def metrics_summary(state: dict) -> dict:
    """Short training/eval summary for ``source.metrics`` (test accuracy per config and exit)."""
    ev = state.get("eval") or {}
    out: dict[str, Any] = {"model": state.get("model_name"),
                           "dataset": (state.get("dataset") or {}).get("name")}
    for key in ("epochs", "steps", "full_depth_accuracy", "base_accuracy"):
        if key in ev:
            out[key] = ev[key]
    for key in ("epoch", "global_step"):
        if key in state and not isinstance(state[key], Tensor):
            out.setdefault(key, state[key])
    test = ev.get("test") or {}
    if test:
        out["test_accuracy_per_exit"] = {cfg: r.get("accuracy_per_exit") for cfg, r in test.items()
                                         if isinstance(r, dict)}
    out["evaluated"] = bool(ev)
    return json_safe(out)


_SYNTH_KEYS = {"num_classes": "classes", "in_chans": "chans", "img_size": "size", "n_test": "test",
               "seed": "seed", "n_train": "train"}


def load_parity_images(state: dict, count: int, data_root: str | None = None) -> tuple[Tensor, str]:
    """Up to ``count`` validation images (uint8 NCHW) of the checkpoint's dataset, evenly spaced.

    The dataset is reloaded exactly as training loaded it (name, root, val_fraction, split_seed,
    image size); the synthetic dataset is regenerated from its recorded options. Falls back to
    the test split when the validation split is empty.
    """
    from train.data import load_dataset

    info = state.get("dataset") or {}
    cfg = state.get("config") or {}
    name = info.get("name") or cfg.get("data")
    if not name:
        raise UsageError("the checkpoint records no dataset; cannot pick real inputs for the parity check")
    kw = dict(val_fraction=float(info.get("val_fraction", cfg.get("val_fraction", 0.1))),
              split_seed=int(info.get("split_seed", cfg.get("split_seed", 0))))
    if name == "synthetic" and isinstance(info.get("synthetic"), dict):
        opts = info["synthetic"]
        spec = "synthetic:" + ",".join(f"{_SYNTH_KEYS[k]}={int(v)}" for k, v in opts.items() if k in _SYNTH_KEYS)
        what = spec
        args: tuple = (spec,)
    else:
        data = cfg.get("data") or name
        root = data_root or cfg.get("data_root") or info.get("root")
        kw["img_size"] = cfg.get("img_size") or info.get("img_size")
        what, args = data, (data, root)
    try:
        bundle = load_dataset(*args, **kw)
    except FileNotFoundError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"the parity check needs validation images of the checkpoint's dataset "
                                f"{what!r}, which cannot be loaded: {first} (pass --data-root / data_root=)"
                                ) from None
    split, split_name = (bundle.val, "val") if len(bundle.val) else (bundle.test, "test")
    n = len(split)
    if n == 0:
        raise UsageError(f"dataset {what!r} has no validation or test images for the parity check")
    count = max(1, min(count, n))
    idx = torch.linspace(0, n - 1, count).round().long().unique()
    images, _ = split.get_batch(idx)
    return images, f"{bundle.name} {split_name} split, {len(idx)} of {n} images"


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    from train.data import normalize_batch

    return normalize_batch(images, mean, std).float().contiguous()


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------

def _family(model_name: str, model) -> str:
    try:
        from train.models import list_models
        return {m.name: m.family for m in list_models()}.get(model_name) or type(model).__name__
    except Exception:  # noqa: BLE001
        return type(model).__name__


def _check_out(out_dir: Path, overwrite: bool) -> None:
    if os.path.lexists(out_dir) and not overwrite:
        raise UsageError(f"{out_dir}: already exists (pass --force / overwrite=True to replace it)")


def export_model(model, out_dir: str | os.PathLike, *, parity_inputs: Tensor, mean: Sequence[float],
                 std: Sequence[float], class_names: Sequence[str] | None = None,
                 model_name: str | None = None, source: Source | None = None,
                 opset: int = DEFAULT_OPSET, granularity: str = DEFAULT_GRANULARITY,
                 exporter: str = DEFAULT_EXPORTER, parity_note: str = "",
                 overwrite: bool = False, progress: Progress | None = print,
                 annotations: dict | None = None, preprocess: dict | None = None) -> Path:
    """Export ``model`` (any AdaptiveDepthNet) as a portable bundle at ``out_dir``.

    ``parity_inputs``: normalised float NCHW images the parity gate runs on (real data).
    ``preprocess``: how training resized/cropped images of other sizes, recorded as the
    manifest's ``input.raw.preprocess`` (:func:`preprocess_record`; None: model-sized input).
    Raises :class:`export.parity.ParityError` (nothing is written) if any piece or chained exit
    disagrees with torch.
    """
    progress = progress or (lambda _m: None)
    check_opset(opset)
    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    model = model.float().eval()
    S = model.num_stages
    name = model_name or getattr(model, "model_name", type(model).__name__)
    per_path = bool(getattr(model, PATH_MODELS_ATTR, None))
    plan: SegmentPlan = segment_plan(S, granularity,
                                     head_twins=bool(getattr(model, "exit_norm_twins", False)),
                                     per_path=per_path)
    x = parity_inputs.float().contiguous()
    expected = (model.in_chans, model.img_size, model.img_size)
    if tuple(x.shape[1:]) != expected:
        raise ValueError(f"parity inputs have shape {tuple(x.shape[1:])}, {name} expects {expected} "
                         "(C, H, W)")
    t_all = time.perf_counter()
    inputs = piece_inputs(model, plan, x)
    macs = piece_macs_table(plan, _piece_macs(model))
    params = piece_params(model, plan, inputs)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        paths: dict[str, Path] = {}
        infos = {}
        run = ort_runner(paths, threads=1)
        piece_diffs = {}
        for p in plan.pieces:
            t0 = time.perf_counter()
            path = tmp / onnx_relpath(p.id)
            used = export_module(p.module(model), inputs[p.id][:2], path, input_name=p.input_name,
                                 output_names=p.output_names, opset=opset, exporter=exporter)
            info = check_onnx(path, input_names=[p.input_name], output_names=p.output_names,
                              exporter=used)
            paths[p.id], infos[p.id] = path, info
            piece_diffs[p.id] = check_pieces(model, plan, inputs, run, [p.id])[p.id]
            diffs = "  ".join(f"{n} {d:.1e}" for n, d in piece_diffs[p.id].items())
            progress(f"export  {p.id:<28} {(time.perf_counter() - t0) * 1e3:7.0f} ms  opset {info.opset}  "
                     f"{info.size_bytes / 1024:8.1f} KiB  max|onnx-torch| {diffs}")
        t0 = time.perf_counter()
        chain = check_chains(model, plan, x, run)
        worst = max(max(v) for v in chain.values())
        progress(f"parity  {len(chain)} skip configs x {S} exits, chained through onnxruntime on "
                 f"{len(x)} real images: max |logits diff| {worst:.1e} (tolerance 1e-4) "
                 f"[{(time.perf_counter() - t0) * 1e3:.0f} ms]")

        manifest = new_manifest(
            model_name=name, family=_family(name, model), num_classes=model.num_classes,
            params=sum(p.numel() for p in model.parameters()), input_shape=list(expected),
            mean=list(mean), std=list(std), stages=S, tool_version=tool_version(),
            class_names=list(class_names) if class_names is not None else None,
            source=source or Source(), raw=raw_input_spec(preprocess, expected),
            annotations={**(annotations or {}), "export": json_safe({
                "granularity": granularity, "pieces_per_path": per_path, "opset": max(i.opset for i in infos.values()),
                "exporter": sorted({i.exporter for i in infos.values()}),
                "versions": _versions(),
                "parity": {"inputs": parity_note or f"{len(x)} images", "samples": len(x),
                           "logits_atol": 1e-4, "features_rtol": 1e-4,
                           "max_diff_per_piece": piece_diffs, "max_logits_diff_chained": worst},
            })})
        if manifest.input.name != INPUT_NAME:
            raise AssertionError("input name mismatch")
        for p in plan.pieces:
            info = infos[p.id]
            add_piece(manifest, Piece(
                id=p.id, kind=p.kind, stage=p.stage, skip=p.skip, returns_logits=p.returns_logits,
                inputs=[TensorSpec(n, list(s)) for n, s in info.inputs.items()],
                outputs=[TensorSpec(n, list(s)) for n, s in info.outputs.items()],
                macs=int(macs[p.id]), params=int(params[p.id]), prefix=p.prefix))
            add_artifact_file(manifest, tmp, p.id, onnx_relpath(p.id), backend="onnx",
                                       target=PORTABLE_TARGET,
                                       options={"opset": info.opset, "exporter": info.exporter})
        for cfg, segs in plan.execution.items():
            set_execution(manifest, cfg, segs)
        save_manifest(manifest, tmp / MANIFEST_NAME)
        Bundle.open(tmp)  # full verification before the rename
    progress(f"wrote {out_dir} ({len(plan.pieces)} pieces, {len(plan.execution)} skip configs, "
             f"{(time.perf_counter() - t_all):.1f} s)")
    return out_dir


def preprocess_record(dataset_info: dict) -> dict | None:
    """The preprocessing a checkpoint's data set applied to images of other sizes (recorded
    by ``train.data`` for image folders; inferred for image-folder checkpoints that predate
    the record), or None (the data set's images are model-sized)."""
    rec = dataset_info.get("preprocess")
    if isinstance(rec, dict):
        return dict(rec)
    if dataset_info.get("name") == "imagefolder" and dataset_info.get("img_size"):
        from train.data.imagefolder import preprocess_record as folder_record
        return folder_record(int(dataset_info["img_size"]))
    return None


def raw_input_spec(preprocess: dict | None, shape: Sequence[int]) -> RawInputSpec:
    """``input.raw`` of the manifest, with the preprocessing record when there is one."""
    if preprocess is None:
        return RawInputSpec()
    spec = PreprocessSpec(**preprocess)
    if (int(shape[1]), int(shape[2])) != (spec.size, spec.size):
        raise ValueError(f"preprocess size {spec.size} does not match the model input {tuple(shape)}")
    return RawInputSpec(preprocess=spec, note=(
        f"raw input: uint8 HWC image of any size, values 0..255; one of another size than "
        f"{spec.size}x{spec.size} is resized so its shorter side is {spec.size} "
        f"({spec.interpolation}) and {spec.crop}-cropped, as in training (raw.preprocess; "
        f"runtime.preprocess.preprocess_image); the runtime then computes x = (raw / 255 - mean) "
        f"/ std per channel and transposes to CHW"))


def _piece_macs(model) -> dict:
    from train.models.macs import piece_macs
    return piece_macs(model)


def _versions() -> dict:
    import onnx
    import onnxruntime
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
                      opset: int = DEFAULT_OPSET, parity_samples: int = 64, progress: Progress | None = print,
                      granularity: str = DEFAULT_GRANULARITY, exporter: str = DEFAULT_EXPORTER,
                      data_root: str | None = None, overwrite: bool = False,
                      archive: bool = False) -> Path:
    """Checkpoint -> portable bundle directory ``out_dir`` (returned).

    ``archive``: also write ``<out_dir>.tar.gz`` (deterministic, ``runtime.archive.pack_bundle``).
    Raises FileNotFoundError (checkpoint or dataset missing), ValueError (bad arguments,
    existing ``out_dir``) or :class:`export.parity.ParityError`.
    """
    from train.checkpoint import model_from_checkpoint

    progress = progress or (lambda _m: None)
    check_opset(opset)
    if parity_samples < 1:
        raise UsageError(f"parity_samples must be >= 1, got {parity_samples}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    _check_out(out_dir, overwrite)
    if archive:
        _check_out(archive_path(out_dir), overwrite)
    model, state = model_from_checkpoint(checkpoint)
    if state.get("path_norms"):
        attach_path_models(model, state["path_norms"]["stats"])
    info = state.get("dataset") or {}
    mean, std = info.get("mean"), info.get("std")
    if mean is None or std is None:
        raise UsageError(f"{checkpoint}: the checkpoint records no dataset normalisation (mean/std)")
    images, note = load_parity_images(state, parity_samples, data_root)
    progress(f"model {state['model_name']} ({model.num_stages} stages, "
             f"{model.in_chans}x{model.img_size}x{model.img_size}); parity inputs: {note}")
    source = Source(checkpoint_sha256=sha256_file(checkpoint), checkpoint=checkpoint.name,
                    metrics=metrics_summary(state))
    out = export_model(model, out_dir, parity_inputs=normalize(images, mean, std), mean=mean, std=std,
                       class_names=info.get("class_names"), model_name=state["model_name"],
                       source=source, opset=opset, granularity=granularity, exporter=exporter,
                       parity_note=note, overwrite=overwrite, progress=progress,
                       preprocess=preprocess_record(info),
                       annotations={"dataset": json_safe({k: info.get(k) for k in (
                           "name", "num_classes", "img_size", "in_chans", "val_fraction", "split_seed")})})
    if archive:
        write_archive(out, overwrite=overwrite, progress=progress)
    return out


def archive_path(bundle_dir: Path) -> Path:
    return bundle_dir.with_name(bundle_dir.name + ".tar.gz")


def write_archive(bundle_dir: Path, *, overwrite: bool = False, progress: Progress | None = print) -> Path:
    from export.archive import pack_bundle

    out = archive_path(Path(bundle_dir))
    _check_out(out, overwrite)
    pack_bundle(bundle_dir, out)
    if progress:
        progress(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")
    return out
