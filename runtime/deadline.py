"""Deadline bookkeeping for anytime prediction: clocks, latency estimates, budgets (numpy only).

* :class:`Deadline` - one call's budget, measured on an injectable clock (seconds, monotonic;
  ``time.perf_counter`` by default; :class:`FakeClock` in tests).
* :class:`LatencyTable` - a read-only view of the bundle's latency table for one
  (device, backend[, target]): per-segment and full-depth percentiles per skip config and batch
  (lookups and sums via :mod:`runtime.latency`, the one reader of the table).
* :class:`OnlineLatency` - thread-safe recent segment timings measured while predicting
  (measure-as-you-go when the bundle has no table); its percentiles survive stalls (a lone
  60 ms preemption among 0.3 ms timings counts as a "stall fence" value, see the class).
* :class:`LatencyModel` - what the runtime asks: "how long will segment k of config c take at
  batch n?" Table first (measured or estimated; for p95/p99 the online window's figure when it is
  slower), then online measurements, then batch-1 figures scaled by n, then MAC-proportional scaling of whatever was measured; ``None`` = no idea yet.
"""
from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left, bisect_right, insort
from collections import deque
from typing import Callable, Optional

import numpy as np

from .latency import STATS, GroupEntries, check_stat, find_groups, pick_target

__all__ = ["Clock", "FakeClock", "Deadline", "LatencyTable", "OnlineLatency", "LatencyModel",
           "check_budget", "stall_fence", "span_key", "STATS"]

#: A clock returns seconds from an arbitrary origin, monotonic (like ``time.perf_counter``).
Clock = Callable[[], float]
#: Tail percentiles: for these a slower online measurement overrides the bundle's table.
TAIL_STATS = ("p95", "p99")
#: Comparisons with the budget tolerate 1 ns of floating-point noise in clock differences.
EPS_MS = 1e-6
#: A timing is a *stall* (the thread was preempted, a worker waited for a core, the page cache
#: was cold...) when it exceeds ``max(STALL_FACTOR x median, median + STALL_MIN_MS)`` of its
#: window: see :class:`OnlineLatency`.
STALL_FACTOR = 4.0
STALL_MIN_MS = 0.5


#: Measurements of a span before its online quantile weighs as much as the table's (see
#: :meth:`LatencyModel.span_quantile`).
SPAN_PRIOR = 32.0


def span_key(first: int, last: int, variant: str, batch: int) -> tuple:
    """The online-statistics key of a span of stages run in one variant at one batch size."""
    return ("span", first, last, variant, batch)


def answer_key(batch: int) -> tuple:
    """The online-statistics key of the time from the end of a call's last span to its answer
    (softmax, decision, the Prediction) at one batch size."""
    return ("answer", batch)


#: Before any measurement of it: the time from the last span to the answer (ms; x86 build host
#: 10-20 us at batch 1).
DEFAULT_ANSWER_MS = 0.02


def check_budget(budget_ms: object) -> Optional[float]:
    """``None`` or a finite number >= 0 (ms); ValueError otherwise."""
    if budget_ms is None:
        return None
    if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float, np.integer,
                                                                  np.floating)):
        raise ValueError(f"budget_ms: expected a number of milliseconds or None, "
                         f"got {type(budget_ms).__name__}")
    b = float(budget_ms)
    if not math.isfinite(b):
        raise ValueError(f"budget_ms: expected a finite number, got {budget_ms!r}")
    if b < 0:
        raise ValueError(f"budget_ms: must be >= 0, got {budget_ms!r}")
    return b


class FakeClock:
    """A clock that only moves when told to: ``clock()`` -> seconds, ``clock.advance(ms)``.

    Thread-safe. Use it to test deadline behaviour deterministically, e.g. with an executor
    wrapper that advances the clock by a fixed duration per segment.
    """

    def __init__(self, start_s: float = 0.0) -> None:
        self._t = float(start_s)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._t

    def advance(self, ms: float) -> None:
        if ms < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._t += ms / 1000.0


