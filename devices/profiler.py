"""Measure a bundle's latency on this machine: every piece, and every exit of every skip config.

    from devices.profiler import profile_bundle, write_latency

    result = profile_bundle("b-x86-host", batches=(1, 8))      # measures; writes nothing
    print(result.to_text())
    write_latency("b-x86-host", result.entries)                # manifest.json, atomically

Two kinds of numbers are measured (docs/profiling.md has the methodology):

* **per piece**: one backend call (``runner.run(feeds)``) with realistic inputs (the
  tensors the chain really produces from a random input);
* **cumulative to each exit**, per skip config: the runtime's real path, timed end to end
  from one start: input array preparation, then for each exit ``SegmentExecutor.run_segment``
  (tensor-dict bookkeeping, every piece of the segment) followed by a representative
  stopping decision (softmax + max over the exit's logits, compared with a threshold).
  The time to exit k is taken when exit k's decision is made, so it includes every
  earlier decision. Percentiles of exit k+1 are >= exit k by construction (per sample).

The sum of the piece medians to each exit is reported alongside (``ProfileResult``), and the
difference is the runtime's own overhead.

Measurement loop, per item (piece or skip config): warm-up until both ``warmup_calls``
calls and ``warmup_s`` seconds; then items take turns in blocks of ``block`` calls
(round-robin, so background load hits every item alike) until each has ``min_iters``
samples and the relative standard error of its p95 is <= ``target_rse``, or it used
``max_seconds`` / ``max_iters``.

Runs numpy + one backend (``runtime``); never torch, train/ or export/.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from devices.host import fingerprint as host_fingerprint
from devices.host import guess_profile
from devices.latency import (STATS, Stats, _check_batches, estimate_bundle, measured_entry,
                             p95_relative_se, segment_costs_ms, summarize, write_latency)
from devices.profile import Profile, ProfileError
from devices.registry import load_profile
from runtime.bundle import Bundle
from runtime.executor import SegmentExecutor
from runtime.backends import BACKENDS
from runtime.manifest import LatencyEntry, Manifest, utc_now_iso
from runtime.errors import UsageError

__all__ = [
    "MeasureSettings",
    "FULL",
    "QUICK",
    "ProfileResult",
    "profile_bundle",
    "estimate_bundle",
    "write_latency",
    "segment_costs_ms",
    "resolve_device",
    "measure_items",
    "stopping_probe",
]

Progress = Optional[Callable[[str], None]]


@dataclass(frozen=True)
class MeasureSettings:
    """How long and how often to measure each item (piece or skip config)."""
    warmup_s: float = 0.2
    warmup_calls: int = 10
    min_iters: int = 200
    max_iters: int = 20_000
    target_rse: float = 0.02  # relative standard error of the p95
    max_seconds: float = 3.0  # per item, after warm-up
    block: int = 10  # calls per turn in the round-robin
    quick: bool = False

    def __post_init__(self) -> None:
        if self.warmup_s < 0 or self.warmup_calls < 0:
            raise ValueError("warm-up time and calls must be >= 0")
        if not 1 <= self.min_iters <= self.max_iters:
            raise ValueError(f"need 1 <= min_iters <= max_iters, got {self.min_iters}, "
                             f"{self.max_iters}")
        if self.target_rse <= 0 or self.max_seconds <= 0 or self.block < 1:
            raise ValueError("target_rse and max_seconds must be > 0, block >= 1")


#: Default: p95 to ~2 % (or 3 s per item), at least 200 samples (p99 needs >= 100).
FULL = MeasureSettings()
#: For tests and smoke runs: seconds, not minutes; percentiles are rough.
QUICK = MeasureSettings(warmup_s=0.02, warmup_calls=3, min_iters=30, max_iters=2_000,
                        target_rse=0.05, max_seconds=0.15, block=5, quick=True)

#: Threshold of the representative stopping decision (its value does not change the cost).
STOP_THRESHOLD = 0.5


def stopping_probe(logits: np.ndarray, threshold: float = STOP_THRESHOLD) -> bool:
    """A representative stopping decision: softmax over classes, top probability per sample,
    stop if every sample is confident enough. What the runtime does after each exit."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    conf = (e / e.sum(axis=1, keepdims=True)).max(axis=1)
    return bool((conf >= threshold).all())


