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
def compile_cmd(bundle: Path, device: str, backends: tuple[str, ...], tune_trials: int, out: Path | None,
                archive: bool, force: bool) -> None:
    """Compile a portable bundle for a device profile (ONNX Runtime, TVM, TensorRT plans)."""
    from devices import load_profile
    from export.compile import compile_bundle
    from export.onnx_export import ExportError

    profile = load_profile(device)
    try:
        compile_bundle(bundle, profile, backends=list(backends) or None, out_dir=out,
                       tune_trials=tune_trials, progress=_echo, overwrite=force, archive=archive)
    except (ExportError, ImportError) as exc:
        raise click.ClickException(_one_line(exc)) from None


@click.command("engines")
@click.option("--bundle", "-b", required=True, type=click.Path(path_type=Path),
              help="Device bundle compiled with the tensorrt backend.")
@click.option("--force", is_flag=True, help="Rebuild engines that are up to date.")
def engines_cmd(bundle: Path, force: bool) -> None:
    """Build the TensorRT engines of a device bundle (run this on the device itself)."""
    from export.tensorrt import TensorRTError, build_bundle_engines
    from runtime.bundle import Bundle
    from runtime.errors import UsageError

    b = Bundle.open(bundle)
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
        pieces.append((piece.id, b.resolve(art.file)))
    if not pieces:
        raise UsageError(f"{b.manifest_path}: no tensorrt artifacts in this bundle "
                         "(compile it with `pipeline compile --bundle B --device P --backend tensorrt`)")
    try:
        built = build_bundle_engines(b.root, options, pieces, force=force, log=_echo)
    except (TensorRTError, ImportError) as exc:
        raise click.ClickException(_one_line(exc)) from None
    n_built = sum(1 for e in built if e.built)
    click.echo(f"{len(built)} engines ready in {b.root / 'engines'} ({n_built} built, "
               f"{len(built) - n_built} up to date)")
