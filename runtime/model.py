"""AdaptiveModel: the on-device API. Load a bundle, predict with early exits under a deadline.

::

    from runtime import AdaptiveModel
    model = AdaptiveModel.load("bundle-x86-host")          # picks a backend usable here
    p = model.predict(image_uint8_hwc, budget_ms=5.0)      # -> Prediction
    ps = model.predict(batch_uint8_nhwc)                   # -> list[Prediction], input order

Imports only the standard library, numpy and (lazily, when the first session is opened) the one
backend chosen. Everything it needs to know about the device comes from the bundle's manifest;
it imports nothing else of this project (never torch, train/, export/ or devices/). See docs/runtime.md.
"""
from __future__ import annotations

import logging
import math
import operator
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np

from runtime.bundle import Bundle
from runtime.deadline import (EPS_MS, Clock, LatencyModel, LatencyTable, OnlineLatency,
                              answer_key, check_budget, span_key)
from runtime.executor import SegmentExecutor
from runtime.host import usable_cores
from runtime.exits import normalised_entropy
from runtime.preprocess import prepare_input
from runtime.rules import EntropyRule, FullDepthRule, MaxProbRule, PatienceRule, StopContext
from runtime.routing import DEFAULT_EPSILON, STOP, RouterRule
from runtime.selection import (BackendChoice, BackendStatus, BackendUnavailableError,
                               UnknownDeviceError, diagnose_backends, select_backend)
from runtime.errors import UsageError

__all__ = ["AdaptiveModel", "Prediction", "BackendChoice", "BackendUnavailableError",
           "BackendFallbackWarning", "UnknownDeviceError", "select_backend", "softmax",
           "BackendStatus", "diagnose_backends"]

log = logging.getLogger("runtime")

class BackendFallbackWarning(RuntimeWarning):
    """The preferred backend(s) of the bundle's device profile were skipped on this machine."""


# ---------------------------------------------------------------------------------------------
# predictions
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Prediction:
    """One sample's answer.

    ``exit_index`` is 0-based (exit k follows stage k); ``depth`` = exit_index + 1 stages ran.
    ``latency_ms`` is the wall time from the start of the ``predict`` call (preprocessing
    included) until this sample's answer was ready. ``deadline_missed`` is True when a budget
    was given and the latency exceeded it (when even the first exit is predicted not to fit,
    the first exit is answered and flagged only if it then ran over).
    """
    class_id: int
    class_name: str
    probabilities: np.ndarray
    exit_index: int
    depth: int
    skip_config: str
    latency_ms: float
    deadline_missed: bool = False
    budget_ms: Optional[float] = None
    stopped_by: str = "rule"  # "rule" | "deadline" | "last_exit"

    @property
    def confidence(self) -> float:
        """Probability of the predicted class."""
        return float(self.probabilities[self.class_id])

    def to_dict(self) -> dict:
        """JSON-able dict (probabilities as a list of floats)."""
        return {"class_id": self.class_id, "class_name": self.class_name,
                "confidence": self.confidence, "exit_index": self.exit_index,
                "depth": self.depth, "skip_config": self.skip_config,
                "latency_ms": self.latency_ms, "deadline_missed": self.deadline_missed,
                "budget_ms": self.budget_ms, "stopped_by": self.stopped_by,
                "probabilities": [float(p) for p in self.probabilities]}


def normalisation_table(mean, std) -> np.ndarray:
    """(256, C) float32: ``table[v, c]`` is what :func:`runtime.preprocess.normalize` makes of
    pixel value v in channel c (same constants, same float32 operations: ``v * scale - shift``),
    so normalising a uint8 image is a lookup with bit-identical results."""
    c = len(std)
    std32 = np.asarray(std, dtype=np.float32).reshape(1, c)
    mean32 = np.asarray(mean, dtype=np.float32).reshape(1, c)
    scale = np.float32(1.0) / (np.float32(255.0) * std32)
    levels = np.arange(256, dtype=np.uint8).reshape(256, 1).astype(np.float32)
    return levels * scale - mean32 / std32


_new_object = object.__new__


