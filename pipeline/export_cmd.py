"""`pipeline export`, `pipeline compile`, `pipeline engines`: checkpoint -> bundles -> device."""
from __future__ import annotations

from pathlib import Path

import click

BACKEND_CHOICES = ("onnxruntime", "tvm", "tensorrt")


def _echo(message: str) -> None:
    click.echo(message)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


@click.command("export")
@click.option("--checkpoint", "-c", required=True, type=click.Path(path_type=Path),
              help="Checkpoint written by `pipeline train` (model.pt / final checkpoint).")
@click.option("--out", "-o", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write (must not exist unless --force).")
@click.option("--opset", type=click.IntRange(min=17), default=17, show_default=True,
              help="ONNX opset (>= 17).")
@click.option("--archive", is_flag=True, help="Also write OUT.tar.gz (deterministic).")
@click.option("--granularity", type=click.Choice(["stage", "split"]), default="stage", show_default=True,
              help="Pieces per stage: 'stage' (one per stage variant, head included; measured faster) "
                   "or 'split' (mandatory / twin-norm mandatory / skippable / head).")
@click.option("--parity-samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Validation images the parity gate runs on.")
@click.option("--data-root", default=None, help="Where the checkpoint's dataset lives, if not where "
                                                  "training found it.")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript",
              show_default=True, help="torch.onnx exporter.")
@click.option("--force", is_flag=True, help="Replace an existing OUT (and OUT.tar.gz).")
def export_cmd(checkpoint: Path, out: Path, opset: int, archive: bool, granularity: str,
               parity_samples: int, data_root: str | None, exporter: str, force: bool) -> None:
    """Export a checkpoint as a portable bundle (ONNX pieces for every skip config)."""
    from export.onnx_export import ExportError
    from export.portable import export_checkpoint

    try:
        export_checkpoint(checkpoint, out, opset=opset, parity_samples=parity_samples, progress=_echo,
                          granularity=granularity, exporter=exporter, data_root=data_root,
                          overwrite=force, archive=archive)
    except ExportError as exc:
        raise click.ClickException(_one_line(exc)) from None


@click.command("compile")
@click.option("--bundle", "-b", required=True, type=click.Path(path_type=Path),
              help="Portable bundle directory (or .tar.gz) from `pipeline export`.")
@click.option("--device", "-d", required=True, help="Device profile name, alias or .toml path "
                                                     "(see `pipeline devices`).")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKEND_CHOICES),
              help="Compile only this backend (repeatable). Default: every backend of the profile "
                   "that can be compiled here, in profile order.")
@click.option("--tune-trials", type=click.IntRange(min=0), default=0, show_default=True,
              help="TVM MetaSchedule trials per piece (0: untuned, far slower than ONNX Runtime).")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Device bundle directory (default: <BUNDLE>-<device> next to BUNDLE).")
@click.option("--archive", is_flag=True, help="Also write OUT.tar.gz (deterministic).")
@click.option("--force", is_flag=True, help="Replace an existing OUT (and OUT.tar.gz).")
@click.option("--trt-precision", type=click.Choice(["fp32", "fp16", "best"]), default=None,
              help="Override the profile's tensorrt precision (fp16 on TensorRT 11: the engines "
                   "command converts the ONNX with ModelOpt AutoCast on the device).")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default=None,
              help="Piece precision (default: the profile's, fp32 unless it says int8). int8: "
                   "static QDQ per piece, kept only where it measures faster and keeps accuracy.")
@click.option("--calib-npz", type=click.Path(path_type=Path), default=None,
              help="int8: calibration images (calib.npz written by `pipeline build`, or any .npz "
                   "with uint8 images); default: calib.npz beside BUNDLE, else --checkpoint's data.")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), default=None,
              help="int8 without a calib.npz: take validation images of this checkpoint's data set.")
@click.option("--data-root", default=None, help="int8 with --checkpoint: where its data set lives.")
@click.option("--calib-images", type=click.IntRange(min=17), default=768, show_default=True,
              help="int8: images used (the first 256 calibrate, the rest judge agreement).")
@click.option("--min-speedup", type=click.FloatRange(min=0, min_open=True), default=None,
              help="int8: a piece stays int8 only if this many times faster than fp32 [1.05].")
@click.option("--max-agreement-drop", type=click.FloatRange(min=0, max=1, max_open=True),
              default=None, help="int8: largest drop of exit argmax agreement with fp32 [0.02].")
def compile_cmd(bundle: Path, device: str, backends: tuple[str, ...], tune_trials: int, out: Path | None,
                archive: bool, force: bool, trt_precision: str | None, precision: str | None,
                calib_npz: Path | None,
                checkpoint: Path | None, data_root: str | None, calib_images: int,
                min_speedup: float | None, max_agreement_drop: float | None) -> None:
    """Compile a portable bundle for a device profile (ONNX Runtime, TVM, TensorRT plans)."""
    from devices import load_profile
    from export.compile import compile_bundle
    from export.onnx_export import ExportError

    profile = load_profile(device)
    if trt_precision is not None:
        profile = with_tensorrt_precision(profile, trt_precision)
    precision = precision or profile.precision
    images = None
    qopts = {k: v for k, v in (("min_speedup", min_speedup),
                               ("max_agreement_drop", max_agreement_drop)) if v is not None}
    if precision == "int8":
        images = int8_calibration_images(bundle, calib_npz, checkpoint, data_root, calib_images)
    try:
        compile_bundle(bundle, profile, backends=list(backends) or None, out_dir=out,
                       tune_trials=tune_trials, progress=_echo, overwrite=force, archive=archive,
                       precision=precision, calib_images=images, quantize_options=qopts)
    except (ExportError, ImportError) as exc:
        raise click.ClickException(_one_line(exc)) from None


