"""Test-set evaluation of a bundle through the runtime: adaptive rules, budgets, static
sub-networks, and the whole model as one ONNX Runtime session (the monolithic baseline).

Two kinds of numbers, always labelled:

* **measured** end to end at batch 1 (:func:`measure_headline`): each test image goes through
  ``AdaptiveModel.predict`` (preprocessing, segments, stopping rule, deadline) and through the
  monolithic session, the variants taking turns image by image (interleaved, so background load
  on a shared machine hits them alike), with the same ONNX Runtime session options; and the
  budget sweep (:func:`budget_sweep`, :func:`measure_budget_sweep`): ``predict(img,
  budget_ms=B)`` for budgets from the first-exit p50 to the full-depth p99, interleaved the same
  way (random order per image) with the monolithic session;
* **simulated** (:func:`rule_curves`, :func:`budget_points`, :func:`static_points`): per-exit
  probabilities are computed once per skip configuration (:func:`config_probabilities`), the
  rules decide over them (``rule.stop_matrix``, exactly as the runtime decides sample by
  sample: rules are row-wise) and the latency of a sample is the measured cumulative mean
  latency to the exit it takes. Exact for the accuracy and the exits; the latency is the latency
  table's mean, not a new measurement.

The build imports torch only in :func:`export_monolithic`; everything else is numpy + runtime.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from runtime.errors import UsageError

Progress = Optional[Callable[[str], None]]

__all__ = ["config_probabilities", "export_monolithic", "MonolithicSession", "latency_stats",
           "static_points", "rule_curves", "budget_points", "default_budgets", "measure_headline",
           "macs_fraction", "simulate_exits", "operating_point", "CDF_PERCENTILES",
           "latency_cdf", "sweep_budgets", "measure_budget_sweep", "best_static_fits",
           "budget_sweep", "SWEEP_DEFAULT_LIMIT"]


# ---------------------------------------------------------------------------------------------
# per-exit probabilities of every skip configuration (prefixes shared)
# ---------------------------------------------------------------------------------------------

def config_probabilities(model, x: np.ndarray, configs: Optional[Sequence[str]] = None, *,
                         batch_size: int = 256, progress: Progress = None) -> dict[str, np.ndarray]:
    """``{skip_config: float32 (S, N, C)}`` softmax of every exit, no early stopping.

    ``model``: a runtime ``AdaptiveModel``; ``x``: uint8 NHWC images (or normalised float NCHW),
    as ``predict`` takes them. Configurations that share a prefix share its segments (exit k of
    a configuration depends only on its first k+1 letters), so the 2^S configurations cost
    2 + 4 + ... + 2^S segment runs instead of S * 2^S.
    """
    from runtime.model import softmax
    from runtime.preprocess import prepare_input

    m = model.manifest
    S = m.stages
    configs = list(configs or m.skip_configs)
    for cfg in configs:
        model.check_skip_config(cfg)
    n = len(x)
    C = m.model.num_classes
    out = {cfg: np.empty((S, n, C), dtype=np.float32) for cfg in configs}
    # group by prefix; a prefix is shared only where the plans agree on every segment of it
    groups: list[dict[str, list[str]]] = []
    for k in range(S):
        g: dict[str, list[str]] = {}
        for cfg in configs:
            key = cfg[:k + 1]
            if key in g and [p for seg in m.execution[g[key][0]][:k + 1] for p in seg] != \
                    [p for seg in m.execution[cfg][:k + 1] for p in seg]:
                key = cfg  # an unusual plan: do not share
            g.setdefault(key, []).append(cfg)
        groups.append(g)
    runs = sum(len(g) for g in groups)
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        batch, _ = prepare_input(x[i:i + batch_size], m.input.shape, m.input.mean, m.input.std)
        state: dict[str, dict] = {cfg: None for cfg in configs}  # tensors after the last segment
        start = {m.input.name: batch}
        for k in range(S):
            for key, members in groups[k].items():
                lead = members[0]
                tensors = dict(state[lead] if k else start)
                logits = model.executor.run_segment(lead, k, tensors)
                p = softmax(logits)
                for cfg in members:
                    out[cfg][k, i:i + len(batch)] = p
                    state[cfg] = tensors
    if progress:
        progress(f"  exit probabilities: {len(configs)} skip configs x {S} exits on {n} images "
                 f"({runs} segment runs per batch of {batch_size}) "
                 f"[{time.perf_counter() - t0:.1f} s]")
    return out


# ---------------------------------------------------------------------------------------------
# the monolithic baseline: the whole model as ONE ONNX graph and ONE session
# ---------------------------------------------------------------------------------------------

def export_monolithic(checkpoint: str | Path, out_path: str | Path, *, opset: int = 17,
                      exporter: str = "torchscript", parity_samples: int = 64,
                      data_root: Optional[str] = None) -> dict[str, Any]:
    """Export the full model (full depth, final exit only, nothing skipped) to one ONNX file,
    with the norm statistics of the path FF..F where the checkpoint has them per path.

    Checked like the pieces (onnx.checker, names, dynamic batch axis) and against torch on real
    validation images (max |logits diff| <= 1e-4). Returns ``{"macs", "params", "opset",
    "max_logits_diff", ...}``; ``macs`` is the monolithic model's MACs at batch 1 (stem, every
    stage with its skippable sub-path, the last head only).
    """
    import torch
    from torch import nn

    from export.onnx_export import check_onnx, export_module
    from export.portable import load_parity_images, normalize
    from train.checkpoint import model_from_checkpoint
    from train.models.macs import macs_per_exit

    model, state = model_from_checkpoint(checkpoint)
    model = model.float().eval()
    S = model.num_stages
    if state.get("path_norms"):
        from train.path_norms import load_path_stats
        with torch.no_grad():
            load_path_stats(model, state["path_norms"]["stats"]["F" * S])

    class Monolithic(nn.Module):
        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            h = self.net.forward_stem(x)
            for k in range(S):
                h = self.net.forward_stage(k, h, False)
            return self.net.forward_head(S - 1, h)

    mono = Monolithic(model).eval()
    info = state.get("dataset") or {}
    images, note = load_parity_images(state, parity_samples, data_root)
    x = normalize(images, info["mean"], info["std"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    used = export_module(mono, x[:2], out_path, input_name="x", output_names=["logits"],
                         opset=opset, exporter=exporter)
    onnx_info = check_onnx(out_path, input_names=["x"], output_names=["logits"], exporter=used)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = mono(x).numpy()
        full = model(x, (False,) * S)[-1].numpy()
    got = sess.run(["logits"], {"x": x.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    if not np.isfinite(diff) or diff > 1e-4 or float(np.abs(ref - full).max()) > 1e-4:
        raise ValueError(f"monolithic ONNX parity check failed: max |onnx - torch| = {diff:.3g} "
                         "(tolerance 1e-4)")
    return {"file": out_path.name, "macs": int(macs_per_exit(model, (False,) * S)[-1]),
            "params": int(sum(p.numel() for p in model.parameters())), "opset": onnx_info.opset,
            "exporter": onnx_info.exporter, "size_bytes": onnx_info.size_bytes,
            "max_logits_diff": diff, "parity_inputs": note,
            "what": "stem + every stage with its skippable sub-path + the last exit head"}


class MonolithicSession:
    """One ONNX Runtime session over the monolithic ONNX, with given session options.

    ``predict(img)`` does what ``AdaptiveModel.predict`` does around the network: the same
    input preparation (``runtime.preprocess.prepare_input``), one ``run``, softmax, argmax.
    """

    def __init__(self, path: str | Path, *, input_shape, mean, std, providers=None,
                 intra_op_threads: int = 0, inter_op_threads: int = 0,
                 graph_optimization_level: str = "all", provider_options=None,
                 bundle_dir: str | Path | None = None) -> None:
        import onnxruntime as ort

        from runtime.backends.onnxruntime_runner import available_providers, session_options
        from runtime.backends.provider_options import session_providers

        so = session_options(intra_op_threads, inter_op_threads, graph_optimization_level)
        chosen = session_providers(available_providers(providers), provider_options,
                                   Path(bundle_dir) if bundle_dir else None, path)
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
        self.input_shape, self.mean, self.std = list(input_shape), list(mean), list(std)
        self.options = {"providers": self.session.get_providers(),
                        "intra_op_threads": intra_op_threads, "inter_op_threads": inter_op_threads,
                        "graph_optimization_level": graph_optimization_level}

    @classmethod
    def like(cls, model, path: str | Path) -> "MonolithicSession":
        """A session with exactly the ONNX Runtime options ``model``'s piece runners got
        (the artifact's options, overridden by the executor's ``runner_options``)."""
        m = model.manifest
        ex = model.executor
        if ex.backend not in ("onnxruntime", "onnx"):
            raise UsageError(f"the monolithic baseline needs an onnxruntime bundle; this one runs "
                             f"{ex.backend}")
        first = m.execution[m.skip_configs[0]][0][0]
        opts = {**ex.bundle.artifact(first, ex.backend, ex.target).options, **ex.options}
        return cls(path, input_shape=m.input.shape, mean=m.input.mean, std=m.input.std,
                   providers=opts.get("providers"),
                   intra_op_threads=int(opts.get("intra_op_threads") or 0),
                   inter_op_threads=int(opts.get("inter_op_threads") or 0),
                   graph_optimization_level=opts.get("graph_optimization_level", "all"),
                   provider_options=opts.get("provider_options"), bundle_dir=ex.bundle.root)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"x": batch})[0]

    def predict(self, img: np.ndarray) -> int:
        from runtime.model import softmax
        from runtime.preprocess import prepare_input

        batch, _ = prepare_input(img, self.input_shape, self.mean, self.std)
        p = softmax(self.session.run(["logits"], {"x": batch})[0])
        return int(np.argmax(p[0]))

    def correct(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """1.0 where the network's argmax is the label, else 0.0, per image."""
        from runtime.preprocess import prepare_input

        out = np.zeros(len(x), dtype=np.float64)
        for i in range(0, len(x), batch_size):
            batch, _ = prepare_input(x[i:i + batch_size], self.input_shape, self.mean, self.std)
            out[i:i + batch_size] = self.logits(batch).argmax(axis=1) == y[i:i + batch_size]
        return out

    def accuracy(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
        return float(self.correct(x, y, batch_size).mean()) if len(x) else 0.0


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------

#: the percentiles at which :func:`latency_cdf` keeps a latency distribution: every 0.5 % and a
#: denser tail (99.6 ... 99.99), 207 numbers per variant instead of one per call
CDF_PERCENTILES: tuple[float, ...] = tuple(sorted(
    {round(0.5 * i, 2) for i in range(201)} | {99.6, 99.7, 99.8, 99.9, 99.95, 99.99}))


def latency_cdf(ms: Sequence[float]) -> list[float]:
    """The measured per-call times at :data:`CDF_PERCENTILES` (ms, rounded to 1 us): the
    empirical CDF of a variant, compact enough for results.json (``percentiles[i]`` % of the
    calls took at most ``cdf[i]`` ms; linear interpolation between order statistics)."""
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return []
    return [round(float(v), 3) for v in np.percentile(a, CDF_PERCENTILES)]


def latency_stats(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    if a.size == 0:
        return {k: math.nan for k in ("mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")}
    return {"mean_ms": float(a.mean()), "p50_ms": float(np.percentile(a, 50)),
            "p90_ms": float(np.percentile(a, 90)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def macs_fraction(manifest, configs: Sequence[str], exits: Sequence[int], mono_macs: int) -> float:
    """Mean MACs actually spent (cumulative to the exit taken, every head passed included)
    divided by the monolithic model's MACs."""
    cache: dict[tuple[str, int], int] = {}
    total = 0
    for cfg, k in zip(configs, exits):
        key = (cfg, int(k))
        if key not in cache:
            cache[key] = manifest.cumulative_macs(cfg, int(k))
        total += cache[key]
    return float(total / max(1, len(exits)) / max(1, mono_macs))


def _cum(table: dict, cfg: str, stat: str) -> np.ndarray:
    return np.array([row[stat] for row in table[cfg]], dtype=np.float64)


def simulate_exits(rule, probs: np.ndarray, segment_ms: Sequence[float]) -> np.ndarray:
    """The exit every sample takes under ``rule`` (exactly what the runtime decides)."""
    from export.simulate import first_exit_where
    from runtime.rules import StopContext

    return first_exit_where(rule.stop_matrix(probs, StopContext(segment_ms=list(segment_ms))))


def router_operating_point(rule, probs_by_cfg: dict[str, np.ndarray], y: np.ndarray, manifest,
                           table: dict, mono_macs: int) -> dict[str, Any]:
    """The router's default policy simulated on ``probs_by_cfg`` (export/routing_fit.py) with
    span costs from ``table`` (cumulative mean per config and exit): accuracy, mean latency,
    exits, paths and MACs fraction, as :func:`operating_point` reports them."""
    from export.routing_fit import RoutingData, simulate

    S = manifest.stages
    cum = {c: _cum(table, c, "mean") for c in table}

    def cost(first: int, last: int, variant: str) -> float:
        cfg = "F" * first + variant + "F" * (S - 1 - last)
        return float(cum[cfg][last] - (cum[cfg][first - 1] if first else 0.0))

    data = RoutingData(probs_by_cfg, y)
    out = simulate(rule.default_policy, data, cost, np.arange(len(y)))
    cfgs = [p + "F" * (S - len(p)) for p in out.path]
    return {"skip_config": "router", "accuracy": out.accuracy,
            "mean_latency_ms": out.mean_latency_ms,
            "p99_latency_ms": float(np.percentile(out.latency_ms, 99)),
            "mean_depth": float(out.exit.mean() + 1),
            "exit_histogram": np.bincount(out.exit, minlength=S).tolist(),
            "macs_fraction": macs_fraction(manifest, cfgs, out.exit, mono_macs),
            "paths": {p: int((out.path == p).sum()) for p in sorted(set(out.path))}}


def operating_point(probs: np.ndarray, y: np.ndarray, exits: np.ndarray, cum_mean: np.ndarray,
                    cum_p99: np.ndarray, manifest, cfg: str, mono_macs: int) -> dict[str, Any]:
    """Accuracy, latency (mean of the cumulative mean latency to the exit taken; p99 of the
    cumulative p99s), depth, exit histogram and MACs fraction of given per-sample exits."""
    n = len(y)
    pred = probs[exits, np.arange(n)].argmax(axis=1)
    lat = cum_mean[exits]
    S = probs.shape[0]
    return {"skip_config": cfg, "accuracy": float((pred == y).mean()),
            "mean_latency_ms": float(lat.mean()),
            "p99_latency_ms": float(np.percentile(cum_p99[exits], 99)),
            "mean_depth": float(exits.mean() + 1),
            "exit_histogram": np.bincount(exits, minlength=S).tolist(),
            "macs_fraction": macs_fraction(manifest, [cfg] * n, exits, mono_macs)}


def static_points(probs_by_cfg: dict[str, np.ndarray], y: np.ndarray, manifest, table: dict,
                  mono_macs: int) -> list[dict[str, Any]]:
    """Every static sub-network: each (skip config prefix, exit) at fixed depth.

    Exit k of a configuration depends only on its first k+1 letters, so the distinct static
    sub-networks are the prefixes (``"FT"`` + exit 1); each is listed once, with the accuracy of
    that exit, its measured cumulative latency (mean and p99, earlier heads included: this is
    what the segmented runtime spends to reach it) and its MACs (heads passed included).
    """
    seen: dict[str, dict] = {}
    for cfg, probs in probs_by_cfg.items():
        for k in range(probs.shape[0]):
            prefix = cfg[:k + 1]
            if prefix in seen:
                continue
            acc = float((probs[k].argmax(axis=1) == y).mean())
            seen[prefix] = {"prefix": prefix, "skip_config": cfg, "exit": k,
                            "accuracy": acc, "mean_latency_ms": float(table[cfg][k]["mean"]),
                            "p99_latency_ms": float(table[cfg][k]["p99"]),
                            "macs": int(manifest.cumulative_macs(cfg, k)),
                            "macs_fraction": manifest.cumulative_macs(cfg, k) / max(1, mono_macs)}
    return sorted(seen.values(), key=lambda d: (d["exit"], d["prefix"]))


def rule_curves(rules: Sequence[str], max_drops: Sequence[float], val_probs: np.ndarray,
                val_y: np.ndarray, test_probs: np.ndarray, test_y: np.ndarray, cfg: str,
                segment_p50: Sequence[float], table: dict, manifest, mono_macs: int, *,
                drop_offset_points: float = 0.0,
                progress: Progress = None) -> list[dict[str, Any]]:
    """Each rule calibrated on the validation probabilities at each ``max_drop`` target (with
    the same costs the runtime uses), then simulated on the test probabilities.

    ``max_drop`` is relative to the reference full depth (FF..F); ``drop_offset_points`` is how
    many validation points ``cfg``'s own full depth is below it, so the rule gets
    ``max_drop - offset`` points of room (targets with no room are left out), as the build's
    calibration does."""
    from export.calibration import calibrate
    from runtime.rules import make_rule

    cum_mean, cum_p99 = _cum(table, cfg, "mean"), _cum(table, cfg, "p99")
    out = []
    t0 = time.perf_counter()
    for rule_name in rules:
        for d in max_drops:
            room = float(d) - float(drop_offset_points)
            if room < 0:
                continue
            res = calibrate(rule_name, val_probs, val_y, list(segment_p50), max_drop=room)
            rule = make_rule(res.rule_name, res.params)
            exits = simulate_exits(rule, test_probs, segment_p50)
            pt = operating_point(test_probs, test_y, exits, cum_mean, cum_p99, manifest, cfg,
                                 mono_macs)
            pt.update(rule=rule_name, fitted_rule=res.rule_name, max_drop=float(d),
                      room_points=room,
                      val_accuracy=res.val_accuracy, val_full_depth_accuracy=res.full_depth_accuracy,
                      params=res.params, kind="simulated")
            out.append(pt)
    if progress:
        progress(f"  rule curves: {len(rules)} rules x {len(max_drops)} targets calibrated on "
                 f"{len(val_y)} validation images, simulated on {len(test_y)} test images "
                 f"[{time.perf_counter() - t0:.1f} s]")
    return out


def default_budgets(table: dict, cfg: str, count: int = 3) -> list[float]:
    """``count`` budgets evenly between the first-exit p95 and the full-depth p95 of ``cfg``
    (exclusive), rounded to 3 significant digits."""
    lo, hi = float(table[cfg][0]["p95"]), float(table[cfg][-1]["p95"])
    if hi <= lo:
        hi = lo * 1.5
    out = []
    for i in range(1, count + 1):
        b = lo + (hi - lo) * i / (count + 1)
        out.append(float(f"{b:.3g}"))
    return sorted(set(out))


def budget_points(model, budgets: Sequence[float], probs_by_cfg: dict[str, np.ndarray],
                  y: np.ndarray, table: dict, mono_macs: int) -> list[dict[str, Any]]:
    """The calibrated rule under each budget, simulated as the runtime runs it.

    The runtime picks the configuration for the budget (``choose_skip_config``), runs the rule,
    and before segment k stops everything still running when the elapsed time plus segment k's
    p95 would pass the budget. Simulated with the latency table: the elapsed time before segment
    k is the cumulative mean to exit k-1.
    """
    m = model.manifest
    S = m.stages
    rule = model.resolve_rule(None)
    out = []
    for b in budgets:
        cfg = model.choose_skip_config(b, 1)
        cum_mean, cum_p99 = _cum(table, cfg, "mean"), _cum(table, cfg, "p99")
        cap = 0
        for k in range(1, S):
            seg = model.latency.segment_ms(cfg, k, 1, "p95")
            if seg is None or cum_mean[k - 1] + seg > b:
                break
            cap = k
        probs = probs_by_cfg[cfg]
        if rule is None:
            exits = np.full(len(y), S - 1, dtype=np.int64)
        else:
            exits = simulate_exits(rule, probs, model.segment_costs_ms(cfg))
        exits = np.minimum(exits, cap)
        pt = operating_point(probs, y, exits, cum_mean, cum_p99, m, cfg, mono_macs)
        pt.update(budget_ms=float(b), deepest_exit_allowed=int(cap), kind="simulated",
                  rule=model.rule_name or "full")
        out.append(pt)
    return out


# ---------------------------------------------------------------------------------------------
# measured end to end at batch 1
# ---------------------------------------------------------------------------------------------

@dataclass
class InterleavedCalls:
    """What :func:`run_interleaved` measured: per call (variant v, image i) the wall time (ms)
    and, for ``Prediction`` answers, class, exit, configuration, the runtime's own latency and
    its ``deadline_missed`` flag (an ``int`` answer fills the class only; exit -1)."""
    times: np.ndarray
    classes: np.ndarray
    exits: np.ndarray
    cfgs: list[list[str]]
    own: np.ndarray
    flagged: np.ndarray
    seconds: float


def run_interleaved(calls: Sequence[Callable[[np.ndarray], Any]], x: np.ndarray, *,
                    warmup: int = 0, seed: Optional[int] = None, progress: Progress = None,
                    label: str = "measured", first_report: float = 0.25) -> InterleavedCalls:
    """Every image of ``x`` through every call before the next image, timed with
    ``time.perf_counter_ns`` around the call, after ``warmup`` untimed calls of each. The order
    of the calls rotates from image to image (``seed=None``) or is a fresh random permutation
    per image (numpy generator seeded with ``seed``), so background load and cache state hit
    every call alike. The heap that exists before is kept out of the cyclic GC meanwhile
    (``devices.profiler.frozen_heap``)."""
    from devices.profiler import frozen_heap

    with frozen_heap():
        return _run_interleaved(calls, x, warmup=warmup, seed=seed, progress=progress,
                                label=label, first_report=first_report)


def _run_interleaved(calls, x, *, warmup, seed, progress, label, first_report) -> InterleavedCalls:
    V, n = len(calls), len(x)
    for fn in calls:  # warm-up: sessions, caches, branch predictors
        for i in range(min(warmup, n)):
            fn(x[i])
    out = InterleavedCalls(times=np.zeros((V, n)), classes=np.zeros((V, n), dtype=np.int64),
                           exits=np.full((V, n), -1, dtype=np.int64),
                           cfgs=[[""] * n for _ in range(V)], own=np.zeros((V, n)),
                           flagged=np.zeros((V, n), dtype=bool), seconds=0.0)
    rng = None if seed is None else np.random.default_rng(seed)
    clock = time.perf_counter_ns
    t_start = time.perf_counter()
    next_report = first_report
    for i in range(n):
        img = x[i]
        order = ((i + j) % V for j in range(V)) if rng is None else rng.permutation(V)
        for v in order:
            t0 = clock()
            r = calls[v](img)
            t1 = clock()
            out.times[v, i] = (t1 - t0) * 1e-6
            if isinstance(r, (int, np.integer)):
                out.classes[v, i] = int(r)
            else:
                out.classes[v, i] = r.class_id
                out.exits[v, i] = r.exit_index
                out.cfgs[v][i] = r.skip_config
                out.flagged[v, i] = r.deadline_missed
                out.own[v, i] = r.latency_ms
        if progress and (i + 1) / n >= next_report:
            progress(f"  {label} {i + 1}/{n} images x {V} variants "
                     f"[{time.perf_counter() - t_start:.1f} s]")
            next_report += 0.25
    out.seconds = time.perf_counter() - t_start
    return out


def measure_headline(model, mono: MonolithicSession, x: np.ndarray, y: np.ndarray, *,
                     full_config: str, budget_ms: Optional[float], mono_macs: int,
                     warmup: int = 50, progress: Progress = None) -> dict[str, Any]:
    """Every test image at batch 1 through four variants, interleaved image by image:

    * ``monolithic``: the whole model as one ONNX Runtime session (same session options);
    * ``full_depth``: ``model.predict(img, rule="full", skip_config=FF..F)`` (segmented runtime);
    * ``adaptive``: ``model.predict(img)`` (the calibrated rule and configuration);
    * ``budget``: ``model.predict(img, budget_ms=B)`` (deadline + rule), when a budget is given.

    The time of each call is wall time around it (``time.perf_counter_ns``): preprocessing,
    segments, decisions, and the answer. The order of the variants rotates from image to image.
    """
    variants: list[tuple[str, Callable[[np.ndarray], Any]]] = [
        ("monolithic", mono.predict),
        ("full_depth", lambda img: model.predict(img, rule="full", skip_config=full_config)),
        ("adaptive", lambda img: model.predict(img)),
    ]
    if budget_ms is not None:
        variants.append(("budget", lambda img: model.predict(img, budget_ms=budget_ms)))
    n = len(y)
    m = run_interleaved([fn for _name, fn in variants], x[:n], warmup=warmup, progress=progress,
                        first_report=0.1)
    times, classes, exits, cfgs, missed, own = (m.times, m.classes, m.exits, m.cfgs, m.flagged,
                                                m.own)
    S = model.stages
    out: dict[str, Any] = {"n": n, "batch": 1, "interleaved": True, "warmup_calls": min(warmup, n),
                           "seconds": m.seconds, "variants": {},
                           "cdf": {"percentiles": list(CDF_PERCENTILES),
                                   "ms": {name: latency_cdf(times[v])
                                          for v, (name, _fn) in enumerate(variants)}}}
    for v, (name, _fn) in enumerate(variants):
        correct = classes[v] == y
        d: dict[str, Any] = {"accuracy": float(correct.mean()), **latency_stats(times[v])}
        if name == "monolithic":
            d["macs_fraction"] = 1.0
            d["session_options"] = mono.options
        else:
            d["exit_histogram"] = np.bincount(exits[v], minlength=S).tolist()
            d["mean_depth"] = float(exits[v].mean() + 1)
            d["macs_fraction"] = macs_fraction(model.manifest, cfgs[v], exits[v], mono_macs)
            used: dict[str, int] = {}
            for c in cfgs[v]:
                used[c] = used.get(c, 0) + 1
            d["skip_configs"] = used
            d["runtime_latency"] = latency_stats(own[v])
        if name == "budget":
            d["budget_ms"] = float(budget_ms)
            d["deadline_missed"] = int(missed[v].sum())
            d["over_budget"] = int((times[v] > budget_ms).sum())
        out["variants"][name] = d
    return out


# ---------------------------------------------------------------------------------------------
# budget sweep, measured end to end at batch 1
# ---------------------------------------------------------------------------------------------

#: test images of the measured budget sweep when ``[evaluate].measure_limit`` is 0
SWEEP_DEFAULT_LIMIT = 2000


def sweep_budgets(table: dict, count: int = 8) -> list[float]:
    """``count`` budgets spaced **geometrically** (equal ratios) from the first-exit p50 (the
    fastest configuration's exit 0: the least any call can cost) to the full-depth p99 (FF..F,
    last exit), both ends included, rounded to 4 significant digits.

    ``table``: ``runtime.latency.cumulative_table`` of the bundle that runs here (p50 and p99
    per configuration per exit)."""
    if count < 2:
        raise ValueError("a budget sweep needs at least 2 budgets")
    S = max(len(c) for c in table)
    lo = min(float(rows[0]["p50"]) for rows in table.values())
    hi = float(table["F" * S][-1]["p99"])
    if not (lo > 0 and math.isfinite(lo)):
        raise ValueError(f"first-exit p50 {lo!r} ms: no budget sweep possible")
    if not hi > lo:
        hi = 2.0 * lo
    out = [float(f"{lo * (hi / lo) ** (i / (count - 1)):.4g}") for i in range(count)]
    return sorted(set(out))


def measure_budget_sweep(model, x: np.ndarray, y: np.ndarray, budgets: Sequence[float], *,
                         warmup: int = 20, progress: Progress = None, seed: int = 0,
                         mono: Optional[MonolithicSession] = None) -> list[dict[str, Any]]:
    """``model.predict(img, budget_ms=B)`` for every budget B, MEASURED end to end at batch 1.

    Every image goes through every budget (and through the monolithic session ``mono`` when
    given) before the next image, in a random order per image (``numpy`` generator seeded with
    ``seed``), so that background load on a shared machine hits every budget alike. The time of
    a call is wall time around it (``time.perf_counter_ns``).

    One dict per budget, in increasing budget order: ``budget_ms``, ``n``, ``accuracy``,
    ``miss_rate`` (fraction of calls whose measured wall time exceeded B), ``misses``,
    ``deadline_flagged`` (calls the runtime itself flagged ``deadline_missed``),
    ``mean_ms``/``p50_ms``/``p90_ms``/``p95_ms``/``p99_ms``/``max_ms``, ``mean_depth``,
    ``exit_histogram``, ``skip_configs`` (configuration -> calls); with ``mono`` also
    ``monolithic_accuracy``, ``monolithic_mean_ms``, ``monolithic_p99_ms`` (the same for every
    row: one interleaved run) and ``latency_ratio_vs_monolithic`` (mean / monolithic mean).
    """
    budgets = sorted(float(b) for b in budgets)
    if not budgets:
        raise ValueError("no budgets to measure")
    n = len(y)
    if n == 0:
        raise ValueError("no images to measure")
    calls: list[Callable[[np.ndarray], Any]] = [
        (lambda img, b=b: model.predict(img, budget_ms=b)) for b in budgets]
    if mono is not None:
        calls.append(mono.predict)
    m = run_interleaved(calls, x[:n], warmup=warmup, seed=seed, progress=progress,
                        label="budget sweep:")
    times, classes, exits, flagged, cfgs = m.times, m.classes, m.exits, m.flagged, m.cfgs
    S = model.stages
    mono_row: dict[str, Any] = {}
    if mono is not None:
        mono_row = {"monolithic_accuracy": float((classes[-1] == y).mean()),
                    "monolithic_mean_ms": float(times[-1].mean()),
                    "monolithic_p99_ms": float(np.percentile(times[-1], 99))}
    out = []
    for v, b in enumerate(budgets):
        used: dict[str, int] = {}
        for c in cfgs[v]:
            used[c] = used.get(c, 0) + 1
        over = times[v] > b
        row: dict[str, Any] = {
            "budget_ms": b, "n": n, "accuracy": float((classes[v] == y).mean()),
            "miss_rate": float(over.mean()), "misses": int(over.sum()),
            "deadline_flagged": int(flagged[v].sum()), **latency_stats(times[v]),
            "mean_depth": float(exits[v].mean() + 1),
            "exit_histogram": np.bincount(exits[v], minlength=S).tolist(),
            "skip_configs": used, **mono_row}
        if mono_row:
            row["latency_ratio_vs_monolithic"] = (row["mean_ms"] / mono_row["monolithic_mean_ms"]
                                                  if mono_row["monolithic_mean_ms"] > 0 else None)
        out.append(row)
    return out


def best_static_fits(static: Sequence[dict], budget_ms: float, *,
                     stat: str = "p99_latency_ms") -> Optional[dict[str, Any]]:
    """The most accurate static sub-network (a :func:`static_points` entry: configuration
    prefix + exit) whose ``stat`` latency fits ``budget_ms``; the faster one on ties; None when
    none fits."""
    fits = [p for p in static if float(p[stat]) <= budget_ms]
    if not fits:
        return None
    return max(fits, key=lambda p: (p["accuracy"], -float(p[stat])))


STATIC_LATENCY_NOTE = ("the static sub-network's p99 is MEASURED end to end like the budgeted "
                       "calls: model.predict(img) with a router policy that runs that "
                       "configuration to that exit (preprocessing and the answer included), "
                       "interleaved over the static sub-networks, on the sweep's first images")


def measure_static_p99(model, static: Sequence[dict], x: np.ndarray, *, n: int = 500,
                       warmup: int = 20, seed: int = 0) -> None:
    """Add ``measured_p99_ms`` / ``measured_mean_ms`` to every :func:`static_points` entry:
    ``model.predict(img, rule=<static policy>)`` on the first ``n`` images, the sub-networks
    in a random order per image (numpy-only router policies: runtime/routing.py)."""
    from export.routing_fit import static_policy
    from runtime.routing import RouterRule

    S = model.stages
    rules = [RouterRule([static_policy(p["prefix"] + "F" * (S - len(p["prefix"])), int(p["exit"]))])
             for p in static]
    m = run_interleaved([lambda img, r=r: model.predict(img, rule=r) for r in rules], x[:n],
                        warmup=warmup, seed=seed)
    for p, t in zip(static, m.times):
        p["measured_p99_ms"] = float(np.percentile(t, 99))
        p["measured_mean_ms"] = float(t.mean())


def budget_sweep(model, x: np.ndarray, y: np.ndarray, table: dict, static: Sequence[dict], *,
                 count: int = 8, mono: Optional[MonolithicSession] = None, warmup: int = 20,
                 seed: int = 0, progress: Progress = None) -> dict[str, Any]:
    """The evaluate stage's measured budget sweep: :func:`sweep_budgets` of ``table``,
    :func:`measure_budget_sweep` on ``x``/``y`` (interleaved with ``mono``), and for every
    budget the best static sub-network that fits it (:func:`best_static_fits` on the table's
    cumulative p99, see :data:`STATIC_LATENCY_NOTE`)."""
    budgets = sweep_budgets(table, count)
    if progress:
        progress(f"budget sweep at batch 1, interleaved (random order per image, seed {seed}): "
                 f"{len(budgets)} budgets {', '.join(f'{b:g}' for b in budgets)} ms"
                 + (" + the monolithic session" if mono is not None else "")
                 + f"; {len(y)} images")
    t0 = time.perf_counter()
    rows = measure_budget_sweep(model, x, y, budgets, warmup=warmup, progress=progress,
                                seed=seed, mono=mono)
    static = [dict(p) for p in static]
    measure_static_p99(model, static, x, warmup=warmup, seed=seed)
    for row in rows:
        best = best_static_fits(static, row["budget_ms"], stat="measured_p99_ms")
        row["best_static"] = None if best is None else {
            k: best[k] for k in ("prefix", "skip_config", "exit", "accuracy", "mean_latency_ms",
                                 "p99_latency_ms", "measured_p99_ms", "measured_mean_ms")}
    S = max(len(c) for c in table)
    return {"kind": "measured", "batch": 1, "interleaved": True, "order": "random per image",
            "seed": seed, "n": int(len(y)), "spacing": "geometric",
            "from": {"what": "first-exit p50 of the fastest configuration",
                     "ms": min(float(r[0]["p50"]) for r in table.values())},
            "to": {"what": f"full-depth p99 of {'F' * S} (last exit)",
                   "ms": float(table["F" * S][-1]["p99"])},
            "budgets_ms": budgets, "with_monolithic": mono is not None,
            "warmup_calls": min(warmup, len(y)), "seconds": time.perf_counter() - t0,
            "static_latency": STATIC_LATENCY_NOTE, "points": rows}
