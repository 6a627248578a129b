"""Reading a bundle's latency table: the one implementation (stdlib only).

The manifest's ``latency`` list holds :class:`runtime.manifest.LatencyEntry` records, one per
piece or per (exit, skip config) of a (device, backend, target, batch) group. Everything that
reads them goes through this module:

* :mod:`devices.latency` re-exports :func:`cumulative_table`, :func:`segment_costs_ms`,
  :func:`latency_groups` and :data:`STATS` (profiling reports, build, calibration);
* :class:`runtime.deadline.LatencyTable` (the runtime's deadline logic) looks entries up with
  :func:`find_groups` / :class:`GroupEntries`;
* :meth:`runtime.rules.StopContext.from_manifest` (segment costs for stopping rules) likewise.

Primitives: :func:`find_groups` splits the table into groups, :func:`pick_target` chooses a
group's target, :class:`GroupEntries` indexes one group (pieces, cumulative exits) and sums
pieces (:meth:`GroupEntries.piece_sum`, :func:`piece_sums`) or differences cumulative entries
(:meth:`GroupEntries.exit_increment`). Two ways of turning cumulative values into segment
costs exist, on purpose:

* :func:`increments` (``segment_costs_ms``): ``cost[k] = max(0, C_k - max(C_0..C_{k-1}))``, so
  the costs always sum to the largest cumulative value, even for noisy non-monotone tables;
* :meth:`GroupEntries.exit_increment` (``LatencyTable.segment``, ``StopContext``):
  ``max(0, C_k - C_{k-1})``, one segment on its own.

Only the attributes ``latency``, ``execution`` (and ``skip_configs`` for
:func:`cumulative_table`) of the manifest are read, so any object with those works. No
imports beyond the standard library: on-device code and ``devices/`` can both use it
(``runtime/`` never imports ``devices/``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional, Sequence

from .errors import LatencyTableError, UsageError

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from runtime.manifest import LatencyEntry, Manifest

__all__ = [
    "STATS",
    "check_stat",
    "stat_ms",
    "GroupEntries",
    "find_groups",
    "pick_target",
    "select_group",
    "latency_groups",
    "piece_sums",
    "increments",
    "cumulative_table",
    "segment_costs_ms",
]

#: Statistics a latency entry carries (its ``<stat>_ms`` fields), as accepted by ``stat=``.
STATS = ("p50", "p90", "p95", "p99", "mean")

#: (device, backend, target, batch): one group of entries at one target.
GroupKey = tuple[str, str, str, int]


def check_stat(stat: str) -> str:
    """``stat`` if it is one of :data:`STATS`; ValueError otherwise."""
    if stat not in STATS:
        raise ValueError(f"stat must be one of {', '.join(STATS)}, got {stat!r}")
    return stat


def stat_ms(entry: "LatencyEntry", stat: str) -> float:
    """The ``stat`` (p50, ..., mean) of one entry, in ms."""
    return float(getattr(entry, f"{check_stat(stat)}_ms"))


class GroupEntries:
    """The entries of one latency group at one target, indexed for lookups.

    ``pieces``: piece id -> entry; ``exits``: (skip_config, exit) -> cumulative entry (the
    last one wins if the table repeats a key). ``entries`` keeps the table's order.
    """

    __slots__ = ("entries", "pieces", "exits")

    def __init__(self, entries: Iterable["LatencyEntry"]) -> None:
        self.entries = tuple(entries)
        self.pieces = {e.piece: e for e in self.entries if e.piece is not None}
        self.exits = {(e.skip_config, e.exit): e for e in self.entries if e.exit is not None}

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def kind(self) -> Optional[str]:
        """'measured' or 'estimated' (a group is one or the other), None when empty."""
        return self.entries[0].kind if self.entries else None

    @property
    def target(self) -> Optional[str]:
        return self.entries[0].target if self.entries else None

    def cumulative(self, cfg: str, k: int, stat: str) -> Optional[float]:
        """``C_k``: the cumulative entry of exit ``k`` of ``cfg``, None if absent."""
        e = self.exits.get((cfg, k))
        return None if e is None else stat_ms(e, stat)

    def exit_increment(self, cfg: str, k: int, stat: str) -> Optional[float]:
        """``max(0, C_k - C_{k-1})`` (``C_{-1} = 0``); None unless both entries exist."""
        hi = self.cumulative(cfg, k, stat)
        lo = 0.0 if k == 0 else self.cumulative(cfg, k - 1, stat)
        return None if hi is None or lo is None else max(0.0, hi - lo)

    def missing(self, segment: Iterable[str]) -> list[str]:
        """The pieces of ``segment`` without an entry."""
        return [pid for pid in segment if pid not in self.pieces]

    def piece_sum(self, segment: Iterable[str], stat: str) -> Optional[float]:
        """Sum of the ``stat`` of the pieces of ``segment``; None if one has no entry."""
        found = [self.pieces.get(pid) for pid in segment]
        if any(e is None for e in found):
            return None
        return sum(stat_ms(e, stat) for e in found)


def piece_sums(group: GroupEntries, plan: Sequence[Sequence[str]],
               stat: str) -> list[Optional[float]]:
    """:meth:`GroupEntries.piece_sum` of every segment of ``plan`` (an execution plan)."""
    return [group.piece_sum(segment, stat) for segment in plan]


def increments(cumulative: Iterable[float]) -> list[float]:
    """Segment costs from cumulative-to-exit values, clamped so they never go negative and
    always sum to the largest cumulative value: ``cost[k] = max(0, C_k - max(C_0..C_{k-1}))``."""
    costs, prev = [], 0.0
    for c in cumulative:
        costs.append(max(0.0, c - prev))
        prev = max(prev, c)
    return costs


# ----------------------------------------------------------------------------------------
# groups
# ----------------------------------------------------------------------------------------

def find_groups(manifest: "Manifest", *, device: Optional[str] = None,
                backend: Optional[str] = None, target: Optional[str] = None,
                batch: Optional[int] = None) -> dict[GroupKey, GroupEntries]:
    """``{(device, backend, target, batch): GroupEntries}`` of the latency entries matching
    the given fields (``None`` matches anything), in table order."""
    found: dict[GroupKey, list] = {}
    for e in manifest.latency:
        if ((device is None or e.device == device) and (backend is None or e.backend == backend)
                and (target is None or e.target == target)
                and (batch is None or e.batch == batch)):
            found.setdefault((e.device, e.backend, e.target, e.batch), []).append(e)
    return {key: GroupEntries(entries) for key, entries in found.items()}


def pick_target(targets: Iterable[str], target: Optional[str] = None, *, strict: bool = True,
                where: str = "latency table") -> str:
    """The target to read among a group's ``targets``.

    ``strict`` (the default): ``target`` must be one of them; without one, the group must
    have a single target (LookupError otherwise). Not strict: ``target`` when the group has
    it, else the group's first target (sorted).
    """
    targets = sorted(set(targets))
    if not targets:
        raise LatencyTableError(f"{where} is empty")
    if not strict:
        return target if target in targets else targets[0]
    if target is None:
        if len(targets) > 1:
            raise LatencyTableError(f"{where} has several targets ({', '.join(targets)}); "
                              "pass target=")
        return targets[0]
    if target not in targets:
        raise LatencyTableError(f"{where} has no target {target!r} (has: {', '.join(targets)})")
    return target


def latency_groups(manifest: "Manifest") -> list[tuple[str, str, int, str]]:
    """(device, backend, batch, kind) of every latency group, in table order."""
    seen: dict[tuple, str] = {}
    for e in manifest.latency:
        seen.setdefault((e.device, e.backend, e.batch), e.kind)
    return [(d, b, n, k) for (d, b, n), k in seen.items()]


def select_group(manifest: "Manifest", device: str, backend: str, batch: int = 1, *,
                 target: Optional[str] = None) -> GroupEntries:
    """The (device, backend, batch) group at ``target`` (see :func:`pick_target`, strict).

    LookupError when the bundle has no such group, or the target is ambiguous or absent.
    """
    found = find_groups(manifest, device=device, backend=backend, batch=batch)
    if not found:
        have = ", ".join(f"{d}/{b}/batch {n} ({k})" for d, b, n, k in latency_groups(manifest))
        raise LatencyTableError(f"no latency table for device {device!r}, backend {backend!r}, "
                          f"batch {batch} (tables: {have or 'none'})")
    target = pick_target((t for _, _, t, _ in found), target,
                         where=f"latency table {device}/{backend}/batch {batch}")
    return found[(device, backend, target, batch)]


# ----------------------------------------------------------------------------------------
# cumulative table and segment costs
# ----------------------------------------------------------------------------------------

def cumulative_table(manifest: "Manifest", device: str, backend: str, batch: int = 1, *,
                     target: Optional[str] = None,
                     stats: Sequence[str] = STATS) -> dict[str, list[dict[str, float]]]:
    """``{skip_config: [ {stat: ms} per exit ]}`` for one latency group.

    Uses the cumulative (exit, skip_config) entries; an exit without one falls back to the
    sum of its pieces' entries over segments 0..k (sums of percentiles: an approximation).
    Raises LookupError when neither is available.
    """
    for s in stats:
        check_stat(s)
    group = select_group(manifest, device, backend, batch, target=target)
    out: dict[str, list[dict[str, float]]] = {}
    for cfg in manifest.skip_configs:
        rows: list[dict[str, float]] = []
        running = {s: 0.0 for s in stats}
        for k, seg in enumerate(manifest.execution[cfg]):
            missing = group.missing(seg)
            if not missing:
                for s in stats:
                    running[s] += group.piece_sum(seg, s)
            e = group.exits.get((cfg, k))
            if e is not None:
                rows.append({s: stat_ms(e, s) for s in stats})
            elif not missing:
                rows.append(dict(running))
            else:
                raise LatencyTableError(f"latency table {device}/{backend}/batch {batch} has neither "
                                  f"exit {k} of {cfg!r} nor piece(s) {', '.join(missing)}")
        out[cfg] = rows
    return out


def segment_costs_ms(manifest: "Manifest", device: str, backend: str, skip_config: str,
                     batch: int = 1, stat: str = "p50", *,
                     target: Optional[str] = None) -> list[float]:
    """Incremental cost of each segment (exit k-1 -> exit k) under ``skip_config``, in ms.

    :func:`increments` of the group's cumulative table (``stat`` of each cumulative entry;
    measured tables include the runtime's own per-segment overhead): ``cum[k] - cum[k-1]``,
    clamped at 0; ``sum(cost[:k+1])`` is the cumulative ``stat`` to exit k. A (device,
    backend, batch) group is either measured or estimated as a whole; whichever this
    bundle holds is used (``manifest.latency_kind(device, backend, batch)`` says which;
    profiling on the device replaces estimates, so measured wins whenever it exists).
    Raises LookupError if there is no table, ValueError for a bad ``stat``/config.
    """
    check_stat(stat)
    if skip_config not in manifest.execution:
        raise UsageError(f"unknown skip config {skip_config!r} (bundle has: "
                         f"{', '.join(manifest.skip_configs)})")
    table = cumulative_table(manifest, device, backend, batch, target=target, stats=(stat,))
    return increments(row[stat] for row in table[skip_config])