def _prediction(class_id: int, class_name: str, probabilities: np.ndarray, exit_index: int,
                skip_config: str, latency_ms: float, deadline_missed: bool,
                budget_ms: Optional[float], stopped_by: str) -> Prediction:
    """``Prediction(...)`` without the frozen dataclass's generated ``__init__`` (one
    ``object.__setattr__`` per field, ~1 us at batch 1): the same fields in the instance dict,
    the same frozen object afterwards."""
    p = _new_object(Prediction)
    p.__dict__.update(class_id=class_id, class_name=class_name, probabilities=probabilities,
                      exit_index=exit_index, depth=exit_index + 1, skip_config=skip_config,
                      latency_ms=latency_ms, deadline_missed=deadline_missed,
                      budget_ms=budget_ms, stopped_by=stopped_by)
    return p


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32 (max-subtracted: exact to float32 rounding)."""
    z = np.array(logits, dtype=np.float32)  # a private copy: the steps below work in place
    if z.ndim == 2 and z.shape[0] == 1:  # batch 1: whole-array reductions, same values
        z -= z.max()
        np.exp(z, out=z)
        z /= z.sum()
    else:
        z -= z.max(axis=-1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=-1, keepdims=True)
    return z


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------

RuleLike = Union[None, str, Any]

_UINT8, _FLOAT32 = np.dtype(np.uint8), np.dtype(np.float32)
ANSWER_KEY_1 = answer_key(1)
_ONE = np.float32(1.0)
_isfinite = math.isfinite
#: Built-in rules whose stop() reads nothing from the StopContext but ``num_exits``.
_CTX_FREE_RULES = (MaxProbRule, EntropyRule, PatienceRule, FullDepthRule)
#: Threshold rules decided inline at exits k < S-1 (exact type only; a subclass may override
#: stop()): MaxProbRule stops when top_prob(p) >= thresholds[k], EntropyRule when
#: normalised_entropy(p) <= thresholds[k] (NaN thresholds never stop), as their stop() does.
_MAX_PROB_INLINE = (lambda p: p.max(axis=-1), operator.ge)  # top_prob(p) >= t
_INLINE_RULES = {MaxProbRule: _MAX_PROB_INLINE, EntropyRule: (normalised_entropy, operator.le)}


class _LazyStopContext(StopContext):
    """A StopContext whose ``segment_ms`` is computed (current figures) only when read."""

    def __init__(self, model: "AdaptiveModel", skip_config: str) -> None:  # noqa: D107
        self._model = model
        self._num_exits = model.stages
        self.skip_config = skip_config

    @property
    def num_exits(self) -> int:  # type: ignore[override]
        return self._num_exits

    @property
    def segment_ms(self):  # type: ignore[override]
        return StopContext(segment_ms=self._model.segment_costs_ms(self.skip_config)).segment_ms


class AdaptiveModel:
    """A loaded bundle ready to predict with early exits, a stopping rule and a deadline.

    Build it with :meth:`load`. Thread-safe: the executor and its sessions are shared, each
    call keeps its own tensors; the only mutable state is the online latency statistics and a
    cache of rule objects, both guarded by locks.
    """

    def __init__(self, bundle: Bundle, executor: Any, *, choice: Optional[BackendChoice] = None,
                 clock: Optional[Clock] = None, latency: str = "auto",
                 latency_device: Optional[str] = None) -> None:
        if latency not in ("auto", "table", "online"):
            raise UsageError(f"latency must be 'auto', 'table' or 'online', got {latency!r}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.executor = executor
        self.choice = choice
        self.clock: Clock = clock or time.perf_counter
        m = self.manifest
        self.stages = m.stages
        self.class_names = list(m.class_names)
        self.num_classes = m.model.num_classes
        self.input_shape = tuple(m.input.shape)
        self.skip_configs = list(m.skip_configs)
        library = choice.library if choice else "onnxruntime"
        target = choice.target if choice else None
        dev = latency_device or (choice.device if choice else None) or m.device
        if dev is None:  # portable bundle: a table for exactly one device is usable as is
            devs = sorted({e.device for e in m.latency if e.backend == library})
            dev = devs[0] if len(devs) == 1 else None
        self.latency_device = dev
        self.table = LatencyTable(m, dev, library, target)
        if latency == "table" and not self.table:
            raise UsageError(f"{bundle.manifest_path}: no latency table for device {dev!r} and "
                             f"backend {library!r} (use latency='auto' or 'online')")
        self.online = OnlineLatency()
        self.latency = LatencyModel(m, self.table, self.online, use_table=latency != "online")
        self._rules: dict[str, Any] = {}
        self._rules_lock = threading.Lock()
        self.skip_accuracy = self._read_skip_accuracy()
        self._ranked = self._rank_configs()
        self.default_skip_config = self._default_config()
        self._default_rule = self._rule_from_manifest()
        # per-call constants of predict(), computed once
        self._skip_set = frozenset(self.skip_configs)
        self._input_name = m.input.name
        self._lazy_ctx: dict[str, StopContext] = {}
        self._merged_full: dict[str, bool] = {}
        C, H, W = (int(d) for d in self.input_shape)
        self._mean, self._std = list(m.input.mean), list(m.input.std)
        self._chw, self._nchw = (C, H, W), (1, C, H, W)
        self._hwc, self._nhwc = (H, W, C), (1, H, W, C)
        self._hw = (H, W) if C == 1 else None
        self._lut = normalisation_table(self._mean, self._std)  # (256, C) float32
        self._lut1 = self._lut[:, 0].copy() if C == 1 else None
        self._channels = np.arange(C)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def load(cls, bundle_dir: Union[str, os.PathLike], backend: Optional[str] = None,
             device: Optional[str] = None, *, runner_options: Optional[Mapping[str, Any]] = None,
             clock: Optional[Clock] = None, latency: str = "auto", warm: bool = True,
             warn: bool = True) -> "AdaptiveModel":
        """Open ``bundle_dir`` (verifying every checksum) and pick artifacts usable here.

        ``bundle_dir`` may also be a bundle archive (``.tar.gz``): it is unpacked once through
        the safe unpacker into a cache keyed by its sha256 (``runtime.archive.unpacked_bundle``).

        ``backend``: None = the deployment record's order with fallback (see
        :func:`select_backend`); "onnxruntime", "tvm", "tensorrt" or "onnx" to force one.
        ``device``: whose latency table to read (default: the bundle's profile; else a device
        of its latency tables). ``runner_options``: runner options overriding the deployment
        record's (e.g. ``{"intra_op_threads": 1}``; unknown keys are refused). ``clock``: seconds, monotonic (tests inject a fake
        one). ``latency``: "auto" (the bundle's table if any, else measure as you go),
        "table" (require one) or "online" (ignore the table). ``warm``: open every session
        now. ``warn``: emit a :class:`BackendFallbackWarning` when preferred backends were
        skipped (``model.choice.skipped`` always has the reasons).
        """
        if str(bundle_dir).endswith((".tar.gz", ".tgz")):
            from runtime.archive import is_archive, unpacked_bundle
            if is_archive(bundle_dir):  # unpacked once, safely, into the cache
                bundle_dir = unpacked_bundle(bundle_dir)
        bundle = Bundle.open(bundle_dir, verify=True)
        choice = select_backend(bundle, backend, device)
        for note in choice.notes:
            log.info("%s", note)
        if choice.skipped:
            msg = f"{bundle.root.name}: using {choice.describe()}"
            if bundle.manifest.device is None:  # portable bundle: nothing was compiled to skip
                log.info("%s", msg)
            else:
                log.warning("%s", msg)
                if warn and backend is None:
                    warnings.warn(msg, BackendFallbackWarning, stacklevel=2)
        options = {**choice.options, **dict(runner_options or {})}
        executor = SegmentExecutor(bundle, choice.backend, choice.target, options=options)
        model = cls(bundle, executor, choice=choice, clock=clock, latency=latency,
                    latency_device=choice.device if device is not None else None)
        if warm:
            for cfg in model.skip_configs:
                executor.warm(cfg)
        return model

    def describe_backend(self) -> str:
        """What actually runs: backend, target and, for sessions already opened, the execution
        providers they use and the ones asked for that this machine lacks, e.g.
        ``onnxruntime (target aarch64-cuda) on CPUExecutionProvider; asked for but not
        available here: CUDAExecutionProvider``."""
        what = ("portable ONNX with onnxruntime" if self.backend == "onnx" else self.backend)
        text = f"{what} (target {self.target})"
        runners = list(getattr(self.executor, "_runners", {}).values())
        used = sorted({p for r in runners for p in (getattr(r, "providers", None) or [])})
        missing = sorted({p for r in runners for p in (getattr(r, "providers_missing", None) or [])})
        if used:
            text += f" on {', '.join(used)}"
        threads = {(getattr(r, "intra_op_threads", None), (getattr(r, "threads_requested", None)
                                                          or (None,))[0]) for r in runners}
        if len(threads) == 1:
            got, asked = threads.pop()
            if got:
                text += f", {got} intra-op thread{'s' if got != 1 else ''}"
                if asked and asked != got:
                    text += f" ({asked} asked; {usable_cores()} usable cores)"
        if missing:
            text += f"; asked for but not available here: {', '.join(missing)}"
        return text

    # -- manifest-derived defaults ---------------------------------------------------------------

    def _read_skip_accuracy(self) -> dict[str, float]:
        return dict(self.manifest.stopping.skip_accuracy)

    def _rank_configs(self) -> list[str]:
        """Skip configs, most accurate first: calibrated per-config validation accuracy
        (ties: fewer MACs first), else more MACs first."""
        last = self.stages - 1
        macs = {c: self.manifest.cumulative_macs(c, last) for c in self.skip_configs}
        if self.skip_accuracy:
            return sorted(self.skip_configs, key=lambda c: (-self.skip_accuracy[c], macs[c], c))
        return sorted(self.skip_configs, key=lambda c: (-macs[c], c))

    def _default_config(self) -> str:
        cfg = self.manifest.stopping.skip_config
        if cfg is not None:
            return cfg
        full = "F" * self.stages
        return full if full in self.skip_configs else self._ranked[0]

    def _rule_from_manifest(self):
        st = self.manifest.stopping
        if not st.calibrated:
            return None
        from runtime.rules import rule_from_stopping
        return rule_from_stopping(st)

    # -- public helpers --------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self.choice.backend if self.choice else getattr(self.executor, "backend", "?")

    @property
    def target(self) -> Optional[str]:
        return self.choice.target if self.choice else getattr(self.executor, "target", None)

    @property
    def rule_name(self) -> Optional[str]:
        """The calibrated rule's name (None: uncalibrated, predictions use full depth)."""
        return self.manifest.stopping.rule

    def __repr__(self) -> str:
        m = self.manifest
        return (f"AdaptiveModel({m.model.name!r}, stages={self.stages}, backend={self.backend!r}, "
                f"target={self.target!r}, device={m.device!r}, rule={self.rule_name!r})")

    def check_skip_config(self, skip_config: object) -> str:
        if not isinstance(skip_config, str) or skip_config not in self.skip_configs:
            raise UsageError(f"unknown skip config {skip_config!r} (this bundle has: "
                             f"{', '.join(self.skip_configs)})")
        return skip_config

    def resolve_rule(self, rule: RuleLike):
        """A StoppingRule object, a rule name, or None (the calibrated rule, or full depth).

        A name equal to the calibrated rule uses the calibrated parameters; another name is
        built without parameters, which only parameter-free rules allow ("full", "patience");
        unknown names and rules needing calibrated parameters raise ValueError.
        """
        if rule is None:
            return self._default_rule
        if isinstance(rule, str):
            cached = self._rules.get(rule)  # a dict read is atomic; the lock guards the writes
            if cached is not None:
                return cached
            if rule == self.rule_name and self._default_rule is not None:
                obj = self._default_rule
            else:
                from runtime.rules import RULES, make_rule
                if rule not in RULES:
                    raise UsageError(f"unknown rule {rule!r} (known: {', '.join(RULES)})")
                try:
                    obj = make_rule(rule, {})
                except ValueError as exc:
                    have = (f"the bundle is calibrated for {self.rule_name!r}"
                            if self.rule_name else "the bundle is not calibrated")
                    raise UsageError(f"rule {rule!r} needs calibrated parameters ({exc}); {have}: "
                                     f"run `pipeline calibrate --rule {rule}` or pass a "
                                     "StoppingRule object") from None
            with self._rules_lock:
                self._rules.setdefault(rule, obj)
            return obj
        if callable(getattr(rule, "stop", None)):
            return rule
        raise UsageError(f"rule: expected a StoppingRule (with a stop() method), a rule name or "
                         f"None, got {type(rule).__name__}")

    def choose_skip_config(self, budget_ms: Optional[float] = None, batch: int = 1) -> str:
        """The skip configuration for a budget.

        No budget: the default (the calibrated configuration, else full depth). With a budget:
        the most accurate configuration (per-config validation accuracy stored by
        ``pipeline calibrate``, else MACs order) whose full-depth p95 latency at ``batch`` fits;
        if none fits, the fastest one known; if no latency is known at all, the default.
        """
        budget = check_budget(budget_ms)
        if budget is None:
            return self.default_skip_config
        known: dict[str, float] = {}
        for cfg in self._ranked:
            t = self.latency.full_depth_ms(cfg, batch, "p95")
            if t is None:
                continue
            if t <= budget:
                return cfg
            known[cfg] = t
        if known:
            return min(known, key=lambda c: (known[c], self._ranked.index(c)))
        return self.default_skip_config

    def segment_costs_ms(self, skip_config: Optional[str] = None, batch: int = 1,
                         stat: str = "p50") -> list[float]:
        """Per-segment cost (ms) as the runtime sees it; unknown segments are filled in
        proportionally to their MACs (relative to the known ones, else 1 ms per GMAC)."""
        cfg = self.check_skip_config(skip_config or self.default_skip_config)
        costs = self.latency.segment_costs(cfg, batch, stat)
        macs = [self.latency.segment_macs(cfg, k) for k in range(self.stages)]
        known = [(c, m) for c, m in zip(costs, macs) if c is not None and m > 0]
        per_mac = (sum(c for c, _ in known) / sum(m for _, m in known)) if known else 1e-6
        return [float(c) if c is not None else float(m * per_mac) for c, m in zip(costs, macs)]

    # -- prediction ------------------------------------------------------------------------------

    def _stop_context(self, stop_rule, cfg: str) -> StopContext:
        """The StopContext a rule gets for ``cfg``.

        The built-in max_prob, entropy, patience and full rules read only ``num_exits`` from it,
        so they share one context per configuration whose ``segment_ms`` is computed only if
        something reads it. Any other rule (lookahead, user rules) gets the segment costs as
        they stand at the start of the call, as before.
        """
        if type(stop_rule) in _CTX_FREE_RULES:
            ctx = self._lazy_ctx.get(cfg)
            if ctx is None:
                ctx = self._lazy_ctx.setdefault(cfg, _LazyStopContext(self, cfg))
            return ctx
        return StopContext(segment_ms=self.segment_costs_ms(cfg), skip_config=cfg)

    def _prepare(self, x: Any) -> tuple[np.ndarray, bool]:
        """:func:`prepare_input`, with a shortcut for the two batch-1 shapes a camera loop
        passes (uint8 ``(H, W, C)`` / ``(H, W)``, float32 ``(C, H, W)``): same checks, same
        arithmetic (normalisation constants computed once), identical output. Anything else,
        or anything the shortcut cannot vouch for, goes through :func:`prepare_input`."""
        if type(x) is np.ndarray:
            dt = x.dtype
            if dt is _UINT8:
                if x.shape == self._hwc or x.shape == self._hw:
                    if self._lut1 is not None:  # one channel: NHWC -> NCHW is a reshape
                        return self._lut1.take(x.reshape(self._nchw)), False
                    z = self._lut[x.reshape(self._nhwc), self._channels]
                    return np.ascontiguousarray(z.transpose(0, 3, 1, 2)), False
            elif dt is _FLOAT32 and x.shape == self._chw:
                z = x.reshape(self._nchw)
                if not z.flags.c_contiguous:
                    z = np.ascontiguousarray(z)
                # a NaN or infinity anywhere makes the sum non-finite (one reduction, no
                # temporary array); a non-finite sum goes through prepare_input's full check,
                # which raises its usual error (or accepts finite values that overflowed the sum)
                if _isfinite(z.sum(dtype=np.float64)):
                    return z, False
        return prepare_input(x, self.input_shape, self._mean, self._std,
                             preprocess=self.manifest.input.raw.preprocess)

    def predict(self, x: Any, budget_ms: Optional[float] = None, rule: RuleLike = None,
                skip_config: Optional[str] = None):
        """Predict one sample (-> :class:`Prediction`) or a batch (-> list, input order).

        ``x``: uint8 pixels HWC (``(H, W, C)``, ``(N, H, W, C)``; grayscale ``(H, W)`` /
        ``(N, H, W)`` for 1-channel models), normalised here per the manifest; or float
        already-normalised model input NCHW (``(C, H, W)`` / ``(N, C, H, W)``).
        ``budget_ms``: deadline for the call (anytime prediction, see docs/runtime.md).
        ``rule``: StoppingRule, rule name, or None (calibrated rule; full depth if none).
        ``skip_config``: force a configuration (default: chosen for the budget).
        """
        clock = self.clock
        t0 = clock()
        budget = None if budget_ms is None else check_budget(budget_ms)
        if skip_config is not None and skip_config not in self._skip_set:
            self.check_skip_config(skip_config)  # raises
        stop_rule = self.resolve_rule(rule)
        batch, batched = self._prepare(x)
        n = batch.shape[0]
        if type(stop_rule) is RouterRule and skip_config is None:
            return self._predict_routed(stop_rule, batch, budget, t0, batched)
        cfg = skip_config if skip_config is not None else (
            self.default_skip_config if budget is None else self.choose_skip_config(budget, n))
        # Rules that cannot stop before the last exit (none, "full") are not asked, and then
        # the softmax is computed only for the exit that answers.
        decide = stop_rule is not None and type(stop_rule) is not FullDepthRule
        if n == 1 and not decide and budget is None:
            return self._full_depth_one(batch, cfg, t0, batched)
        ctx = self._stop_context(stop_rule, cfg) if decide else None
        # max_prob / entropy thresholds are applied here directly (no per-call validation of
        # arguments this loop builds itself); other rules are asked through stop()
        inline = _INLINE_RULES.get(type(stop_rule)) if decide else None
        run_segment = self.executor.run_segment
        segment_quantile = self.latency.segment_quantile
        q = 1.0 - DEFAULT_EPSILON
        # segment timings for the online statistics: with a budget each one is recorded at once
        # (the next deadline check of this call may need it), else all at the end of the call
        timings: list[tuple[tuple[str, int, int], float]] = []
        last = self.stages - 1
        results: list[Optional[Prediction]] = [None] * n
        active: Optional[np.ndarray] = None  # rows still running (None: all n, in order)
        tensors: dict[str, np.ndarray] = {self._input_name: batch}
        history: list[np.ndarray] = []  # softmax of exits 0..k for the active rows (decide)
        logits = probs = None
        first_miss = False
        limit = None if budget is None else budget + EPS_MS

        def finish(rows: Optional[np.ndarray], p: np.ndarray, k: int, why: str) -> None:
            """Answer ``rows`` (indices into the active rows; None: all) with exit k."""
            now_ms = (clock() - t0) * 1000.0
            missed = limit is not None and now_ms > limit
            idx = range(len(p)) if rows is None else rows
            for i in idx:
                row = p[i]
                cid = int(row.argmax())
                results[i if active is None else int(active[i])] = _prediction(
                    cid, self.class_names[cid], row.copy(), k, cfg, now_ms, missed, budget, why)

        for k in range(last + 1):
            m = n if active is None else len(active)
            if limit is not None:
                est = segment_quantile(cfg, k, m, q)
                if est is not None and (clock() - t0) * 1000.0 + est > limit:
                    if k > 0:  # answer with the exit we have (anytime prediction)
                        finish(None, probs if probs is not None else softmax(logits), k - 1,
                               "deadline")
                        break
                    first_miss = True  # even the first exit does not fit: answer with it
            ts = clock()
            logits = run_segment(cfg, k, tensors)
            timings.append(((cfg, k, m), (clock() - ts) * 1000.0))
            if limit is not None:
                self.latency.record_many(timings)
                timings.clear()
            probs = None
            if k == last:
                finish(None, softmax(logits), k, "last_exit")
                break
            if decide and m == 1 and inline is _MAX_PROB_INLINE and not first_miss:
                # batch-1 max_prob: softmax's own steps up to the sum s; the top probability is
                # exactly 1 / s (its exp is exp(0) = 1), so the full softmax is only computed
                # for an answer (here, or by a later deadline stop from `logits`)
                z = np.array(logits, dtype=np.float32)
                z -= z.max()
                np.exp(z, out=z)
                total = z.sum()
                if _ONE / total >= stop_rule._threshold(k):
                    z /= total
                    finish(None, z, k, "rule")
                    break
                continue
            if decide:
                probs = softmax(logits)
                history.append(probs)
                if inline is not None:  # what MaxProbRule/EntropyRule.stop compute for k < S-1
                    statistic, compare = inline
                    stop = compare(statistic(probs), stop_rule._threshold(k))
                else:
                    stop = np.asarray(stop_rule.stop(k, history, ctx), dtype=bool).reshape(-1)
                    if stop.shape != (m,):
                        raise RuntimeError(f"rule {type(stop_rule).__name__}.stop returned "
                                           f"shape {stop.shape}, expected ({m},)")
                stopped = (1 if stop[0] else 0) if m == 1 else int(np.count_nonzero(stop))
                if stopped == m:
                    finish(None, probs, k, "rule")
                    break
                if stopped:
                    if first_miss:  # the rule's rows leave by the rule, the others by the deadline
                        finish(np.flatnonzero(stop), probs, k, "rule")
                        finish(np.flatnonzero(~stop), probs, k, "deadline")
                        break
                    finish(np.flatnonzero(stop), probs, k, "rule")
                    keep = ~stop
                    active = (np.arange(n) if active is None else active)[keep]
                    tensors = {name: t[keep] for name, t in tensors.items()}
                    history = [h[keep] for h in history]
                    probs, logits = probs[keep], logits[keep]
            if first_miss:
                finish(None, probs if probs is not None else softmax(logits), k, "deadline")
                break
        if timings:
            self.latency.record_many(timings)
        return results if batched else results[0]

    def _predict_routed(self, rule: RouterRule, batch: np.ndarray, budget: Optional[float],
                        t0: float, batched: bool):
        """Joint routing (runtime/routing.py): the policy fitted for the budget picks, per
        sample and at each kept exit, stop or the variant of the next span; with a budget a
        span runs only when the elapsed time plus its ``1 - epsilon`` latency quantile fits
        (else the next ranked action; stopping always fits). Rows that choose the same action
        run together, so at batch > 1 every sample exits on its own."""
        clock = self.clock
        policy = rule.policy_for_budget(budget)
        limit = None if budget is None else budget + EPS_MS
        q = 1.0 - rule.epsilon
        S = self.stages
        n = batch.shape[0]
        results: list[Optional[Prediction]] = [None] * n
        run_span = self.executor.run_span
        span_quantile = self.latency.span_quantile
        timings: list = []
        names = self.class_names
        pad = "F" * S

        def finish(rows, p: np.ndarray, path: str, k: int, why: str) -> None:
            now_ms = (clock() - t0) * 1000.0
            missed = limit is not None and now_ms > limit
            cfg = path + pad[len(path):]
            for i, row in zip(rows, p):
                cid = int(row.argmax())
                results[i] = _prediction(cid, names[cid], row.copy(), k, cfg, now_ms, missed,
                                         budget, why)

        first, last = policy.spans[0]
        forced = False  # the first span does not fit the budget: it runs, and answers
        answer_ms = 0.0  # the time from the last span to the answer, at the same quantile
        if limit is not None:
            answer_ms = self.latency.answer_quantile(n, q)
            est = span_quantile(first, last, policy.start, n, q)
            forced = est is not None and (clock() - t0) * 1000.0 + est + answer_ms > limit
        if n == 1:
            p = self._route_one(policy, batch, t0, limit, q, forced, budget, answer_ms)
            return [p] if batched else p
        groups = [(list(range(n)), policy.start, {self._input_name: batch})]
        while groups:
            rows, path, tensors = groups.pop()
            m = len(rows)
            e = len(path) - 1
            ts = clock()
            span = self._span_of(policy, path)
            logits = run_span(span[0], span[1], path[span[0]:], tensors, path[:span[0]])
            timings.append((span_key(span[0], span[1], path[span[0]:], m),
                            (clock() - ts) * 1000.0))
            if limit is not None:
                self.latency.record_many(timings)
                timings.clear()
            probs = softmax(logits)
            nxt = policy.next_span(e)
            if nxt is None:
                finish(rows, probs, path, e, "last_exit")
                continue
            if forced:
                finish(rows, probs, path, e, "deadline")
                continue
            if m == 1:  # one sample: a bisect on the break points, no index arrays
                choices = [(None, policy.ranked(path, float(probs[0].max())))]
            else:
                lists = policy.ranked_lists(path)
                j = policy.interval(path, probs.max(axis=-1))
                choices = [(np.flatnonzero(j == jj), lists[int(jj)]) for jj in np.unique(j)]
            for sel, ranked in choices:
                action, why = STOP, "rule"
                for a in ranked:
                    if a == STOP:
                        break
                    if limit is not None:
                        est = span_quantile(nxt[0], nxt[1], a, m if sel is None else len(sel), q)
                        if est is not None and (clock() - t0) * 1000.0 + est + answer_ms > limit:
                            why = "deadline"
                            continue
                    action = a
                    break
                sub_rows = rows if sel is None else [rows[i] for i in sel]
                if action == STOP:
                    finish(sub_rows, probs if sel is None else probs[sel], path, e, why)
                else:
                    sub_t = tensors if sel is None else {k: t[sel] for k, t in tensors.items()}
                    groups.append((sub_rows, path + action, sub_t))
        if timings:
            self.latency.record_later(timings)
        return results if batched else results[0]

    def _route_one(self, policy, batch: np.ndarray, t0: float, limit: Optional[float], q: float,
                   forced: bool, budget: Optional[float], answer_ms: float = 0.0) -> Prediction:
        """:meth:`_predict_routed` for one sample: the same decisions, scalars instead of row
        groups, and the softmax computed in full only for the exit that answers (the top
        probability is ``1 / sum(exp(z - max z))``)."""
        clock = self.clock
        run_span = self.executor.run_span
        tensors = {self._input_name: batch}
        timings = []
        path = policy.start
        first, last = policy.spans[0]
        while True:
            variant = path[first:]
            ts = clock()
            logits = run_span(first, last, variant, tensors, path[:first])
            te = clock()
            timings.append((span_key(first, last, variant, 1), (te - ts) * 1000.0))
            if limit is not None:
                self.latency.record_many(timings)
                timings.clear()
            z = np.array(logits[0], dtype=np.float32)
            z -= z.max()
            np.exp(z, out=z)
            total = z.sum()
            nxt = policy.next_span(last)
            if nxt is None:
                why = "last_exit"
                break
            if forced:
                why = "deadline"
                break
            action, why = STOP, "rule"
            for a in policy.ranked(path, float(_ONE / total)):
                if a == STOP:
                    break
                if limit is not None:
                    est = self.latency.span_quantile(nxt[0], nxt[1], a, 1, q)
                    if est is not None and (clock() - t0) * 1000.0 + est + answer_ms > limit:
                        why = "deadline"
                        continue
                action = a
                break
            if action == STOP:
                break
            path += action
            first, last = nxt
        z /= total
        cid = int(z.argmax())
        end = clock()
        now_ms = (end - t0) * 1000.0
        S = self.stages
        p = _prediction(cid, self.class_names[cid], z, last, path + "F" * (S - len(path)), now_ms,
                        limit is not None and now_ms > limit, budget, why)
        if limit is not None:  # what answering took after the last span (the deadline adds it)
            timings.append((ANSWER_KEY_1, (end - te) * 1000.0))
        if timings:
            self.latency.record_later(timings)
        return p

    def _has_merged_full(self, cfg: str) -> bool:
        """Whether ``cfg`` at full depth runs as one merged artifact (cached per config)."""
        hit = self._merged_full.get(cfg)
        if hit is None:
            has = getattr(self.executor, "has_merged", None)
            hit = self._merged_full[cfg] = bool(has and has(0, self.stages - 1, cfg))
        return hit

    @staticmethod
    def _span_of(policy, path: str) -> tuple[int, int]:
        """The span that ends at the exit ``path`` reaches."""
        last = len(path) - 1
        for f, l in policy.spans:
            if l == last:
                return f, l
        raise AssertionError(f"path {path!r} does not end at a kept exit {policy.exits}")

    def _full_depth_one(self, batch: np.ndarray, cfg: str, t0: float, batched: bool):
        """What :meth:`predict`'s general loop does for one sample, no budget and a rule that
        never stops early (none, "full"): every segment, the last exit answers. Without the
        loop's per-segment bookkeeping (a few us at batch 1)."""
        clock = self.clock
        tensors = {self._input_name: batch}
        timings = []
        last = self.stages - 1
        if self._has_merged_full(cfg):  # the whole network as one artifact: one backend call
            ts = clock()
            logits = self.executor.run_span(0, last, cfg, tensors)
            timings.append((span_key(0, last, cfg, 1), (clock() - ts) * 1000.0))
        else:
            run_segment = self.executor.run_segment
            for k in range(self.stages):
                ts = clock()
                logits = run_segment(cfg, k, tensors)
                timings.append(((cfg, k, 1), (clock() - ts) * 1000.0))
        row = softmax(logits)[0]  # a fresh (1, C) array's only row: no copy needed
        cid = int(row.argmax())
        p = _prediction(cid, self.class_names[cid], row, self.stages - 1, cfg,
                        (clock() - t0) * 1000.0, False, None, "last_exit")
        self.latency.record_later(timings)  # applied before any read of the figures
        return [p] if batched else p

    # -- whole-depth evaluation (calibration, tools) ---------------------------------------------

    def exit_probabilities(self, x: Any, skip_config: Optional[str] = None,
                           batch_size: int = 256) -> np.ndarray:
        """Probabilities of every exit for every sample: float32 (S, N, C), no early stopping.

        ``x`` follows the :meth:`predict` conventions (a single sample gives N = 1).
        """
        cfg = self.check_skip_config(skip_config or self.default_skip_config)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        batch, _ = prepare_input(x, self.input_shape, self.manifest.input.mean,
                                 self.manifest.input.std,
                                 preprocess=self.manifest.input.raw.preprocess)
        out = []
        for i in range(0, batch.shape[0], batch_size):
            logits = self.executor.run_exits(batch[i:i + batch_size], cfg)
            out.append(np.stack([softmax(z) for z in logits]))
        return np.concatenate(out, axis=1)

    def profile_segments(self, skip_config: Optional[str] = None, runs: int = 20,
                         warmup: int = 3, stat: str = "p50") -> list[float]:
        """Quick batch-1 timing of every segment on random input (ms, ``stat`` over ``runs``).

        The timings also feed the online latency statistics.
        """
        cfg = self.check_skip_config(skip_config or self.default_skip_config)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, *self.input_shape)).astype(np.float32)
        times = [[] for _ in range(self.stages)]
        for r in range(warmup + runs):
            tensors = {self.manifest.input.name: x}
            for k in range(self.stages):
                ts = time.perf_counter()
                self.executor.run_segment(cfg, k, tensors)
                ms = (time.perf_counter() - ts) * 1000.0
                if r >= warmup:
                    times[k].append(ms)
                    self.latency.record(cfg, k, 1, ms)
        if stat == "mean":
            return [float(np.mean(t)) for t in times]
        return [float(np.percentile(t, float(stat.lstrip("p")))) for t in times]