class Deadline:
    """The budget of one predict call, started at ``start`` (clock seconds; default: now)."""

    def __init__(self, budget_ms: Optional[float], clock: Clock = time.perf_counter,
                 start: Optional[float] = None) -> None:
        self.budget_ms = check_budget(budget_ms)
        self.clock = clock
        self.start = clock() if start is None else float(start)

    def elapsed_ms(self) -> float:
        return (self.clock() - self.start) * 1000.0

    def remaining_ms(self) -> float:
        return math.inf if self.budget_ms is None else self.budget_ms - self.elapsed_ms()

    def fits(self, next_ms: Optional[float]) -> bool:
        """Would running something that takes ``next_ms`` now still end within the budget?

        No budget, or an unknown duration (``None``), fits.
        """
        if self.budget_ms is None or next_ms is None:
            return True
        return self.elapsed_ms() + next_ms <= self.budget_ms + EPS_MS

    def missed(self, latency_ms: float) -> bool:
        return self.budget_ms is not None and latency_ms > self.budget_ms + EPS_MS


class LatencyTable:
    """The manifest's latency entries for ``device`` and ``backend`` (optionally ``target``).

    ``backend`` is a runtime backend name ("onnxruntime", "tvm", "tensorrt"); the portable
    ONNX runs with onnxruntime, so pass "onnxruntime" for it (its entries have target
    "portable"). Entries of ``target`` are used when the group has them, else those of the
    group's first target. Full depth is the cumulative entry of the last exit, else the sum of
    the segments.
    """

    def __init__(self, manifest, device: Optional[str], backend: str,
                 target: Optional[str] = None) -> None:
        self.manifest = manifest
        self.device = device
        self.backend = backend
        self.target = target
        self._by_batch: dict[int, GroupEntries] = {}
        # the table never changes once built: lookups are cached (the deadline check asks for
        # the same segments on every call)
        self._segment_cache: dict[tuple, Optional[float]] = {}
        self._full_cache: dict[tuple, Optional[float]] = {}
        if device is None:
            return
        found = find_groups(manifest, device=device, backend=backend)
        targets: dict[int, list[str]] = {}
        for _, _, t, batch in found:
            targets.setdefault(batch, []).append(t)
        for batch, ts in targets.items():
            use = pick_target(ts, target, strict=False)
            self._by_batch[batch] = found[(device, backend, use, batch)]

    def __bool__(self) -> bool:
        return bool(self._by_batch)

    @property
    def batches(self) -> list[int]:
        return sorted(self._by_batch)

    @property
    def kind(self) -> Optional[str]:
        """'measured' / 'estimated' (of the batch-1 group, else the smallest batch), or None."""
        if not self._by_batch:
            return None
        group = self._by_batch.get(1) or self._by_batch[min(self._by_batch)]
        return group.kind

    def cumulative(self, cfg: str, exit: int, batch: int = 1, stat: str = "p95") -> Optional[float]:
        group = self._by_batch.get(batch)
        return None if group is None else group.cumulative(cfg, exit, stat)

    def segment(self, cfg: str, k: int, batch: int = 1, stat: str = "p95") -> Optional[float]:
        """Segment k of ``cfg``: the larger of (sum of its pieces' entries) and (difference of
        the cumulative entries of exits k and k-1) -- whichever exist; None if neither.

        Unlike :func:`runtime.latency.segment_costs_ms` (cumulative entries first, pieces as
        a fallback, costs summing to the cumulative value) this is a conservative per-segment
        bound for the deadline check.
        """
        key = (cfg, k, batch, stat)
        try:
            return self._segment_cache[key]
        except KeyError:
            pass
        group = self._by_batch.get(batch)
        if not group:
            return None
        found = [v for v in (group.piece_sum(self.manifest.execution[cfg][k], stat),
                             group.exit_increment(cfg, k, stat)) if v is not None]
        v = max(found) if found else None
        self._segment_cache[key] = v
        return v

    def full_depth(self, cfg: str, batch: int = 1, stat: str = "p95") -> Optional[float]:
        key = (cfg, batch, stat)
        try:
            return self._full_cache[key]
        except KeyError:
            pass
        last = self.manifest.stages - 1
        v = self.cumulative(cfg, last, batch, stat)
        if v is None:
            segs = [self.segment(cfg, k, batch, stat) for k in range(last + 1)]
            v = None if any(s is None for s in segs) else float(sum(segs))  # type: ignore[arg-type]
        self._full_cache[key] = v
        return v