def with_tensorrt_precision(profile, precision: str):
    """``profile`` with its tensorrt backend's ``precision`` replaced (validated again, so a DLA
    profile still refuses fp32)."""
    from devices.profile import validate_profile
    from runtime.errors import UsageError

    if profile.backend("tensorrt") is None:
        raise UsageError(f"--trt-precision: profile {profile.name!r} has no tensorrt backend")
    raw = profile.to_dict()
    for b in raw["backends"]:
        if b["name"] == "tensorrt":
            b["options"]["precision"] = precision
    return validate_profile(raw, profile.source)


def int8_calibration_images(bundle: Path, npz: Path | None, checkpoint: Path | None,
                            data_root: str | None, count: int):
    """Validation images for INT8 calibration: ``npz`` (a calib.npz), else calib.npz beside
    the bundle, else ``count`` validation images of ``checkpoint``'s data set (float32 NCHW,
    normalised with the checkpoint's mean/std)."""
    from pipeline.calib_set import default_calib_candidates, load_calib_set
    from runtime.errors import UsageError

    if npz is None and checkpoint is None:
        npz = next((c for c in default_calib_candidates(bundle) if c.is_file()), None)
        if npz is None:
            raise UsageError(
                f"--precision int8 needs validation images to calibrate on: pass --calib-npz FILE "
                f"(the build writes calib.npz beside the bundle; looked for "
                f"{', '.join(str(c) for c in default_calib_candidates(bundle))}) or --checkpoint C "
                "(its data set's validation split)")
    if npz is not None:
        found = load_calib_set(npz)
        if found.images is None or len(found.images) < 17:
            raise UsageError(f"{found.path}: --precision int8 needs at least 17 images")
        _echo(f"int8    calibration images: {found.path} ({min(count, len(found.images))} images)")
        return found.images[:count]
    from export.portable import load_parity_images, normalize
    from train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    images, what = load_parity_images(state, count, data_root)
    _echo(f"int8    calibration images: {what}")
    ds = state.get("dataset") or {}
    mean, std = ds.get("mean"), ds.get("std")
    if mean is None or std is None:
        raise UsageError(f"{checkpoint}: records no normalisation mean/std; pass --calib-npz")
    return normalize(images, mean, std).numpy()


def engine_pieces(b) -> tuple[dict, list[tuple[str, Path, dict]]]:
    """(profile tensorrt options, [(piece id, ONNX path, build options)]) of a device bundle:
    what `pipeline engines` passes to ``build_bundle_engines``. An int8 piece's tensorrt
    artifact is its QDQ ONNX with ``precision: "int8"``, so it builds at that precision."""
    from runtime.errors import UsageError

    pieces, options = [], None
    for piece in b.manifest.pieces:
        found = piece.find_artifacts("tensorrt")
        if not found:
            continue
        art = found[0]
        opts = art.options.get("profile_options")
        if not isinstance(opts, dict):
            raise UsageError(f"{b.manifest_path}: piece {piece.id!r}: tensorrt artifact has no "
                             "profile_options (recompile with `pipeline compile --backend tensorrt`)")
        if options is None:
            options = opts
        elif opts != options:
            raise UsageError(f"{b.manifest_path}: tensorrt options differ between pieces")
        precision = art.options.get("precision", opts.get("precision"))
        pieces.append((piece.id, b.resolve(art.file), {**opts, "precision": precision}))
    if not pieces:
        raise UsageError(f"{b.manifest_path}: no tensorrt artifacts in this bundle "
                         "(compile it with `pipeline compile --bundle B --device P --backend tensorrt`)")
    return options, pieces


@click.command("engines")
@click.option("--bundle", "-b", required=True, type=click.Path(path_type=Path),
              help="Device bundle compiled with the tensorrt backend.")
@click.option("--force", is_flag=True, help="Rebuild engines that are up to date.")
def engines_cmd(bundle: Path, force: bool) -> None:
    """Build the TensorRT engines of a device bundle (run this on the device itself)."""
    from export.tensorrt import TensorRTError, build_bundle_engines, convert_onnx_to_fp16
    from runtime.bundle import Bundle

    b = Bundle.open(bundle)
    options, pieces = engine_pieces(b)
    try:
        # fp16 on TensorRT >= 11 with an FP32 ONNX: ModelOpt AutoCast before the build (the
        # plan says so: onnx_conversion = "fp16"); never called for TensorRT 10 plans
        built = build_bundle_engines(b.root, options, pieces, force=force, log=_echo,
                                     fp16_converter=convert_onnx_to_fp16)
    except (TensorRTError, ImportError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    n_built = sum(1 for e in built if e.built)
    click.echo(f"{len(built)} engines ready in {b.root / 'engines'} ({n_built} built, "
               f"{len(built) - n_built} up to date)")
