"""`pipeline profile`: measure a bundle's latency here, or estimate it for another device.

    pipeline profile --bundle B [--backend onnxruntime] [--batch 1,8,32] [--device NAME]
                     [--quick] [--plot PATH | --no-plot] [--no-write]
    pipeline profile --bundle B --estimate-only --device jetson-orin-nano [--backend tensorrt]

Measured tables are recorded in the bundle's manifest (kind "measured", with this machine's
fingerprint) under the bundle's device profile when this machine is one, else under the
detected host profile; estimates (kind "estimated") under --device. Errors are one line.
See docs/profiling.md.
"""
from __future__ import annotations

from pathlib import Path

import click

from runtime.backends import BACKENDS
from runtime.errors import UsageError

__all__ = ["profile", "parse_batches"]


def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (ValueError for anything but positive integers)."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) < 1:
            raise UsageError(f"--batch: expected comma-separated integers >= 1, got {text!r}")
        if int(part) not in out:
            out.append(int(part))
    if not out:
        raise UsageError(f"--batch: expected comma-separated integers >= 1, got {text!r}")
    return out


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


def _err(message: str) -> None:
    click.echo(message, err=True)


@click.command("profile")
@click.option("--bundle", "-b", "bundle_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle directory (device bundle from `pipeline compile`, or a portable one).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Backend to measure/estimate. Default: measure the first of the device "
                   "profile's backends that the bundle has and that runs here; estimate every "
                   "backend of the profile.")
@click.option("--target", default=None, help="Artifact target, when the bundle has several for "
                                             "the backend.")
@click.option("--batch", "batch_spec", default="1", show_default=True, metavar="N[,N...]",
              help="Batch sizes, comma-separated (e.g. 1,8,32); one latency table each.")
@click.option("--device", "-d", default=None,
              help="Device profile to record under. Measuring: must be this machine (default: "
                   "the bundle's device if this machine is one, else the detected host profile). "
                   "With --estimate-only: any profile (default: the bundle's device).")
@click.option("--estimate-only", is_flag=True,
              help="Do not measure: roofline estimates from MACs, bytes and the profile's peak "
                   "numbers, recorded as 'estimated'.")
@click.option("--quick", is_flag=True, help="Short warm-up and few iterations (smoke tests): "
                                            "rough percentiles.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), default=None,
              help="PNG to write (default: <bundle>.latency.png next to the bundle).")
@click.option("--no-plot", is_flag=True, help="Write no PNG.")
@click.option("--no-write", is_flag=True, help="Print only; leave the manifest unchanged.")
def profile(bundle_dir: Path, backend: str | None, target: str | None, batch_spec: str,
            device: str | None, estimate_only: bool, quick: bool, plot_path: Path | None,
            no_plot: bool, no_write: bool) -> None:
    """Measure every piece and every exit of every skip config of a bundle on this machine
    (p50/p90/p95/p99), or estimate them for a device not at hand, and record the table in
    the bundle's manifest."""
    from devices.profile import ProfileError
    from runtime.errors import BundleError

    try:
        batches = parse_batches(batch_spec)
    except ValueError as exc:
        raise click.BadParameter(str(exc).split(": ", 1)[-1], param_hint="--batch") from None
    if plot_path is not None and no_plot:
        raise click.UsageError("--plot and --no-plot exclude each other")
    try:
        if estimate_only:
            if quick:
                raise click.UsageError("--quick applies to measuring, not to --estimate-only")
            _estimate(bundle_dir, backend, target, batches, device, plot_path, no_plot, no_write)
        else:
            _measure(bundle_dir, backend, target, batches, device, quick, plot_path, no_plot,
                     no_write)
    except (BundleError, ProfileError, ValueError, LookupError, OSError) as exc:
        raise click.ClickException(_one_line(exc)) from None


def _measure(bundle_dir, backend, target, batches, device, quick, plot_path, no_plot, no_write):
    from devices.latency import write_latency
    from devices.profiler import profile_bundle
    from runtime.bundle import Bundle

    result = profile_bundle(bundle_dir, backend=backend, batches=batches, device=device,
                            quick=quick, progress=_err, target=target)
    click.echo(result.to_text(), nl=False)
    groups = [(result.device, result.backend, b) for b in result.batches]
    if no_write:
        manifest = Bundle.open(bundle_dir, verify=False).manifest.copy()
        manifest.replace_latency(result.entries)
        click.echo("not written (--no-write)")
    else:
        path = write_latency(bundle_dir, result.entries)
        manifest = Bundle.open(bundle_dir, verify=False).manifest
        click.echo(f"wrote {len(result.entries)} measured latency entries "
                   f"({result.device}/{result.backend}, batch {', '.join(map(str, batches))}) "
                   f"to {path}")
    _compare(manifest, groups)
    _plot(manifest, bundle_dir, groups, plot_path, no_plot)


def _estimate(bundle_dir, backend, target, batches, device, plot_path, no_plot, no_write):
    from devices.latency import estimate_entries, group_text, write_latency
    from devices.registry import load_profile
    from runtime.bundle import Bundle

    b = Bundle.open(bundle_dir, verify=False)
    name = device or b.manifest.device
    if name is None:
        raise UsageError(f"{b.manifest_path}: the bundle names no device; pass --device NAME "
                         "with --estimate-only")
    prof = load_profile(name)
    backends = [backend] if backend else prof.backend_order()
    entries = []
    for be in backends:
        entries += estimate_entries(b.manifest, prof, backend=be, batches=batches, target=target)
    manifest = b.manifest.copy()
    manifest.replace_latency(entries)  # same checks as writing (kinds, downgrade)
    groups = [(prof.name, be, n) for be in backends for n in batches]
    for g in groups:
        click.echo(group_text(manifest, *g))
        click.echo("")
    if no_write:
        click.echo("not written (--no-write)")
    else:
        path = write_latency(bundle_dir, entries)
        manifest = Bundle.open(bundle_dir, verify=False).manifest
        click.echo(f"wrote {len(entries)} ESTIMATED latency entries ({prof.name}: "
                   f"{', '.join(backends)}; batch {', '.join(map(str, batches))}) to {path}")
    _compare(manifest, groups)
    _plot(manifest, bundle_dir, groups, plot_path, no_plot)


def _compare(manifest, groups) -> None:
    """Side by side with the bundle's other tables of the same batch sizes, if any."""
    from devices.latency import latency_groups, side_by_side_text

    mine = set(groups)
    for batch in sorted({g[2] for g in groups}):
        others = [(d, be, n) for d, be, n, _k in latency_groups(manifest)
                  if n == batch and (d, be, n) not in mine]
        if others:
            cols = [g for g in groups if g[2] == batch] + others
            click.echo(f"batch {batch}: cumulative p50 next to the bundle's other latency tables")
            click.echo(side_by_side_text(manifest, cols))


def _plot(manifest, bundle_dir: Path, groups, plot_path: Path | None, no_plot: bool) -> None:
    if no_plot:
        return
    from devices.plots import default_plot_path, plot_latency

    path = plot_path or default_plot_path(bundle_dir)
    root = Path(bundle_dir).resolve()
    try:
        inside = root in Path(path).resolve().parents
    except OSError:
        inside = False
    if inside:
        _err(f"note: {path} is inside the bundle; the manifest does not list it, so it is not "
             "verified and pack_bundle ships it along")
    try:
        written = plot_latency(manifest, path, groups)
    except ImportError as exc:
        _err(f"note: no plot ({exc}); install matplotlib or pass --no-plot")
        return
    click.echo(f"plot: {written}")
