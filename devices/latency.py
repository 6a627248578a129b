"""Latency tables: statistics, LatencyEntry records, roofline estimate tables, lookups.

This module turns timing samples (from :mod:`devices.profiler`) and roofline estimates
(:mod:`devices.estimate`) into :class:`runtime.manifest.LatencyEntry` records, writes them
into a bundle's manifest, and reads them back (the readers ``cumulative_table``,
``segment_costs_ms``, ``latency_groups`` and ``STATS`` live in :mod:`runtime.latency`, the one
implementation the runtime uses too, and are re-exported here)::

    from devices.latency import estimate_bundle, write_latency, segment_costs_ms

    entries = estimate_bundle("b-jetson", "jetson-orin-nano", backend="tensorrt")
    write_latency("b-jetson", entries)               # kind "estimated"
    segment_costs_ms(manifest, "jetson-orin-nano", "tensorrt", "FTF")   # [ms per segment]

Rules kept here (and by ``Manifest.replace_latency``):

* a (device, backend, batch) group is all ``measured`` or all ``estimated``, never mixed;
* measured replaces estimated; estimated never replaces measured (unless
  ``allow_downgrade=True``);
* a measured entry is only written under a profile of the architecture it was measured on,
  and only while the artifact it measured is still the one in the bundle.

Imports: module level is stdlib + ``runtime.manifest`` / ``runtime.bundle`` /
``runtime.latency`` only (no numpy), so on-device code may import it; the estimate helpers
import ``devices.estimate`` / ``devices.registry`` (stdlib too) lazily.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from runtime.manifest import (DYNAMIC_DIM, MANIFEST_NAME, LatencyEntry, Manifest, Piece,
                              TensorSpec, save_manifest, utc_now_iso)
# the canonical latency-table readers, re-exported (see runtime/latency.py)
from runtime.latency import (STATS, check_stat, cumulative_table, latency_groups,
                             segment_costs_ms, select_group)
from runtime.errors import UsageError

__all__ = [
    "STATS",
    "Stats",
    "summarize",
    "quantile",
    "p95_relative_se",
    "measured_entry",
    "tensor_elements",
    "piece_bytes",
    "estimate_entries",
    "estimate_bundle",
    "write_latency",
    "latency_groups",
    "cumulative_table",
    "segment_costs_ms",
    "group_text",
    "side_by_side_text",
]

#: Target recorded for estimates of a backend the bundle has no artifact of (for this device).
ROOFLINE_TARGET = "roofline"


# ----------------------------------------------------------------------------------------
# statistics (stdlib only; the profiler hands in lists of milliseconds)
# ----------------------------------------------------------------------------------------

def quantile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of already *sorted* values, linear interpolation between
    order statistics (numpy's default "linear" method, Hyndman & Fan type 7)."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("quantile of no samples")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    pos = (n - 1) * q
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def p95_relative_se(sorted_values: Sequence[float], q: float = 0.95) -> float:
    """Relative standard error of the sample ``q`` quantile, distribution-free.

    The rank of the true quantile among n samples is Binomial(n, q): one standard error
    is ``sqrt(n q (1-q))`` ranks. Half the spread between the order statistics that far
    below and above ``n q`` estimates the quantile's standard error; divided by the
    quantile it is the relative error the profiler's stopping rule uses.
    ``inf`` with fewer than 2 samples; 0 for constant samples.
    """
    n = len(sorted_values)
    if n < 2:
        return math.inf
    center = q * (n - 1)
    half = math.sqrt(n * q * (1.0 - q))
    lo = max(0, int(math.floor(center - half)))
    hi = min(n - 1, int(math.ceil(center + half)))
    value = quantile(sorted_values, q)
    spread = (sorted_values[hi] - sorted_values[lo]) / 2.0
    if spread <= 0.0:
        return 0.0
    return spread / value if value > 0 else math.inf


@dataclass(frozen=True)
class Stats:
    """Summary of one latency distribution (milliseconds)."""
    n: int
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    std: float
    p95_rse: float  # relative standard error of p95 (see p95_relative_se)

    def get(self, stat: str) -> float:
        return float(getattr(self, check_stat(stat)))

    def entry_fields(self) -> dict[str, float]:
        """The p50_ms..mean_ms keyword arguments of a LatencyEntry."""
        return {"p50_ms": self.p50, "p90_ms": self.p90, "p95_ms": self.p95,
                "p99_ms": self.p99, "mean_ms": self.mean}


def summarize(samples_ms: Iterable[float]) -> Stats:
    """Percentiles (linear interpolation), mean, std and the p95's relative standard error."""
    xs = sorted(float(x) for x in samples_ms)
    if not xs:
        raise ValueError("no samples")
    if any(not math.isfinite(x) or x < 0 for x in xs):
        raise ValueError("latency samples must be finite and >= 0")
    n = len(xs)
    mean = math.fsum(xs) / n
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    p = [quantile(xs, q) for q in (0.50, 0.90, 0.95, 0.99)]
    for i in range(1, 4):  # guard against float round-off breaking monotonicity
        p[i] = max(p[i], p[i - 1])
    return Stats(n=n, p50=p[0], p90=p[1], p95=p[2], p99=p[3], mean=mean,
                 std=math.sqrt(var), p95_rse=p95_relative_se(xs))