# ----------------------------------------------------------------------------------------
# the measurement loop
# ----------------------------------------------------------------------------------------

@dataclass
class _Item:
    name: str
    call: Callable[[], Sequence[float]]  # one timed call -> ms per component
    width: int
    samples: list[list[float]] = field(default_factory=list)
    spent_s: float = 0.0
    done: bool = False
    converged: bool = False

    def stats(self) -> list[Stats]:
        return [summarize(s) for s in self.samples]


_FROZEN_DEPTH = 0


@contextlib.contextmanager
def frozen_heap():
    """Keep the objects that exist now out of Python's cyclic GC while timing (``gc.freeze``).

    A process that trained or exported first (torch, data sets) holds millions of objects, and
    every full collection walks them: calls that allocate more (the segmented runtime: one
    dict and array per span, a Prediction) paid for it more. Measured on a 6-million-object
    heap: int8 adaptive 0.481x the monolithic session, frozen 0.425x, a fresh process 0.446x.
    An on-device app's heap is small; the measurement should not charge the build's. Nested
    uses freeze and unfreeze once, at the outermost.
    """
    global _FROZEN_DEPTH
    if _FROZEN_DEPTH == 0:
        gc.collect()
        gc.freeze()
    _FROZEN_DEPTH += 1
    try:
        yield
    finally:
        _FROZEN_DEPTH -= 1
        if _FROZEN_DEPTH == 0:
            gc.unfreeze()


def measure_items(items: Sequence[tuple[str, Callable[[], Sequence[float]]]],
                  settings: MeasureSettings = FULL, progress: Progress = None
                  ) -> dict[str, tuple[list[Stats], dict[str, Any]]]:
    """Measure timed callables round-robin; ``{name: ([Stats per component], info)}``.

    Each callable performs one timed call and returns its duration(s) in ms (a chain
    returns one cumulative time per exit). ``info``: samples, seconds, converged, warm-up.
    """
    with frozen_heap():
        return _measure_items(items, settings, progress)


def _measure_items(items, settings: MeasureSettings, progress: Progress):
    work: list[_Item] = []
    for name, call in items:
        t_end = time.perf_counter() + settings.warmup_s
        calls = 0
        first = call()
        calls += 1
        while calls < settings.warmup_calls or time.perf_counter() < t_end:
            call()
            calls += 1
        it = _Item(name, call, len(first), [[] for _ in first])
        it.warmup_calls = calls  # type: ignore[attr-defined]
        work.append(it)
    active = list(work)
    while active:
        for it in active:
            t0 = time.perf_counter()
            for _ in range(settings.block):
                for col, v in zip(it.samples, it.call()):
                    col.append(float(v))
            it.spent_s += time.perf_counter() - t0
            n = len(it.samples[0])
            if n >= settings.min_iters:
                rse = max(_rse(col) for col in it.samples)
                it.converged = bool(rse <= settings.target_rse)
                if it.converged or it.spent_s >= settings.max_seconds or n >= settings.max_iters:
                    it.done = True
        active = [it for it in active if not it.done]
    out = {}
    for it in work:
        stats = it.stats()
        info = {"samples": len(it.samples[0]), "seconds": round(it.spent_s, 4),
                "converged": it.converged, "p95_rse": round(max(s.p95_rse for s in stats), 5),
                "warmup_calls": it.warmup_calls}  # type: ignore[attr-defined]
        out[it.name] = (stats, info)
        if progress:
            progress(f"  {it.name:<24} n={info['samples']:<6} p50 {stats[-1].p50:8.3f} ms  "
                     f"p95 {stats[-1].p95:8.3f} ms  p95 rse {info['p95_rse']:.3f}"
                     + ("" if it.converged else "  (time/iteration cap)"))
    return out


def _rse(col: list[float]) -> float:
    return p95_relative_se(sorted(col))


