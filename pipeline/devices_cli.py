"""``pipeline devices``: list and inspect device profiles.

    pipeline devices [--json] [--profile PATH]...      list profiles (table or JSON)
    pipeline devices show NAME [--json] [--profile PATH] [--cc 8.6]
    pipeline devices host [--json]                     this machine's fingerprint
    pipeline devices estimate NAME --macs N --bytes N [--backend B] [--batch N] [--json]

The lead wires it in with ``cli.add_command(devices)``.  User errors (a bad or unknown
profile: ProfileError) are one ``Error:`` line on stderr and a non-zero exit
(pipeline.errors.PipelineGroup); a bug keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import click

from devices import host as _host
from devices.estimate import estimate as _estimate
from devices.profile import Profile
from devices.registry import list_profiles, load_profile, user_profile_dirs
from pipeline.errors import PipelineGroup

__all__ = ["devices"]

_META_KEY = "devices.profile_paths"


def _fail(err: Exception) -> click.ClickException:
    return click.ClickException(" ".join(str(err).split()))


def _split_paths(paths: Iterable[str]) -> tuple[list[Path], list[Path]]:
    files, dirs = [], []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            files.append(p)
        else:
            raise click.ClickException(f"--profile {raw}: no such file or directory")
    return files, dirs


def _user_dirs(dirs: list[Path]) -> list[Path] | None:
    return [*dirs, *user_profile_dirs(None)] if dirs else None


def _paths(ctx: click.Context, extra: Iterable[str] = ()) -> list[str]:
    return [*ctx.meta.get(_META_KEY, ()), *extra]


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _load_all(paths: list[str]) -> list[Profile]:
    files, dirs = _split_paths(paths)
    user_dirs = _user_dirs(dirs)
    profiles = {p.name: p for p in list_profiles(user_dirs)}
    for f in files:
        p = load_profile(str(f), user_dirs)
        profiles[p.name] = p
    return [profiles[n] for n in sorted(profiles)]


@click.group("devices", cls=PipelineGroup, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of full profiles).")
@click.option(
    "--profile",
    "profile_paths",
    multiple=True,
    metavar="PATH",
    help="Extra profile file, or directory of *.toml profiles (repeatable).",
)
@click.pass_context
def devices(ctx: click.Context, as_json: bool, profile_paths: tuple[str, ...]) -> None:
    """List device profiles (name, aliases, arch, backends, latency budget).

    User profiles are read from --profile, $PIPELINE_PROFILE_DIR, or
    ~/.config/adaptive-depth/profiles.
    """
    ctx.meta[_META_KEY] = tuple(profile_paths)
    if ctx.invoked_subcommand is not None:
        return
    profiles = _load_all(list(profile_paths))
    if as_json:
        _echo_json([p.to_dict() for p in profiles])
        return
    rows = [
        [
            p.name,
            ", ".join(p.aliases) or "-",
            p.arch,
            " > ".join(p.backend_order()),
            f"{p.latency_budget_ms:g}",
        ]
        for p in profiles
    ]
    click.echo(_table(rows, ["NAME", "ALIASES", "ARCH", "BACKENDS", "BUDGET_MS"]))


def _resolve_one(name: str | None, paths: list[str], cc: str | None) -> Profile:
    files, dirs = _split_paths(paths)
    user_dirs = _user_dirs(dirs)
    if name is None:
        if len(files) != 1:
            raise click.UsageError("give a profile NAME, or exactly one --profile FILE")
        return load_profile(str(files[0]), user_dirs, compute_capability=cc)
    for f in files:
        p = load_profile(str(f), user_dirs)
        if name.lower() in (p.name, *p.aliases):
            return load_profile(str(f), user_dirs, compute_capability=cc) if cc else p
    return load_profile(name, user_dirs, compute_capability=cc)


def _fmt(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _human(p: Profile) -> str:
    d = p.to_dict()
    compatible = p.is_host_compatible()
    out = [f"{p.name}" + (f"  (aliases: {', '.join(p.aliases)})" if p.aliases else "")]
    if p.description:
        out.append(f"  {p.description}")
    out.append(f"  arch: {p.arch}    latency budget: {p.latency_budget_ms:g} ms")
    out.append(f"  source: {p.source or '-'}" + (f"    extends: {p.extends}" if p.extends else ""))
    out.append(f"  runs on this machine's CPU ISA: {'yes' if compatible else 'no'}")
    for section in ("hardware", "software"):
        items = d.get(section) or {}
        out.append(section)
        if not items:
            out.append("  -")
        for k, v in items.items():
            out.append(f"  {k}: {_fmt(v)}")
    out.append("peak (published numbers; used only for roofline estimates)")
    units = {"gflops": "GFLOP/s", "tops": "TOPS", "gbs": "GB/s"}
    for k, v in d["peak"].items():
        unit = units[k.rsplit("_", 1)[1]]
        out.append(f"  {k}: {_fmt(v)} {unit}")
    out.append("backends (in order of preference)")
    for i, b in enumerate(p.backends, 1):
        out.append(f"  {i}. {b.name}")
        for k, v in b.options.items():
            out.append(f"       {k}: {_fmt(v)}")
    if p.detected:
        out.append("detected at load time")
        for k, v in p.detected.items():
            out.append(f"  {k}: {_fmt(v)}")
    return "\n".join(out)


@devices.command("show")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
@click.option("--profile", "profile_paths", multiple=True, metavar="PATH", help="Profile file or directory (repeatable).")
@click.option("--cc", "--compute-capability", "cc", metavar="CC", help="GPU compute capability for nvidia-gpu, e.g. 8.6 or sm_86.")
@click.pass_context
def show(ctx: click.Context, name: str | None, as_json: bool, profile_paths: tuple[str, ...], cc: str | None) -> None:
    """Show one profile by NAME, alias or path (or the single --profile FILE)."""
    p = _resolve_one(name, _paths(ctx, profile_paths), cc)
    if as_json:
        _echo_json(p.to_dict())
    else:
        click.echo(_human(p))


@devices.command("host")
@click.option("--json", "as_json", is_flag=True, help="Print the fingerprint as JSON.")
def host_cmd(as_json: bool) -> None:
    """Fingerprint of this machine (CPU, ISA, memory, GPUs, runtime versions)."""
    fp = _host.fingerprint()
    fp["suggested_profile"] = _host.guess_profile(fp)
    if as_json:
        _echo_json(fp)
        return
    for k, v in fp.items():
        click.echo(f"{k}: {_fmt(v) if v is not None else '-'}")


@devices.command("estimate")
@click.argument("name")
@click.option("--macs", type=click.IntRange(min=0), required=True, help="Multiply-accumulates per sample.")
@click.option("--bytes", "bytes_moved", type=click.IntRange(min=0), required=True, help="DRAM bytes moved per sample.")
@click.option("--backend", help="Backend (default: the profile's first).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--profile", "profile_paths", multiple=True, metavar="PATH", help="Profile file or directory (repeatable).")
@click.option("--cc", "--compute-capability", "cc", metavar="CC", help="GPU compute capability for nvidia-gpu.")
@click.pass_context
def estimate_cmd(
    ctx: click.Context,
    name: str,
    macs: int,
    bytes_moved: int,
    backend: str | None,
    batch: int,
    as_json: bool,
    profile_paths: tuple[str, ...],
    cc: str | None,
) -> None:
    """Roofline latency ESTIMATE (not a measurement) on profile NAME."""
    p = _resolve_one(name, _paths(ctx, profile_paths), cc)
    try:
        est = _estimate(macs, bytes_moved, p, backend or p.backend_order()[0], batch)
    except ValueError as e:  # devices.estimate refuses the request (no GPU/DLA, unknown backend)
        raise _fail(e) from None
    if as_json:
        _echo_json(est.to_dict())
        return
    click.echo(
        f"ESTIMATED {est.latency_ms:.3f} ms  ({est.profile}, {est.backend} on {est.unit}, {est.precision}, "
        f"batch {est.batch}; {est.bound}-bound: compute {est.compute_ms:.3f} ms, memory {est.memory_ms:.3f} ms, "
        f"overhead {est.overhead_ms:.3f} ms)"
    )
    for a in est.assumptions:
        click.echo(f"  assumption: {a}")