# ----------------------------------------------------------------------------------------
# entries
# ----------------------------------------------------------------------------------------

def measured_entry(stats: Stats, *, device: str, backend: str, target: str, batch: int,
                   fingerprint: Mapping[str, Any], piece: Optional[str] = None,
                   exit: Optional[int] = None, skip_config: Optional[str] = None,
                   created: Optional[str] = None) -> LatencyEntry:
    """A ``measured`` LatencyEntry for a piece or for (exit, skip_config)."""
    if not fingerprint:
        raise ValueError("a measured entry needs a non-empty fingerprint")
    return LatencyEntry(device=device, backend=backend, target=target, batch=int(batch),
                        kind="measured", created=created or utc_now_iso(), piece=piece,
                        exit=exit, skip_config=skip_config, fingerprint=dict(fingerprint),
                        **stats.entry_fields())


def tensor_elements(spec: TensorSpec) -> int:
    """Elements of one sample of a tensor: the dynamic batch dim ("N" / -1) counts as 1."""
    n = 1
    for d in spec.shape:
        if d == DYNAMIC_DIM or d == -1:
            continue
        n *= int(d)
    return n


_DTYPE_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}


def piece_bytes(piece: Piece, dtype_bytes: int = 4) -> tuple[int, int]:
    """(bytes moved per sample, of which weights) for a piece: its parameters once, plus
    its input and output tensors once each (from the TensorSpecs).

    Intermediate activations inside the piece are not known from the manifest and are
    not counted, so this is a lower bound on DRAM traffic.
    """
    from devices.estimate import estimate_bytes_moved

    ins = sum(tensor_elements(t) for t in piece.inputs)
    outs = sum(tensor_elements(t) for t in piece.outputs)
    total = estimate_bytes_moved(piece.params, 0, dtype_bytes=dtype_bytes,
                                 input_elements=ins, output_elements=outs)
    return total, int(piece.params) * dtype_bytes


def _estimate_precision(profile, backend: str) -> str:
    spec = profile.backend(backend)
    if backend == "tensorrt" and spec is not None:
        p = spec.get("precision", "fp16")
        return "int8" if p in ("int8", "best") else p
    return "fp32"


def _estimate_target(manifest: Manifest, profile_name: str, backend: str) -> str:
    """The bundle's artifact target for ``backend`` when the bundle was compiled for this
    very profile; otherwise ``"roofline"`` (no artifact describes that device)."""
    if manifest.device == profile_name:
        targets = sorted({t for b, t in manifest.available_targets() if b == backend})
        if targets:
            return targets[0]
    return ROOFLINE_TARGET


def _used_pieces(manifest: Manifest) -> list[Piece]:
    used = {pid for segs in manifest.execution.values() for seg in segs for pid in seg}
    return [p for p in manifest.pieces if p.id in used]