# ----------------------------------------------------------------------------------------
# device and backend resolution
# ----------------------------------------------------------------------------------------

def _host_line(fp: dict) -> str:
    return (f"{fp.get('cpu_model')}, {fp.get('cpu_cores')} cores, {fp.get('arch')}"
            + (f", GPU {fp['gpus'][0].get('name')}" if fp.get("gpus") else ""))


def resolve_device(manifest: Manifest, device: Optional[str] = None,
                   fp: Optional[dict] = None, progress: Progress = None) -> Profile:
    """The profile a MEASURED table from this machine is recorded under.

    ``device`` given: that profile, which must describe this machine (same arch and the
    ISA features it lists), else ValueError. Otherwise the bundle's own device profile if it
    is compatible with this machine, else the detected host profile (``x86-host`` on a dev
    box, the Jetson/Raspberry Pi profile on those boards).
    """
    fp = fp if fp is not None else host_fingerprint()
    if device is not None:
        profile = load_profile(device)
        _require_host(profile, fp)
        return profile
    if manifest.device:
        try:
            profile = load_profile(manifest.device)
        except ProfileError as exc:
            profile = None
            why = f"its profile cannot be loaded here ({exc})"
        else:
            why = f"that profile is {profile.arch} with ISA {list(profile.hardware.isa)}"
        if profile is not None and profile.is_host_compatible(fp):
            return profile
        name = guess_profile(fp)
        if progress:
            progress(f"note: the bundle was compiled for {manifest.device!r}, but this machine "
                     f"({_host_line(fp)}) is not one: {why}; recording under {name!r}")
        return load_profile(name)
    return load_profile(guess_profile(fp))


def _require_host(profile: Profile, fp: dict) -> None:
    arch = fp.get("arch")
    if profile.arch != arch:
        raise UsageError(f"refusing to record MEASURED latency under device {profile.name!r}: "
                         f"that profile is {profile.arch} and this machine is {arch} "
                         f"({_host_line(fp)}); profile on the device itself, or use "
                         "--estimate-only for a roofline estimate")
    missing = sorted(set(profile.hardware.isa) - set(fp.get("isa") or ()))
    if missing:
        raise UsageError(f"refusing to record MEASURED latency under device {profile.name!r}: "
                         f"this machine lacks its ISA feature(s) {', '.join(missing)}; profile "
                         "on the device itself, or use --estimate-only")


@dataclass
class _Choice:
    run_backend: str  # what SegmentExecutor opens ("onnx" for the portable files)
    target: str
    backend: str  # what the latency table records (a runtime backend)
    executor: SegmentExecutor


def _executor_options(run_backend: str, profile: Profile) -> dict[str, Any]:
    """Portable ONNX files carry no session options: use the profile's onnxruntime ones."""
    if run_backend == "onnx":
        spec = profile.backend("onnxruntime")
        if spec is not None:
            return {k: spec.options[k] for k in ("providers", "intra_op_threads",
                                                 "inter_op_threads", "graph_optimization_level")
                    if k in spec.options}
    return {}


def _candidates(manifest: Manifest, backend: str, target: Optional[str]) -> list[tuple[str, str]]:
    avail = manifest.available_targets()
    out = [(b, t) for b, t in avail if b == backend and (target is None or t == target)]
    if backend == "onnxruntime":
        out += [(b, t) for b, t in avail if b == "onnx" and (target is None or t == target)]
    return out


