"""`pipeline predict`, `pipeline run`, `pipeline calibrate`: a bundle's deployed artifacts at work.

All three go through :class:`runtime.AdaptiveModel` (the on-device API), so they exercise exactly
what an app embeds: backend selection with fallback, checksums, preprocessing, early exits,
deadlines. They run on the device's base install (numpy, onnxruntime, click; no torch, no PIL):
images are read with ``runtime.images`` (PGM/PPM/.npy natively, PIL for the rest when
installed); ``run`` and ``calibrate`` read the calibration set the build ships beside the bundle
(``calib.npz``, ``pipeline.calib_set``), or, given ``--data`` (and with torch installed), the data
set itself through ``train.data``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np

from runtime.backends import ARTIFACT_BACKENDS
from runtime.errors import PipelineError, UsageError
from runtime.images import NATIVE_SUFFIXES, PIL_SUFFIXES
from runtime.jsonsafe import json_safe

IMAGE_SUFFIXES = PIL_SUFFIXES + NATIVE_SUFFIXES


def _torch_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # pragma: no cover
        return False


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------

def bundle_path(_ctx, _param, value: Optional[Path]) -> Optional[Path]:
    """A bundle directory as given, or the directory a bundle ``.tar.gz`` unpacks to (once,
    through the runtime's safe unpacker, into its cache)."""
    if value is None or value.is_dir():
        return value
    from runtime.archive import is_archive, unpacked_bundle

    if not is_archive(value):
        raise click.BadParameter(f"{value}: expected a bundle directory or a .tar.gz")
    return unpacked_bundle(value)


def _bundle_option(f):
    return click.option("--bundle", "-b", required=True, callback=bundle_path,
                        type=click.Path(path_type=Path, exists=True),
                        help="Bundle directory (portable or compiled for a device), or its "
                             ".tar.gz.")(f)


def _backend_options(f):
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="Backend threads per session (onnxruntime intra_op_threads).")(f)
    f = click.option("--device", "-d", default=None,
                     help="Device profile for the backend order and latency table "
                          "(default: the bundle's).")(f)
    f = click.option("--backend", type=click.Choice(ARTIFACT_BACKENDS), default=None,
                     help="Force a backend (default: the device profile's order, with "
                          "fallback; 'onnx' = the portable ONNX with onnxruntime).")(f)
    return f


def load_model(bundle: Path, backend: Optional[str], device: Optional[str],
               threads: Optional[int], echo=None):
    """AdaptiveModel.load with the CLI's options; reports skipped backends on stderr."""
    from runtime.model import AdaptiveModel, BackendUnavailableError, UnknownDeviceError

    options = {"intra_op_threads": threads} if threads else None
    try:
        model = AdaptiveModel.load(bundle, backend=backend, device=device,
                                   runner_options=options, warn=False)
    except (BackendUnavailableError, UnknownDeviceError) as exc:
        raise UsageError(" ".join(str(exc).split())) from None
    ch = model.choice
    running = model.describe_backend()  # what runs: providers and threads of the sessions
    if ch is not None and ch.skipped:
        for b, why in ch.skipped.items():
            click.echo(f"note: skipped backend {b}: {why}", err=True)
    if (ch is not None and ch.skipped) or "asked" in running:
        click.echo(f"note: using {running}", err=True)
    return model


def _rule_label(model, rule: Optional[str]) -> str:
    if rule:
        return rule
    return f"{model.rule_name} (calibrated)" if model.rule_name else "none (full depth)"