def estimate_entries(manifest: Manifest, profile, *, backend: str, batches: Iterable[int] = (1,),
                     target: Optional[str] = None,
                     created: Optional[str] = None) -> list[LatencyEntry]:
    """Roofline ``estimated`` entries for every used piece and every (skip config, exit).

    ``profile``: a :class:`devices.Profile` or a profile name/alias/path. Per piece:
    ``devices.estimate.estimate(macs, bytes, profile, backend, batch, shared_bytes=weights)``
    with bytes from :func:`piece_bytes` (weights in the backend's precision). Cumulative to
    exit k = sum of the estimates of the pieces of segments 0..k (the runtime's own
    overhead is not modelled beyond the roofline's per-call overhead). An estimate is one
    number: p50 = p90 = p95 = p99 = mean.
    """
    from devices.estimate import estimate
    from devices.registry import load_profile

    if isinstance(profile, (str, os.PathLike)):
        profile = load_profile(profile)
    batches = _check_batches(batches)
    precision = _estimate_precision(profile, backend)
    dtype_bytes = _DTYPE_BYTES[precision]
    tgt = target or _estimate_target(manifest, profile.name, backend)
    created = created or utc_now_iso()
    entries: list[LatencyEntry] = []
    for b in batches:
        per_piece: dict[str, float] = {}
        for p in _used_pieces(manifest):
            moved, shared = piece_bytes(p, dtype_bytes)
            est = estimate(p.macs, moved, profile, backend, b, shared_bytes=shared,
                           precision=precision)
            per_piece[p.id] = est.latency_ms
            fp = {"method": "roofline", "profile": profile.name, "profile_source": profile.source,
                  "unit": est.unit, "precision": est.precision, "bound": est.bound,
                  "macs": est.macs, "bytes_moved": est.bytes_moved, "weight_bytes": shared,
                  "peak_gflops": est.peak_gflops, "bandwidth_gbs": est.bandwidth_gbs,
                  "compute_ms": est.compute_ms, "memory_ms": est.memory_ms,
                  "overhead_ms": est.overhead_ms, "assumptions": list(est.assumptions)
                  + ["bytes: weights + piece input/output tensors; intermediate activations "
                     "not counted (unknown from the manifest)"]}
            entries.append(_estimated(est.latency_ms, profile.name, backend, tgt, b, created,
                                      fp, piece=p.id))
        for cfg in manifest.skip_configs:
            total = 0.0
            for k, seg in enumerate(manifest.execution[cfg]):
                total += sum(per_piece[pid] for pid in seg)
                fp = {"method": "roofline", "profile": profile.name,
                      "cumulative": "sum of the piece estimates of segments 0..exit",
                      "pieces": [pid for s in manifest.execution[cfg][: k + 1] for pid in s]}
                entries.append(_estimated(total, profile.name, backend, tgt, b, created, fp,
                                          exit=k, skip_config=cfg))
    return entries


def _estimated(ms: float, device: str, backend: str, target: str, batch: int, created: str,
               fp: dict, **where) -> LatencyEntry:
    ms = float(ms)
    return LatencyEntry(device=device, backend=backend, target=target, batch=batch,
                        p50_ms=ms, p90_ms=ms, p95_ms=ms, p99_ms=ms, mean_ms=ms,
                        kind="estimated", created=created, fingerprint=fp, **where)


def _check_batches(batches: Iterable[int]) -> list[int]:
    out = []
    for b in batches:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be integers >= 1, got {b!r}")
        if b not in out:
            out.append(b)
    if not out:
        raise ValueError("no batch sizes given")
    return out


def estimate_bundle(bundle_dir: os.PathLike | str, profile, *, backend: str,
                    batches: Iterable[int] = (1,)) -> list[LatencyEntry]:
    """:func:`estimate_entries` for the bundle at ``bundle_dir`` (its artifacts are not
    needed, only the manifest's MACs, parameters and tensor shapes). Nothing is written."""
    from runtime.bundle import Bundle

    b = Bundle.open(bundle_dir, verify=False)
    return estimate_entries(b.manifest, profile, backend=backend, batches=batches)


# ----------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------

def _artifact_sha(manifest: Manifest, piece_id: str, backend: str, target: str) -> Optional[str]:
    try:
        piece = manifest.piece(piece_id)
    except KeyError:
        return None
    for b in (backend, "onnx"):
        for a in piece.find_artifacts(b, target):
            return a.sha256
    return None


def _check_measured(manifest: Manifest, entries: list[LatencyEntry], where: str) -> None:
    """Refuse measured entries that belong to another architecture or to stale artifacts."""
    from devices.profile import ProfileError
    from devices.registry import load_profile

    arches: dict[str, Optional[str]] = {}
    for e in entries:
        if e.kind != "measured":
            continue
        fp = e.fingerprint or {}
        if e.device not in arches:
            try:
                arches[e.device] = load_profile(e.device).arch
            except ProfileError:
                arches[e.device] = None  # a profile unknown here: nothing to check against
        arch, got = arches[e.device], fp.get("arch")
        if arch is not None and got is not None and arch != got:
            raise UsageError(f"{where}: refusing to record latency measured on a {got} machine "
                             f"under device profile {e.device!r}, which is {arch}")
        want = (fp.get("measurement") or {}).get("artifact_sha256")
        if e.piece is not None and want:
            have = _artifact_sha(manifest, e.piece, e.backend, e.target)
            if have != want:
                raise UsageError(f"{where}: piece {e.piece!r} ({e.backend}/{e.target}) changed "
                                 "since it was measured (artifact sha256 differs); profile again")