def _choose(bundle: Bundle, profile: Profile, backend: Optional[str], target: Optional[str],
            progress: Progress) -> _Choice:
    m = bundle.manifest
    if backend is not None and backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r} (expected one of: "
                         f"{', '.join(BACKENDS)})")
    order = [backend] if backend else list(dict.fromkeys(
        [b for b in profile.backend_order() if b in BACKENDS] + list(BACKENDS)))
    failures = []
    for b in order:
        for run_b, t in _candidates(m, b, target):
            ex = SegmentExecutor(bundle, run_b, t, options=_executor_options(run_b, profile))
            try:
                for cfg in m.skip_configs:
                    ex.warm(cfg)
            except Exception as exc:  # noqa: BLE001 - any backend failure: try the next one
                msg = " ".join(str(exc).split()) or type(exc).__name__
                failures.append(f"{run_b}/{t}: {msg}")
                if progress and backend is None:
                    progress(f"skip {run_b}/{t}: cannot run here ({msg})")
                continue
            return _Choice(run_b, t, b, ex)
    have = ", ".join(f"{b}/{t}" for b, t in m.available_targets()) or "none"
    if failures:
        raise UsageError(f"{bundle.manifest_path}: no backend of this bundle runs here: "
                         + "; ".join(failures))
    want = backend + (f"/{target}" if target else "") if backend else "any runtime backend"
    raise UsageError(f"{bundle.manifest_path}: no artifacts for {want} covering every piece "
                     f"(bundle has: {have})")


# ----------------------------------------------------------------------------------------
# the result
# ----------------------------------------------------------------------------------------

@dataclass
class ProfileResult:
    """What :func:`profile_bundle` measured (``kind`` is always "measured").

    ``pieces[batch][piece_id]``: Stats of one backend call. ``cumulative[batch][cfg][k]``:
    Stats of the time to exit k through the runtime (segments + stopping decisions).
    ``sum_of_pieces[batch][cfg][k]``: sum of the piece p50s over segments 0..k.
    ``entries``: the LatencyEntry records to write (``write_latency(bundle, entries)``).
    """
    bundle: Path
    model: str
    device: str
    backend: str
    target: str
    batches: list[int]
    skip_configs: list[str]
    stages: int
    pieces: dict[int, dict[str, Stats]]
    cumulative: dict[int, dict[str, list[Stats]]]
    sum_of_pieces: dict[int, dict[str, list[float]]]
    info: dict[str, Any]
    fingerprint: dict[str, Any]
    entries: list[LatencyEntry]
    seconds: float
    settings: MeasureSettings
    notes: list[str] = field(default_factory=list)
    kind: str = "measured"

    def overhead_ms(self, batch: int, cfg: str, exit: int) -> float:
        """Runtime overhead to an exit: chained p50 minus the sum of the piece p50s."""
        return self.cumulative[batch][cfg][exit].p50 - self.sum_of_pieces[batch][cfg][exit]

    def to_text(self) -> str:
        from devices.latency import _fmt_ms, _render

        fp = self.fingerprint
        out = []
        for b in self.batches:
            out.append(f"MEASURED latency  {self.model}  device {self.device}  backend "
                       f"{self.backend} ({self.target})  batch {b}")
            out.append(f"machine: {_host_line(fp)}; numpy {fp.get('numpy')}, "
                       f"onnxruntime {fp.get('onnxruntime')}"
                       + ("; QUICK mode (rough percentiles)" if self.settings.quick else ""))
            rows = []
            for pid, s in self.pieces[b].items():
                info = self.info[b]["pieces"][pid]
                rows.append([pid, *(_fmt_ms(s.get(k)) for k in STATS), str(s.n),
                             f"{s.p95_rse:.3f}" + ("" if info["converged"] else "*")])
            out.append(_render(rows, ["piece", *(f"{k} ms" for k in STATS), "n", "p95 rse"]))
            out.append("cumulative to exit, through the runtime (segments + stopping decision); "
                       "'pieces' = sum of piece p50s, 'overhead' = p50 - pieces")
            rows = []
            for cfg in self.skip_configs:
                info = self.info[b]["chains"][cfg]
                for k, s in enumerate(self.cumulative[b][cfg]):
                    rows.append([cfg, str(k), _fmt_ms(s.p50), _fmt_ms(s.p90), _fmt_ms(s.p95),
                                 _fmt_ms(s.p99), _fmt_ms(s.mean),
                                 _fmt_ms(self.sum_of_pieces[b][cfg][k]),
                                 f"{self.overhead_ms(b, cfg, k):+.3f}", str(s.n),
                                 f"{s.p95_rse:.3f}" + ("" if info["converged"] else "*")])
            out.append(_render(rows, ["config", "exit", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
                                      "mean ms", "pieces", "overhead", "n", "p95 rse"]))
            out.append("")
        if any(not i["converged"] for b in self.batches for grp in ("pieces", "chains")
               for i in self.info[b][grp].values()):
            out.append("* stopped by the time/iteration cap before the p95's relative standard "
                       f"error reached {self.settings.target_rse:g}")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------------------