def _percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan}
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def dataset_for_bundle(manifest, data: Optional[str] = None, data_root: Optional[str] = None):
    """The bundle's data set with the training run's split parameters (train.data.load_dataset).

    ``data`` overrides the data set name/path/spec (the split parameters still come from the
    manifest's ``annotations.dataset``, so the validation split is the one training held out).
    """
    from train.data import load_dataset

    ann = manifest.annotations if isinstance(manifest.annotations, dict) else {}
    info = ann.get("dataset") if isinstance(ann.get("dataset"), dict) else {}
    name = data or info.get("name")
    if not name:
        raise UsageError("the bundle records no dataset (annotations.dataset.name); pass --data "
                           "or --npz")
    C, H, W = manifest.input.shape
    if name == "synthetic":  # the export records the synthetic data set by name only
        name = f"synthetic:classes={manifest.model.num_classes},chans={C},size={H}"
    kw: dict[str, Any] = dict(val_fraction=float(info.get("val_fraction", 0.1)),
                              split_seed=int(info.get("split_seed", 0)))
    if not str(name).startswith("synthetic"):
        kw["img_size"] = H
    ds = load_dataset(name, data_root, **kw)
    if ds.num_classes != manifest.model.num_classes or ds.in_chans != C or ds.img_size != H:
        raise UsageError(f"data set {name!r} ({ds.num_classes} classes, {ds.in_chans}x"
                           f"{ds.img_size}x{ds.img_size}) does not match the model "
                           f"({manifest.model.num_classes} classes, {C}x{H}x{W})")
    return name, ds


def split_arrays(split, limit: Optional[int] = None, chunk: int = 512):
    """uint8 NHWC images and int64 labels of a train.data split (numpy), first ``limit``."""
    import torch

    n = len(split) if limit is None else min(limit, len(split))
    xs, ys = [], []
    for i in range(0, n, chunk):
        imgs, labels = split.get_batch(torch.arange(i, min(n, i + chunk)))
        xs.append(imgs.permute(0, 2, 3, 1).contiguous().numpy())
        ys.append(labels.numpy())
    if not xs:
        return np.zeros((0,), dtype=np.uint8), np.zeros((0,), dtype=np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def _npz_option(f):
    return click.option("--npz", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                        default=None,
                        help="Calibration set (.npz with uint8 `images` and `labels`; default: "
                             "the calib.npz the build writes beside the bundle).")(f)


def calib_images(bundle: Path, manifest, npz: Optional[Path], *, what: str,
                 required: bool = True):
    """(calibration set, uint8 NHWC images, labels) from ``--npz`` or beside the bundle, or
    None when ``required`` is False and there is none."""
    from pipeline.calib_set import find_calib_set

    cs = find_calib_set(bundle, npz, manifest, required=required, what=what)
    if cs is None:
        return None
    if cs.images is None or len(cs.images) == 0:
        raise UsageError(f"{cs.path}: the calibration set has no images")
    return cs, cs.images, cs.image_labels


# ---------------------------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------------------------

def read_input(path: Path, model, resize: bool = False) -> list[tuple[str, np.ndarray]]:
    """(label, array) items from an image file (``runtime.images``: PGM/PPM natively, PIL for
    PNG, JPEG... when installed) or a .npy file (one sample or a batch).

    Images of another size than the model's: prepared as training did when the bundle records
    it (``input.raw.preprocess``: shorter side resized, centre crop), else resized to the
    model's size with ``resize`` (``--resize``), else refused."""
    from runtime.images import load_image, read_npy
    from runtime.preprocess import fit_raw

    pre = model.manifest.input.raw.preprocess
    if path.suffix.lower() == ".npy":
        arr = read_npy(path)
        C, H, W = model.input_shape
        if pre is not None:
            arr = fit_raw(arr, model.input_shape, pre)
        single = (arr.ndim == 2 or (arr.ndim == 3 and (arr.shape[-1] == C and arr.shape[:2] == (H, W)
                                                        or arr.dtype != np.uint8)))
        if single:
            return [(str(path), arr)]
        return [(f"{path}[{i}]", a) for i, a in enumerate(arr)] if len(arr) else [(str(path), arr)]
    return [(str(path), load_image(path, model.input_shape, resize=resize, preprocess=pre))]


@click.command("predict")
@_bundle_option
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True,
                                                                    dir_okay=False))
@click.option("--budget-ms", type=click.FloatRange(min=0), default=None,
              help="Deadline per image (anytime prediction).")