def stall_fence(ordered: list[float]) -> float:
    """The stall fence of a sorted non-empty window: ``max(STALL_FACTOR * m, m + STALL_MIN_MS)``
    with ``m`` its low median (``ordered[(n - 1) // 2]``: of two values, the smaller)."""
    m = ordered[(len(ordered) - 1) // 2]
    return max(STALL_FACTOR * m, m + STALL_MIN_MS)


class OnlineLatency:
    """Recent durations (ms) per key, thread-safe; quantiles over the last ``window`` values.

    Each key keeps its window twice: in arrival order (to drop the oldest) and sorted, so a
    percentile is read in O(log window) under the lock and a record costs O(window) memmove,
    not a sort: the deadline check and the stopping context ask for these on every call.

    **Stalls.** On a busy or oversubscribed CPU a segment that normally takes 0.3 ms sometimes
    takes 50-70 ms: the thread lost its core. Such a stall says nothing about how long the next
    run of the segment will take, and no deadline decision can dodge it. A value above the
    window's :func:`stall_fence` (4x its median, and at least 0.5 ms above it) is a stall
    candidate. For a quantile ``q`` ("p95": 0.95), when at most ``max(1, floor((1 - q) n))`` of
    the ``n`` values are beyond the fence -- stalls rarer than the tail the quantile describes --
    they count *as the fence* (winsorised), so the q-quantile of the window is not a stall unless
    stalls are at least that frequent; more of them are the distribution (a slower regime:
    throttling, a loaded machine) and count as they are. On a full default window (256) the
    p50-p99 are then exactly ``np.percentile`` (numpy's default 'linear' interpolation): the
    capped values all lie beyond the two the quantile interpolates. Only short windows differ,
    where one outlier would otherwise *be* the p95 for the first 20 values (and the maximum
    below ``min_samples``): a stall right after start-up no longer flags the next calls.

    With fewer than ``min_samples`` values a percentile other than p50 is the maximum seen
    (conservative), a lone stall counting as the fence. "mean" is the plain mean of the window
    (stalls are part of the average cost). :meth:`stalls` counts the values beyond the fence.

    :meth:`record_later` queues values without the lock (the batch-1 full-depth path, where the
    sorted insert costs ~10 us with caches cold after the segments ran); every read, and
    :meth:`record_many`, applies the queue first, so no reader sees figures older than a record.
    """

    #: queued values applied at the latest when this many wait
    PENDING_LIMIT = 96

    def __init__(self, window: int = 256, min_samples: int = 5) -> None:
        self.window = int(window)
        self.min_samples = int(min_samples)
        self._data: dict[tuple, deque] = {}
        self._sorted: dict[tuple, list[float]] = {}
        self._lock = threading.Lock()
        self._pending: deque = deque()  # (key, ms) queued by record_later; append/popleft atomic
        self._version = 0  # bumped on every record (lets callers cache derived figures)

    @property
    def version(self) -> int:
        """Changes whenever a value is recorded (queued values are applied first)."""
        if self._pending:
            self.record_many(())
        return self._version

    def record(self, key: tuple, ms: float) -> None:
        self.record_many(((key, ms),))

    def record_later(self, items) -> None:
        """Queue ``(key, ms)`` values; applied before the next read or at PENDING_LIMIT."""
        pending = self._pending
        pending.extend(items)
        if len(pending) >= self.PENDING_LIMIT:
            self.record_many(())

    def _apply_pending(self) -> None:
        """Move queued values into the windows (the lock is held)."""
        pending = self._pending
        while pending:
            try:
                item = pending.popleft()
            except IndexError:  # another thread took the last one
                break
            self._insert(*item)

    def record_many(self, items) -> None:
        """Record several ``(key, ms)`` at once (one lock acquisition), in order, after the
        queued ones."""
        with self._lock:
            self._apply_pending()
            for key, ms in items:
                self._insert(key, ms)

    def _insert(self, key: tuple, ms: float) -> None:
        """Add one value to ``key``'s windows (the lock is held)."""
        v = float(ms)
        if v != v:  # NaN would break the sorted window; a clock difference never is one
            raise ValueError(f"OnlineLatency.record: {ms!r} is not a duration")
        d = self._data.get(key)
        if d is None:
            d = self._data[key] = deque(maxlen=self.window)
            s = self._sorted[key] = []
        else:
            s = self._sorted[key]
            if d and len(d) == self.window:
                del s[bisect_left(s, d[0])]  # the value append() is about to drop
        d.append(v)
        insort(s, v)
        self._version += 1

    def count(self, key: tuple) -> int:
        with self._lock:
            self._apply_pending()
            d = self._data.get(key)
            return 0 if d is None else len(d)

    def keys(self) -> list[tuple]:
        with self._lock:
            self._apply_pending()
            return list(self._data)

    def stalls(self, key: tuple) -> int:
        """How many values of ``key``'s window are beyond its :func:`stall_fence`."""
        with self._lock:
            self._apply_pending()
            s = self._sorted.get(key)
            return len(s) - bisect_right(s, stall_fence(s)) if s else 0

    def stat(self, key: tuple, stat: str = "p95") -> Optional[float]:
        if stat not in STATS:
            check_stat(stat)
        with self._lock:
            if self._pending:
                self._apply_pending()
            s = self._sorted.get(key)
            if not s:
                return None
            n = len(s)
            if stat == "mean":
                vals = np.fromiter(self._data[key], dtype=np.float64, count=n)
            else:
                fence = stall_fence(s)
                kept = bisect_right(s, fence)  # values beyond the fence: s[kept:]
                if n < self.min_samples and stat != "p50":
                    return fence if kept == n - 1 else s[-1]
                q = _QUANTILE[stat]
                if kept < n and n - kept <= max(1, int((1.0 - q) * n + 1e-9)):
                    return _quantile_sorted(s, q, kept, fence)
                return _quantile_sorted(s, q)
        return float(vals.mean())

    def quantile(self, key: tuple, q: float) -> tuple[Optional[float], int]:
        """(``q``-quantile of ``key``'s window with the stall handling of :meth:`stat`, number
        of values); ``(None, 0)`` when nothing was recorded."""
        with self._lock:
            if self._pending:
                self._apply_pending()
            s = self._sorted.get(key)
            if not s:
                return None, 0
            n = len(s)
            fence = stall_fence(s)
            kept = bisect_right(s, fence)
            if n < self.min_samples:
                return (fence if kept == n - 1 else s[-1]), n
            if kept < n and n - kept <= max(1, int((1.0 - q) * n + 1e-9)):
                return _quantile_sorted(s, q, kept, fence), n
            return _quantile_sorted(s, q), n

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self._data.clear()
            self._sorted.clear()
            self._version += 1


def _blend(table: Optional[float], online: float, n: int, prior: float) -> float:
    """``w * online + (1 - w) * table`` with ``w = n / (n + prior)`` (online alone without a
    table)."""
    if table is None:
        return online
    w = n / (n + prior)
    return w * online + (1.0 - w) * table


#: Percentile statistics as fractions.
_QUANTILE = {s: float(s[1:]) / 100 for s in STATS if s.startswith("p")}


def _quantile_sorted(s: list[float], q: float, cut: Optional[int] = None,
                     cap: float = math.inf) -> float:
    """``np.percentile(s, 100 * q)`` (method 'linear') of an already sorted non-empty list,
    with numpy's exact arithmetic (virtual index ``(n - 1) q``, its two-sided lerp).

    ``cut``: the values from index ``cut`` on count as ``cap`` (winsorised stalls)."""
    n = len(s)
    if cut is None:
        cut = n
    v = (n - 1) * q
    if v >= n - 1:
        return s[-1] if cut == n else cap
    lo = math.floor(v)
    a = s[lo] if lo < cut else cap
    b = s[lo + 1] if lo + 1 < cut else cap
    t = v - lo
    d = b - a
    return b - d * (1 - t) if t >= 0.5 else a + d * t


class LatencyModel:
    """Per-segment latency estimates for the deadline logic and the skip-config choice.

    Order of preference for segment ``k`` of ``cfg`` at batch ``n``: the bundle's table at
    batch n (for p95/p99 the online window's figure instead when it is slower); online
    measurements at batch n; the table / online figure at batch 1 times n
    (conservative on CPUs); the largest ms-per-MAC ratio among segments measured online at that
    batch (MAC-proportional). ``None`` when nothing is known yet (the runtime then runs the
    segment and measures it). ``use_table=False`` ignores the table (online only).
    """

    def __init__(self, manifest, table: Optional[LatencyTable], online: OnlineLatency,
                 use_table: bool = True) -> None:
        self.manifest = manifest
        self.table = table if (table and use_table) else None
        self.online = online
        self._macs = {cfg: [sum(manifest.piece(pid).macs for pid in seg) for seg in segs]
                      for cfg, segs in manifest.execution.items()}
        self._ratio_cache: dict[tuple, tuple] = {}
        self._span_table: dict[tuple, Optional[float]] = {}

    @property
    def source(self) -> str:
        """'measured' / 'estimated' (bundle table) or 'online' (measure-as-you-go)."""
        return self.table.kind if self.table else "online"  # type: ignore[return-value]

    def segment_macs(self, cfg: str, k: int) -> int:
        return self._macs[cfg][k]

    def record(self, cfg: str, k: int, batch: int, ms: float) -> None:
        self.online.record_many((((cfg, k, batch), ms),))

    def record_many(self, items) -> None:
        """``[((cfg, k, batch), ms), ...]`` recorded at once (see :meth:`record`)."""
        self.online.record_many(items)

    def record_later(self, items) -> None:
        """Like :meth:`record_many`, queued without the lock; applied before any read."""
        self.online.record_later(items)

    def _direct(self, cfg: str, k: int, n: int, stat: str) -> Optional[float]:
        table = self.table.segment(cfg, k, n, stat) if self.table is not None else None
        online = self.online.stat((cfg, k, n), stat)
        if table is None or online is None or stat not in TAIL_STATS:
            return table if table is not None else online
        # The deadline guards with tail percentiles: when this process sees a segment run slower
        # than the table says (load, cache pressure from other work, throttling), the slower wins.
        return max(table, online)

    def _mac_scaled(self, cfg: str, k: int, n: int, stat: str) -> Optional[float]:
        version = self.online.version
        hit = self._ratio_cache.get((n, stat))
        if hit is None or hit[0] != version:
            ratios = []
            for key in self.online.keys():
                if len(key) != 3:  # spans of the router: not a (config, segment, batch) key
                    continue
                c2, k2, n2 = key
                macs = self._macs[c2][k2] if c2 in self._macs and k2 < len(self._macs[c2]) else 0
                if n2 == n and macs > 0:
                    v = self.online.stat(key, stat)
                    if v is not None:
                        ratios.append(v / macs)
            hit = (version, max(ratios) if ratios else None)
            self._ratio_cache[(n, stat)] = hit  # benign race: a stale entry is recomputed
        return None if hit[1] is None else hit[1] * self._macs[cfg][k]

    def segment_ms(self, cfg: str, k: int, batch: int = 1, stat: str = "p95") -> Optional[float]:
        v = self._direct(cfg, k, batch, stat)
        if v is None and batch != 1:
            one = self._direct(cfg, k, 1, stat)
            v = None if one is None else one * batch
        if v is None:
            v = self._mac_scaled(cfg, k, batch, stat)
        if v is None and batch != 1:
            one = self._mac_scaled(cfg, k, 1, stat)
            v = None if one is None else one * batch
        return v

    def table_quantile(self, cfg: str, k: int, batch: int, q: float) -> Optional[float]:
        """Segment k of ``cfg`` at quantile ``q`` from the table: linear between the table's
        percentiles (p50, p90, p95, p99); below p50 the p50, above p99 the p99."""
        if self.table is None:
            return None
        pts = [(0.5, "p50"), (0.9, "p90"), (0.95, "p95"), (0.99, "p99")]
        if q <= 0.5:
            return self.table.segment(cfg, k, batch, "p50")
        for (q0, s0), (q1, s1) in zip(pts, pts[1:]):
            if q <= q1:
                a, b = self.table.segment(cfg, k, batch, s0), self.table.segment(cfg, k, batch, s1)
                if a is None or b is None:
                    return b if a is None else a
                return a + (b - a) * (q - q0) / (q1 - q0)
        return self.table.segment(cfg, k, batch, "p99")

    def span_quantile(self, first: int, last: int, variant: str, batch: int, q: float,
                      prior: float = SPAN_PRIOR) -> Optional[float]:
        """The ``q``-quantile (ms) of running stages ``first..last`` in ``variant`` at ``batch``.

        The table's figure (the span's segments, each at quantile q, summed) is blended with
        this process's own measurements of the span (stall-robust, see :class:`OnlineLatency`):
        ``w * online + (1 - w) * table`` with ``w = n / (n + prior)`` after n measurements, so
        a device faster or slower than its table is followed within a few hundred calls while a
        lone stall moves nothing. Without a table the online figure, then MAC-scaled segment
        estimates; None when nothing is known (the span then runs and is measured).
        """
        key = span_key(first, last, variant, batch)
        tkey = (key, q)
        try:
            table = self._span_table[tkey]
        except KeyError:  # the table never changes: computed once per span, batch and quantile
            S = self.manifest.stages
            cfg = "F" * first + variant + "F" * (S - 1 - last)
            parts = [self.table_quantile(cfg, k, batch, q) for k in range(first, last + 1)]
            table = None if self.table is None or any(v is None for v in parts) \
                else float(sum(parts))
            self._span_table[tkey] = table
        online, n = self.online.quantile(key, q)
        if online is None:
            if table is not None:
                return table
            S = self.manifest.stages
            cfg = "F" * first + variant + "F" * (S - 1 - last)
            segs = [self.segment_ms(cfg, k, batch, "p99" if q > 0.95 else "p95")
                    for k in range(first, last + 1)]
            return None if any(v is None for v in segs) else float(sum(segs))  # type: ignore
        return _blend(table, online, n, prior)

    def answer_quantile(self, batch: int, q: float) -> float:
        """The ``q``-quantile of the time from a call's last span to its answer, measured as
        calls go (stall-robust); :data:`DEFAULT_ANSWER_MS` x batch before any measurement."""
        online, _n = self.online.quantile(answer_key(batch), q)
        return DEFAULT_ANSWER_MS * batch if online is None else online

    def segment_quantile(self, cfg: str, k: int, batch: int, q: float,
                         prior: float = SPAN_PRIOR) -> Optional[float]:
        """Segment k of ``cfg`` at quantile ``q``: the table's figure blended with the online
        one as in :meth:`span_quantile` (the online window of ``(cfg, k, batch)``); without
        either, :meth:`segment_ms`'s fallbacks at the nearest tail percentile."""
        tkey = ("segment", cfg, k, batch, q)
        try:
            table = self._span_table[tkey]
        except KeyError:
            table = self._span_table[tkey] = self.table_quantile(cfg, k, batch, q)
        online, n = self.online.quantile((cfg, k, batch), q)
        if online is None:
            return table if table is not None else self.segment_ms(
                cfg, k, batch, "p99" if q > 0.95 else "p95")
        return _blend(table, online, n, prior)

    def full_depth_ms(self, cfg: str, batch: int = 1, stat: str = "p95") -> Optional[float]:
        if self.table is not None:
            v = self.table.full_depth(cfg, batch, stat)
            if v is not None:
                return v
        segs = [self.segment_ms(cfg, k, batch, stat) for k in range(self.manifest.stages)]
        return None if any(s is None for s in segs) else float(sum(segs))  # type: ignore[arg-type]

    def segment_costs(self, cfg: str, batch: int = 1, stat: str = "p50") -> list[Optional[float]]:
        return [self.segment_ms(cfg, k, batch, stat) for k in range(self.manifest.stages)]