# profile_bundle
# ----------------------------------------------------------------------------------------

def _timed_piece(runner, feeds: dict[str, np.ndarray]) -> Callable[[], tuple[float]]:
    run = runner.run
    clock = time.perf_counter_ns

    def call() -> tuple[float]:
        t0 = clock()
        run(feeds)
        return ((clock() - t0) * 1e-6,)
    return call


def _timed_chain(ex: SegmentExecutor, cfg: str, x: np.ndarray, stages: int,
                 input_name: str) -> Callable[[], list[float]]:
    clock = time.perf_counter_ns
    run_segment = ex.run_segment

    def call() -> list[float]:
        out = [0.0] * stages
        t0 = clock()
        tensors = {input_name: np.ascontiguousarray(x, dtype=np.float32)}
        for k in range(stages):
            logits = run_segment(cfg, k, tensors)
            stopping_probe(logits)
            out[k] = (clock() - t0) * 1e-6
        return out
    return call


def _piece_feeds(ex: SegmentExecutor, m: Manifest, x: np.ndarray) -> dict[str, dict]:
    """The real input tensors of every used piece (chains run once from ``x``)."""
    feeds: dict[str, dict] = {}
    for cfg in m.skip_configs:
        tensors = {m.input.name: x}
        for seg in m.execution[cfg]:
            for pid in seg:
                r = ex.runner(pid)
                inputs = {n: tensors[n] for n in r.input_names}
                feeds.setdefault(pid, inputs)
                tensors.update(zip(r.output_names, r.run(inputs)))
    return feeds


def _runner_info(ex: SegmentExecutor, pid: str) -> dict[str, Any]:
    r = ex.runner(pid)
    info: dict[str, Any] = {}
    sess = getattr(r, "session", None)
    if sess is not None and hasattr(sess, "get_providers"):
        info["providers"] = list(sess.get_providers())
        so = getattr(sess, "get_session_options", lambda: None)()
        if so is not None:
            info["intra_op_threads"] = so.intra_op_num_threads
            info["inter_op_threads"] = so.inter_op_num_threads
    return info