@click.option("--rule", default=None, help="Stopping rule name (default: the calibrated rule).")
@click.option("--skip-config", default=None, help="Force a skip configuration, e.g. FTF.")
@click.option("--resize", is_flag=True,
              help="Resize images to the model's input size (bundles that record their "
                   "preprocessing resize and crop other sizes as training did, always).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
@_backend_options
def predict_cmd(bundle: Path, inputs: tuple[Path, ...], budget_ms: Optional[float],
                rule: Optional[str], skip_config: Optional[str], resize: bool, as_json: bool,
                backend: Optional[str], device: Optional[str], threads: Optional[int]) -> None:
    """Classify images with a bundle: class, exit, latency per image.

    PGM/PPM and .npy arrays (one sample or a batch) are read without PIL; PNG, JPEG and the
    rest need PIL (pillow) installed."""
    model = load_model(bundle, backend, device, threads)
    items = [item for p in inputs for item in read_input(p, model, resize)]
    out = []
    for label, arr in items:
        try:
            pred = model.predict(arr, budget_ms=budget_ms, rule=rule, skip_config=skip_config)
        except PipelineError:
            raise
        except ValueError as exc:
            raise UsageError(f"{label}: {exc}") from None
        preds = pred if isinstance(pred, list) else [pred]
        for i, p in enumerate(preds):
            name = label if len(preds) == 1 else f"{label}[{i}]"
            out.append((name, p))
    if as_json:
        click.echo(json.dumps([{"input": name, **{k: v for k, v in p.to_dict().items()
                                                  if k != "probabilities"},
                                "probabilities": [round(float(v), 6) for v in p.probabilities]}
                               for name, p in out], indent=2))
        return
    S = model.stages
    for name, p in out:
        miss = "  DEADLINE MISSED" if p.deadline_missed else ""
        click.echo(f"{name}: class {p.class_id} ({p.class_name}) p={p.confidence:.3f}  "
                   f"exit {p.exit_index} (depth {p.depth}/{S})  config {p.skip_config}  "
                   f"{p.latency_ms:.3f} ms{miss}")


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

@click.command("run")
@_bundle_option
@_npz_option
@click.option("--data", default=None, help="Data set name/path/spec (default: the bundle's; "
                                           "needs torch).")
@click.option("--data-root", default=None, help="Where the data set lives.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option("--budget-ms", type=click.FloatRange(min=0), default=None,
              help="Deadline per predict call (per batch).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per predict call.")
@click.option("--rule", default=None, help="Stopping rule name (default: the calibrated rule).")
@click.option("--skip-config", default=None, help="Force a skip configuration.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N images only.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@_backend_options
def run_cmd(bundle: Path, npz: Optional[Path], data: Optional[str], data_root: Optional[str],
            split: str, budget_ms: Optional[float], batch: int, rule: Optional[str],
            skip_config: Optional[str], limit: Optional[int], as_json: bool,
            backend: Optional[str], device: Optional[str], threads: Optional[int]) -> None:
    """Run a data split through the bundle: accuracy, exit histogram, latency percentiles.

    The data: --npz (a calibration set), else --data / the bundle's data set (torch installed),
    else the calibration set beside the bundle (validation images)."""
    import time

    model = load_model(bundle, backend, device, threads)
    if npz is not None or (data is None and not _torch_available()):
        if data is not None:
            raise click.UsageError("give --npz or --data, not both")
        _cs, x, y = calib_images(bundle, model.manifest, npz, what="run")
        name, split = str(_cs.path), "calib"
        if limit is not None:
            x, y = x[:limit], y[:limit]
    else:
        if data is not None and not _torch_available():
            raise UsageError("--data needs torch (the build install: pip install "
                               "'adaptive-depth-pipeline[build]'); on a device pass --npz")
        name, ds = dataset_for_bundle(model.manifest, data, data_root)
        x, y = split_arrays(getattr(ds, split), limit)
    if len(y) == 0:
        raise UsageError(f"the {split} split of {name!r} is empty")
    if skip_config is not None:
        model.check_skip_config(skip_config)
    model.resolve_rule(rule)
    preds = []
    t0 = time.perf_counter()
    for i in range(0, len(y), batch):
        got = model.predict(x[i:i + batch], budget_ms=budget_ms, rule=rule, skip_config=skip_config)
        preds.extend(got)
    wall = time.perf_counter() - t0
    exits = np.array([p.exit_index for p in preds])
    correct = np.array([p.class_id for p in preds]) == y
    hist = np.bincount(exits, minlength=model.stages).tolist()
    configs: dict[str, int] = {}
    for p in preds:
        configs[p.skip_config] = configs.get(p.skip_config, 0) + 1
    report = {
        "bundle": str(bundle), "model": model.manifest.model.name, "backend": model.backend,
        "target": model.target, "data": name, "split": split, "n": int(len(y)),
        "batch": batch, "budget_ms": budget_ms, "rule": rule or model.rule_name,
        "accuracy": float(correct.mean()), "correct": int(correct.sum()),
        "exit_histogram": hist, "mean_depth": float(exits.mean() + 1),
        "latency_ms": _percentiles([p.latency_ms for p in preds]),
        "deadline_missed": int(sum(p.deadline_missed for p in preds)),
        "skip_configs": configs, "throughput_per_s": float(len(y) / wall) if wall > 0 else None,
    }
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    lat = report["latency_ms"]
    n = report["n"]
    click.echo(f"{report['model']} on {model.backend} ({model.target}); rule "
               f"{_rule_label(model, rule)}; batch {batch}"
               + (f"; budget {budget_ms:g} ms" if budget_ms is not None else ""))
    click.echo(f"data: {name} {split} split, {n} images")
    click.echo(f"accuracy: {report['accuracy']:.4f} ({report['correct']}/{n})")
    click.echo("exits: " + "  ".join(f"{k}: {c} ({100.0 * c / n:.1f}%)" for k, c in enumerate(hist))
               + f"  (mean depth {report['mean_depth']:.2f}/{model.stages})")
    click.echo(f"latency ms: p50 {lat['p50']:.3f}  p95 {lat['p95']:.3f}  p99 {lat['p99']:.3f}  "
               f"mean {lat['mean']:.3f}")
    if budget_ms is not None:
        click.echo(f"deadline missed: {report['deadline_missed']} "
                   f"({100.0 * report['deadline_missed'] / n:.1f}%)")
    click.echo("skip configs: " + "  ".join(f"{c}: {k}" for c, k in sorted(configs.items())))


# ---------------------------------------------------------------------------------------------
# calibrate
# ---------------------------------------------------------------------------------------------

def _segment_costs(model, cfg: str, profile_runs: int) -> tuple[list[float], str]:
    """Per-segment cost (ms, p50, batch 1) for the rule fit, and where it came from."""
    table = model.table
    if table:
        try:
            from devices.latency import segment_costs_ms
            costs = segment_costs_ms(model.manifest, model.latency_device, table.backend, cfg,
                                     batch=1, stat="p50", target=None)
        except (ImportError, LookupError):
            costs = None
        if costs is None:
            got = model.latency.segment_costs(cfg, 1, "p50")
            costs = None if any(c is None for c in got) else got
        if costs is not None:
            return [float(c) for c in costs], (f"latency table ({table.kind}, device "
                                               f"{model.latency_device}, {table.backend})")
    if profile_runs > 0:
        costs = model.profile_segments(cfg, runs=profile_runs)
        return costs, f"profiled here ({profile_runs} batch-1 runs per segment, p50)"
    macs = [model.latency.segment_macs(cfg, k) for k in range(model.stages)]
    total = float(sum(macs)) or 1.0
    return [m / total for m in macs], "MACs proportions (relative units, not ms)"


@click.command("calibrate")
@_bundle_option
@_npz_option
@click.option("--use-probabilities", is_flag=True,
              help="Fit on the calibration set's per-exit probabilities (computed by the build) "
                   "instead of running its images through the artifacts here.")
@click.option("--data", default=None, help="Data set name/path/spec instead of a calibration "
                                           "set (needs torch; the split parameters always come "
                                           "from the bundle).")
@click.option("--data-root", default=None, help="Where the data set lives.")
@click.option("--max-drop", type=click.FloatRange(min=0), default=None,
              help="Allowed validation accuracy drop vs full depth, in accuracy POINTS "
                   "(0.5 = half a point).")
@click.option("--mean-budget-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Target mean latency instead of an accuracy drop.")
@click.option("--rule", default="max_prob", show_default=True,
              help="Rule to fit: max_prob, entropy, patience, lookahead, full, or router "
                   "(joint routing of exit and sub-network; needs a latency table).")
@click.option("--risk-delta", type=click.FloatRange(min=0, max=1, min_open=True, max_open=True), default=None,
              help="Risk-controlled calibration: the drop (or mean-latency) target holds with "
                   "probability >= 1 - DELTA (e.g. 0.1).")
@click.option("--profile-runs", type=click.IntRange(min=0), default=20, show_default=True,
              help="Without a latency table: batch-1 runs per segment to time it here "
                   "(0: use MACs proportions).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="First N validation images only.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_backend_options
def calibrate_cmd(bundle: Path, npz: Optional[Path], use_probabilities: bool,
                  data: Optional[str], data_root: Optional[str],
                  max_drop: Optional[float], mean_budget_ms: Optional[float], rule: Optional[str],
                  risk_delta: Optional[float], profile_runs: int, limit: Optional[int],
                  as_json: bool, backend: Optional[str], device: Optional[str],
                  threads: Optional[int]) -> None:
    """Fit the stopping rule on validation data with the DEPLOYED artifacts.

    The validation data: the calibration set (--npz, default the calib.npz the build wrote
    beside the bundle), else --data / the bundle's data set (needs torch). Runs every exit of
    every skip configuration on it through the runtime (or, with --use-probabilities, takes the
    per-exit probabilities the build computed), fits the rule (export.calibration.calibrate)
    with per-segment costs from the latency table (else timed here, else MACs proportions), and
    stores the parameters, validation accuracy and mean latency in the manifest's stopping
    record, with the calibrated configuration and every configuration's validation accuracy
    (``stopping.skip_accuracy``, used to pick a configuration for a budget).
    """
    from export.calibration import calibrate
    from runtime.bundle import Bundle
    from runtime.manifest import MANIFEST_NAME, save_manifest, utc_now_iso
    from runtime.rules import RULES

    if (max_drop is None) == (mean_budget_ms is None):
        raise click.UsageError("give exactly one of --max-drop and --mean-budget-ms")
    if rule not in RULES:
        raise UsageError(f"unknown stopping rule {rule!r} (known: {', '.join(RULES)})")
    if data is not None and (npz is not None or use_probabilities):
        raise click.UsageError("give --npz / --use-probabilities or --data, not both")
    model = load_model(bundle, backend, device, threads)
    m = model.manifest
    full = "F" * m.stages if "F" * m.stages in m.skip_configs else model.default_skip_config
    from pipeline.calib_set import find_calib_set

    cs = None
    if data is None:
        cs = find_calib_set(bundle, npz, m, what="calibrate",
                            required=use_probabilities or not _torch_available())
    source: dict[str, Any] = {}
    if cs is not None:
        name = str(cs.meta.get("data") or cs.path.name)
        source = {"calibration_set": str(cs.path), "n_split": cs.meta.get("n_split")}
        if use_probabilities:
            missing = [c for c in m.skip_configs if c not in cs.probabilities]
            if missing:
                raise UsageError(f"{cs.path}: no per-exit probabilities of "
                                   f"{', '.join(missing)} (run without --use-probabilities to "
                                   "compute them from its images)")
            y = cs.probability_labels[:limit]
            probs_by_cfg = {cfg: cs.probabilities[cfg][:, :len(y)] for cfg in m.skip_configs}
            source.update(source="probabilities", probabilities_from=cs.meta.get(
                "probabilities_from"))
        else:
            if cs.images is None or len(cs.images) == 0:
                raise UsageError(f"{cs.path}: the calibration set has no images"
                                   + (" (pass --use-probabilities)" if cs.probabilities else ""))
            x, y = cs.images[:limit], cs.image_labels[:limit]
            probs_by_cfg = {cfg: model.exit_probabilities(x, cfg) for cfg in m.skip_configs}
            source.update(source="images")
    else:
        if not _torch_available():
            raise UsageError("--data needs torch (the build install: pip install "
                               "'adaptive-depth-pipeline[build]'); on a device pass --npz")
        name, ds = dataset_for_bundle(m, data, data_root)
        x, y = split_arrays(ds.val, limit)
        if len(y) == 0:
            raise UsageError(f"data set {name!r} has no validation split (val_fraction "
                               f"{ds.val_fraction}); calibrating on training or test data "
                               "would be biased")
        probs_by_cfg = {cfg: model.exit_probabilities(x, cfg) for cfg in m.skip_configs}
        source = {"source": "data set"}
    if len(y) == 0:
        raise UsageError(f"{name}: no validation rows to calibrate on")
    skip_accuracy = {cfg: float((p[-1].argmax(axis=1) == y).mean())
                     for cfg, p in probs_by_cfg.items()}
    if rule == "router":
        return _calibrate_router_cmd(model, bundle, probs_by_cfg, y, skip_accuracy, full, name,
                                     source, max_drop, mean_budget_ms, risk_delta, as_json)
    costs, cost_source = _segment_costs(model, full, profile_runs)
    kwargs: dict[str, Any] = {}
    if max_drop is not None:
        kwargs["max_drop"] = max_drop
    else:
        kwargs["mean_budget_ms"] = mean_budget_ms
    if risk_delta is not None:
        kwargs["risk_delta"] = risk_delta
    if mean_budget_ms is not None and "MACs" in cost_source:
        raise click.UsageError("--mean-budget-ms needs segment costs in ms: profile the bundle "
                               "(`pipeline profile`) or allow --profile-runs > 0")
    result = calibrate(rule, probs_by_cfg[full], y, costs, **kwargs)

    b = Bundle.open(bundle, verify=False)  # re-read: keep concurrent edits (latency tables)
    new = b.manifest.copy()
    new.stopping = result.to_stopping(created=utc_now_iso(), skip_config=full,
                                      skip_accuracy=skip_accuracy)
    if "MACs" in cost_source:  # no latency known: a mean in ms would be made up
        new.stopping.mean_latency_ms = None
    ann = dict(new.annotations)
    ann["calibration"] = json_safe({
        "rule": result.rule_name, "skip_config": full, "data": name, "split": "val",
        "n": int(len(y)), "backend": model.backend, "target": model.target,
        "segment_ms": costs, "segment_ms_source": cost_source,
        "max_drop": max_drop, "mean_budget_ms": mean_budget_ms, "risk_delta": risk_delta,
        "full_depth_accuracy": skip_accuracy[full], "mean_exit": result.mean_exit,
        "exit_histogram": result.exit_histogram, "requested_rule": rule,
        "created": new.stopping.created, **source,
    })
    new.annotations = ann
    save_manifest(new, b.root / MANIFEST_NAME)
    Bundle.open(b.root, verify=True)
    summary = {"bundle": str(b.root), "rule": result.rule_name, "params": new.stopping.params,
               "val_accuracy": new.stopping.val_accuracy,
               "mean_latency_ms": new.stopping.mean_latency_ms,
               "full_depth_accuracy": skip_accuracy[full], "skip_config": full,
               "segment_ms": costs, "segment_ms_source": cost_source, "n": int(len(y)),
               "exit_histogram": result.exit_histogram, "skip_accuracy": skip_accuracy,
               "data": name, **source}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    what = {"probabilities": "per-exit probabilities of the calibration set",
            "images": "calibration set"}.get(source.get("source"), "val split")
    click.echo(f"calibrated {result.rule_name} on {name} {what} ({len(y)} images) with "
               f"{model.backend} ({model.target})")
    click.echo(f"segment costs: {', '.join(f'{c:.3f}' for c in costs)}  [{cost_source}]")
    acc = new.stopping.val_accuracy
    click.echo(f"validation accuracy: {acc:.4f} (full depth {skip_accuracy[full]:.4f})"
               if acc is not None else "validation accuracy: n/a")
    if new.stopping.mean_latency_ms is not None:
        click.echo(f"mean latency: {new.stopping.mean_latency_ms:.3f} ms")
    click.echo(f"exits: {result.exit_histogram}  (mean depth {result.mean_exit:.2f}/{m.stages})")
    click.echo(f"params: {json.dumps(new.stopping.params)}")
    click.echo("per-config validation accuracy: " + "  ".join(
        f"{c} {a:.3f}" for c, a in skip_accuracy.items()))
    click.echo(f"wrote {b.root / MANIFEST_NAME} (stopping record; bundle verified)")


def _calibrate_router_cmd(model, bundle: Path, probs_by_cfg: dict, y, skip_accuracy: dict,
                          full: str, name: str, source: dict, max_drop: Optional[float],
                          mean_budget_ms: Optional[float], risk_delta: Optional[float],
                          as_json: bool) -> None:
    """`pipeline calibrate --rule router`: fit the joint router with the bundle's latency
    table and write its stopping record (merged pieces too where onnx is installed)."""
    from pipeline.router_build import add_router_pieces, fit_bundle_router, router_annotation
    from runtime.bundle import Bundle
    from runtime.manifest import MANIFEST_NAME, save_manifest

    if max_drop is None or mean_budget_ms is not None:
        raise click.UsageError("--rule router fits an accuracy target: give --max-drop")
    m = model.manifest
    if not model.table:
        raise UsageError(f"{bundle}: the router needs a latency table for "
                         f"{model.latency_device or 'this device'}: run `pipeline profile` first")
    device, backend = model.latency_device, model.table.backend
    fit = fit_bundle_router(m, probs_by_cfg, y, device, backend, max_drop=max_drop,
                            delta=risk_delta)
    b = Bundle.open(bundle, verify=False)
    new = b.manifest.copy()
    new.stopping, ann = router_annotation(fit, skip_accuracy, full, data=name, n=len(y),
                                          backend=model.backend, target=model.target,
                                          device=device, table_backend=backend,
                                          kind=m.latency_kind(device, backend, 1),
                                          max_drop=max_drop, risk_delta=risk_delta,
                                          extra={**source, "by": "pipeline calibrate"})
    new.annotations = {**new.annotations, "calibration": ann}
    save_manifest(new, b.root / MANIFEST_NAME)
    try:
        import onnx  # noqa: F401  (merged pieces are built with onnx: the build install)
        merged = add_router_pieces(b.root, fit.rule)
    except ImportError:
        merged = []
    Bundle.open(b.root, verify=True)
    summary = {"bundle": str(b.root), "rule": "router", "exits_kept": fit.exits,
               "val_accuracy": fit.val_accuracy, "mean_latency_ms": fit.mean_latency_ms,
               "heldout_drop_points": fit.heldout_drop_points,
               "drop_bound_points": fit.drop_bound_points, "full_depth_accuracy": fit.full_accuracy,
               "exit_histogram": fit.exit_histogram, "merged_pieces": merged, "n": int(len(y)),
               "data": name, **source}
    if as_json:
        click.echo(json.dumps(json_safe(summary), indent=2))
        return
    click.echo(f"calibrated router on {name} ({len(y)} images) with {model.backend} "
               f"({model.target}), costs from the {backend} latency table of {device}")
    click.echo(f"kept exits {fit.exits}; validation accuracy {fit.val_accuracy:.4f} (full depth "
               f"{fit.full_accuracy:.4f}; held-out drop {fit.heldout_drop_points:.2f} points, "
               f"bound {fit.drop_bound_points:.2f}); mean latency {fit.mean_latency_ms:.3f} ms")
    click.echo(f"exits: {fit.exit_histogram}; {len(fit.rule.policies)} policies, "
               f"{len(fit.rule.budgets)} budgets")
    if merged:
        click.echo(f"merged pieces: {', '.join(merged)}")
    click.echo(f"wrote {b.root / MANIFEST_NAME} (stopping record; bundle verified)")