def write_latency(bundle_dir: os.PathLike | str, entries: Iterable[LatencyEntry], *,
                  allow_downgrade: bool = False) -> Path:
    """Install ``entries`` into the bundle's manifest (atomically) and return its path.

    Every (device, backend, batch) group in ``entries`` replaces that group wholesale
    (``Manifest.replace_latency``): measured replaces estimated; estimated never replaces
    measured unless ``allow_downgrade``; one group never mixes kinds (ManifestError, and
    nothing is written). Measured entries must come from a machine of the profile's
    architecture and match the bundle's current artifacts (ValueError otherwise). Only
    ``manifest.json`` changes, so the artifacts' checksums still verify.
    """
    from runtime.bundle import Bundle

    entries = list(entries)
    b = Bundle.open(bundle_dir, verify=False)  # re-read now: keep concurrent edits
    m = b.manifest.copy()
    _check_measured(m, entries, str(b.manifest_path))
    m.replace_latency(entries, allow_downgrade=allow_downgrade)
    return save_manifest(m, b.root / MANIFEST_NAME)


# ----------------------------------------------------------------------------------------
# text tables
# ----------------------------------------------------------------------------------------

def _fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _render(rows: list[list[str]], header: list[str], right_from: int = 1) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        cells = [c.rjust(w) if i >= right_from else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join(line(r) for r in [header, *rows])


def _kind_label(kind: str) -> str:
    return "MEASURED" if kind == "measured" else "ESTIMATED (roofline)"


def group_text(manifest: Manifest, device: str, backend: str, batch: int = 1, *,
               target: Optional[str] = None) -> str:
    """A latency group of the manifest as text: pieces, then cumulative per exit."""
    group = select_group(manifest, device, backend, batch, target=target)
    kind, target = group.kind, group.target
    out = [f"{_kind_label(kind)} latency  {manifest.model.name}  device {device}  "
           f"backend {backend} ({target})  batch {batch}"]
    # an estimate is one number (every percentile field holds it): show it once
    stats = STATS if kind == "measured" else ("p50",)
    heads = [f"{s} ms" for s in stats] if kind == "measured" else ["estimate ms"]
    pieces = [e for e in group.entries if e.piece is not None]
    if pieces:
        rows = [[e.piece, *(_fmt_ms(getattr(e, f"{s}_ms")) for s in stats)] for e in pieces]
        out.append(_render(rows, ["piece", *heads]))
    table = cumulative_table(manifest, device, backend, batch, target=target, stats=stats)
    rows = [[cfg, str(k), *(_fmt_ms(r[s]) for s in stats)]
            for cfg, rs in table.items() for k, r in enumerate(rs)]
    out.append("cumulative to exit")
    out.append(_render(rows, ["config", "exit", *heads], right_from=1))
    return "\n".join(out)


def side_by_side_text(manifest: Manifest, groups: Sequence[tuple[str, str, int]], *,
                      stat: str = "p50") -> str:
    """Cumulative ``stat`` per (skip config, exit), one column per (device, backend, batch)
    group, headed by the device/backend and MEASURED or ESTIMATED."""
    one_batch = len({g[2] for g in groups}) == 1
    top, sub, tables = ["", ""], ["config", "exit"], []
    for device, backend, batch in groups:
        kind = manifest.latency_kind(device, backend, batch)
        tables.append(cumulative_table(manifest, device, backend, batch, stats=(stat,)))
        top.append(f"{device} {backend}" + ("" if one_batch else f" b{batch}"))
        sub.append(f"{(kind or '?').upper()} {stat} ms")
    rows = [sub]
    for cfg in manifest.skip_configs:
        for k in range(manifest.stages):
            rows.append([cfg, str(k), *(_fmt_ms(t[cfg][k][stat]) for t in tables)])
    return _render(rows, top, right_from=2)