def profile_bundle(bundle_dir: os.PathLike | str, *, backend: Optional[str] = None,
                   batches: Iterable[int] = (1,), device: Optional[str] = None,
                   quick: bool = False, progress: Progress = print,
                   target: Optional[str] = None, settings: Optional[MeasureSettings] = None,
                   seed: int = 0) -> ProfileResult:
    """Measure every piece and every (skip config, exit) of a bundle on this machine.

    ``backend``: None -> the first backend, in the device profile's order, that the bundle
    has artifacts for and that runs here (portable ONNX files count as onnxruntime).
    ``device``: the profile to record under (must describe this machine; see
    :func:`resolve_device`). ``quick``: :data:`QUICK` settings (``settings`` overrides).
    Nothing is written: pass ``result.entries`` to :func:`write_latency`.
    """
    say = progress or (lambda _m: None)
    batches = _check_batches(batches)
    settings = settings or (QUICK if quick else FULL)
    t_start = time.perf_counter()
    bundle = Bundle.open(bundle_dir, verify=True)
    m = bundle.manifest
    fp = host_fingerprint()
    notes: list[str] = []
    profile = resolve_device(m, device, fp, progress=lambda s: (notes.append(s[6:]), say(s)))
    choice = _choose(bundle, profile, backend, target, say)
    ex = choice.executor
    if choice.run_backend == "onnx":
        notes.append("measured the portable ONNX files with onnxruntime (target 'portable') "
                     f"and the {profile.name} profile's onnxruntime session options")
    say(f"profile {bundle.root.name}: {m.model.name} on {profile.name} ({_host_line(fp)}), "
        f"{choice.backend} ({choice.run_backend}/{choice.target}), batch "
        f"{', '.join(map(str, batches))}, {len(m.skip_configs)} skip configs x {m.stages} exits"
        + (" [quick]" if settings.quick else ""))
    used = [p.id for p in m.pieces
            if any(p.id in seg for segs in m.execution.values() for seg in segs)]
    shas = {}
    for pid in used:
        a = bundle.artifact(pid, choice.run_backend, choice.target)
        shas[pid] = a.sha256
    backend_info = _runner_info(ex, used[0])
    method = {"warmup_s": settings.warmup_s, "warmup_calls": settings.warmup_calls,
              "min_iters": settings.min_iters, "max_iters": settings.max_iters,
              "target_p95_rse": settings.target_rse, "max_seconds": settings.max_seconds,
              "quick": settings.quick, "run_as": f"{choice.run_backend}/{choice.target}",
              **backend_info}
    rng = np.random.default_rng(seed)
    pieces: dict[int, dict[str, Stats]] = {}
    cumulative: dict[int, dict[str, list[Stats]]] = {}
    sums: dict[int, dict[str, list[float]]] = {}
    info: dict[int, dict[str, dict]] = {}
    entries: list[LatencyEntry] = []
    created = utc_now_iso()
    for b in batches:
        x = rng.standard_normal((b, *m.input.shape)).astype(np.float32)
        feeds = _piece_feeds(ex, m, x)
        say(f"batch {b}: {len(used)} pieces")
        res_p = measure_items([(pid, _timed_piece(ex.runner(pid), feeds[pid])) for pid in used],
                              settings, say)
        say(f"batch {b}: {len(m.skip_configs)} skip configs, chained through the runtime")
        res_c = measure_items([(cfg, _timed_chain(ex, cfg, x, m.stages, m.input.name))
                               for cfg in m.skip_configs], settings, say)
        pieces[b] = {pid: res_p[pid][0][0] for pid in used}
        cumulative[b] = {cfg: res_c[cfg][0] for cfg in m.skip_configs}
        sums[b] = {}
        for cfg in m.skip_configs:
            acc, row = 0.0, []
            for seg in m.execution[cfg]:
                acc += sum(pieces[b][pid].p50 for pid in seg)
                row.append(acc)
            sums[b][cfg] = row
        info[b] = {"pieces": {pid: res_p[pid][1] for pid in used},
                   "chains": {cfg: res_c[cfg][1] for cfg in m.skip_configs}}
        for pid in used:
            meas = {"what": "one backend call of the piece", **method, **info[b]["pieces"][pid],
                    "artifact_sha256": shas[pid]}
            entries.append(measured_entry(pieces[b][pid], device=profile.name,
                                          backend=choice.backend, target=choice.target, batch=b,
                                          fingerprint={**fp, "measurement": meas}, piece=pid,
                                          created=created))
        for cfg in m.skip_configs:
            for k, s in enumerate(cumulative[b][cfg]):
                meas = {"what": "runtime chain to this exit: input prep, run_segment of segments "
                                "0..exit, softmax+max stopping decision after each exit",
                        **method, **info[b]["chains"][cfg],
                        "sum_of_piece_p50_ms": round(sums[b][cfg][k], 6),
                        "overhead_p50_ms": round(s.p50 - sums[b][cfg][k], 6)}
                entries.append(measured_entry(s, device=profile.name, backend=choice.backend,
                                              target=choice.target, batch=b,
                                              fingerprint={**fp, "measurement": meas}, exit=k,
                                              skip_config=cfg, created=created))
    seconds = time.perf_counter() - t_start
    say(f"measured {len(entries)} latency entries in {seconds:.1f} s")
    return ProfileResult(bundle=bundle.root, model=m.model.name, device=profile.name,
                         backend=choice.backend, target=choice.target, batches=batches,
                         skip_configs=list(m.skip_configs), stages=m.stages, pieces=pieces,
                         cumulative=cumulative, sum_of_pieces=sums, info=info, fingerprint=fp,
                         entries=entries, seconds=seconds, settings=settings, notes=notes)
