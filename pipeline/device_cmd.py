"""`pipeline benchmark`, `pipeline inspect`, `pipeline doctor`: a bundle on the device.

All three run on the base install (numpy, onnxruntime, click; no torch, PIL or onnx):

* ``benchmark`` runs the calibration set through every backend this machine can run (plus the
  monolithic ONNX session when there is one), interleaved image by image, and prints accuracy,
  latency, throughput, depth, deadline misses and speed-up; floors (``--min-accuracy``,
  ``--max-ms`` ...) make it a CI gate;
* ``inspect`` shows what a bundle holds: model, classes, skip configurations, pieces and
  artifacts, the stopping rule, latency tables;
* ``doctor`` says which backends this machine can run for the bundle, and why not.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import click
import numpy as np

from pipeline.runtime_cmd import _bundle_option, bundle_path
from runtime.backends import ARTIFACT_BACKENDS
from runtime.errors import UsageError
from runtime.jsonsafe import json_safe

__all__ = ["benchmark_cmd", "inspect_cmd", "doctor_cmd", "shipped_monolithic"]


def _size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _macs(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _open_bundle(path: Path, verify: bool = False):
    from runtime.bundle import Bundle

    return Bundle.open(path, verify=verify)


def _skip_accuracy(manifest) -> dict:
    return dict(manifest.stopping.skip_accuracy)


def _default_config(manifest) -> str:
    """The configuration predictions use without a budget: the calibrated one, else FF..F."""
    cfg = getattr(manifest.stopping, "skip_config", None)
    if cfg is None:
        ann = manifest.annotations if isinstance(manifest.annotations, dict) else {}
        cal = ann.get("calibration")
        cfg = cal.get("skip_config") if isinstance(cal, dict) else None
    if cfg in manifest.skip_configs:
        return cfg
    full = "F" * manifest.stages
    return full if full in manifest.skip_configs else manifest.skip_configs[0]


# ---------------------------------------------------------------------------------------------
# the monolithic baseline
# ---------------------------------------------------------------------------------------------

def shipped_monolithic(bundle) -> Optional[Path]:
    """The monolithic ONNX (the whole model, full depth, one graph) shipped with ``bundle``:
    ``annotations.monolithic.file`` (bundle-relative; its ``sha256`` checked when given), else
    ``monolithic.onnx`` beside the bundle directory. None when there is none."""
    from runtime.manifest import sha256_file

    ann = bundle.manifest.annotations if isinstance(bundle.manifest.annotations, dict) else {}
    rec = ann.get("monolithic")
    if isinstance(rec, dict) and isinstance(rec.get("file"), str):
        path = bundle.resolve(rec["file"])
        if not path.is_file():
            raise UsageError(f"{bundle.manifest_path}: annotations.monolithic.file "
                               f"{rec['file']!r} does not exist")
        want = rec.get("sha256")
        if isinstance(want, str) and sha256_file(path) != want:
            raise UsageError(f"{path}: sha256 does not match annotations.monolithic.sha256")
        return path
    beside = bundle.root.parent / "monolithic.onnx"
    return beside if beside.is_file() else None


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------

class _Row:
    """One benchmarked variant: a callable predicting a batch, and what it recorded."""

    def __init__(self, name: str, kind: str, backend: str, target: Optional[str],
                 fn: Callable[[np.ndarray], tuple[list[int], list[int], int]],
                 selected: bool = False) -> None:
        self.name, self.kind, self.backend, self.target = name, kind, backend, target
        self.fn, self.selected = fn, selected
        self.ms: list[float] = []
        self.classes: list[int] = []
        self.exits: list[int] = []
        self.missed = 0

    def call(self, xb: np.ndarray, record: bool) -> None:
        t0 = time.perf_counter_ns()
        classes, exits, missed = self.fn(xb)
        dt = (time.perf_counter_ns() - t0) / 1e6
        if record:
            self.ms.append(dt)
            self.classes.extend(classes)
            self.exits.extend(exits)
            self.missed += missed

    def result(self, y: np.ndarray, batch: int, stages: int) -> dict[str, Any]:
        ms = np.asarray(self.ms, dtype=np.float64)
        total_s = float(ms.sum()) / 1e3
        n = len(self.classes)
        return {"name": self.name, "kind": self.kind, "backend": self.backend,
                "target": self.target, "selected": self.selected, "n": n, "batch": batch,
                "accuracy": float((np.asarray(self.classes) == y[:n]).mean()) if n else math.nan,
                "mean_ms": float(ms.mean()) if ms.size else math.nan,
                "p50_ms": float(np.percentile(ms, 50)) if ms.size else math.nan,
                "p99_ms": float(np.percentile(ms, 99)) if ms.size else math.nan,
                "images_per_s": n / total_s if total_s > 0 else math.nan,
                "mean_depth": float(np.mean(self.exits) + 1) if self.exits else math.nan,
                "exit_histogram": np.bincount(np.asarray(self.exits, dtype=np.int64),
                                              minlength=stages).tolist() if self.exits else [],
                "deadline_missed": int(self.missed)}


def _adaptive_fn(model, budget_ms, rule, skip_config):
    def fn(xb):
        got = model.predict(xb, budget_ms=budget_ms, rule=rule, skip_config=skip_config)
        got = got if isinstance(got, list) else [got]
        return ([p.class_id for p in got], [p.exit_index for p in got],
                sum(1 for p in got if p.deadline_missed))
    return fn


def _mono_fn(session, stages: int, budget_ms):
    from runtime.preprocess import prepare_input

    def fn(xb):
        t0 = time.perf_counter()
        batch, _ = prepare_input(xb, session.input_shape, session.mean, session.std)
        logits = session.logits(batch)
        z = logits - logits.max(axis=1, keepdims=True)  # softmax + argmax, as the runtime does
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        classes = p.argmax(axis=1).tolist()
        late = budget_ms is not None and (time.perf_counter() - t0) * 1e3 > budget_ms
        return classes, [stages - 1] * len(classes), len(classes) if late else 0
    return fn


def _load_for(bundle_dir: Path, backend: str, device: Optional[str], threads: Optional[int]):
    from runtime.model import AdaptiveModel

    options = {"intra_op_threads": threads} if threads else None
    return AdaptiveModel.load(bundle_dir, backend=backend, device=device, runner_options=options,
                              warn=False)


def _floors(gated: list[dict], min_accuracy, max_ms, max_p99_ms,
            min_speedup, min_images_per_s) -> list[dict[str, Any]]:
    out = []
    for row in gated:
        label = f"{row['backend']} ({row['target']})"
        checks = [("accuracy", min_accuracy, row["accuracy"], ">="),
                  ("mean_ms", max_ms, row["mean_ms"], "<="),
                  ("p99_ms", max_p99_ms, row["p99_ms"], "<="),
                  ("speedup", min_speedup, row.get("speedup"), ">="),
                  ("images_per_s", min_images_per_s, row["images_per_s"], ">=")]
        for name, limit, value, op in checks:
            if limit is None:
                continue
            ok = value is not None and not (isinstance(value, float) and math.isnan(value)) and (
                value >= limit if op == ">=" else value <= limit)
            out.append({"row": label, "metric": name, "value": value, "limit": limit, "op": op,
                        "ok": bool(ok)})
    return out


@click.command("benchmark")
@_bundle_option
@click.option("--npz", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Images and labels (.npz with uint8 `images` and `labels`; default: the "
                   "calib.npz the build writes beside the bundle).")
@click.option("--backend", type=click.Choice(ARTIFACT_BACKENDS), default=None,
              help="Only this backend (default: every backend this machine can run).")
@click.option("--device", "-d", default=None,
              help="Device profile for the backend order and latency table (default: the "
                   "bundle's).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Backend threads per session (default: the artifacts' options).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per predict call.")
@click.option("--budget-ms", type=click.FloatRange(min=0), default=None,
              help="Deadline per predict call; counts the calls answered late.")
@click.option("--rule", default=None, help="Stopping rule name (default: the calibrated rule).")
@click.option("--skip-config", default=None, help="Force a skip configuration.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="First N images only.")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Untimed calls per row first.")
@click.option("--monolithic", "monolithic", type=click.Path(path_type=Path, exists=True,
                                                           dir_okay=False), default=None,
              help="The whole model as one ONNX file, run as one onnxruntime session (default: "
                   "the one shipped with the bundle, if any).")
@click.option("--no-monolithic", is_flag=True, help="No monolithic row even if one is shipped.")
@click.option("--min-accuracy", type=click.FloatRange(0, 1), default=None,
              help="Floor: accuracy (0..1) of the gated row(s).")
@click.option("--max-ms", type=click.FloatRange(min=0), default=None,
              help="Floor: mean ms per call of the gated row(s).")
@click.option("--max-p99-ms", type=click.FloatRange(min=0), default=None,
              help="Floor: p99 ms per call of the gated row(s).")
@click.option("--min-speedup", type=click.FloatRange(min=0), default=None,
              help="Floor: speed-up vs the baseline row.")
@click.option("--min-images-per-s", type=click.FloatRange(min=0), default=None,
              help="Floor: images per second.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def benchmark_cmd(bundle: Path, npz: Optional[Path], backend: Optional[str],
                  device: Optional[str], threads: Optional[int], batch: int,
                  budget_ms: Optional[float], rule: Optional[str], skip_config: Optional[str],
                  limit: Optional[int], warmup: int, monolithic: Optional[Path],
                  no_monolithic: bool, min_accuracy: Optional[float], max_ms: Optional[float],
                  max_p99_ms: Optional[float], min_speedup: Optional[float],
                  min_images_per_s: Optional[float], as_json: bool) -> None:
    """Benchmark a bundle on this machine: one row per usable backend.

    Runs the calibration set through every backend this machine can run for the bundle (the
    adaptive model: calibrated rule, deadline), interleaved image by image so background load
    hits every row alike, plus a baseline: the monolithic ONNX session when the bundle ships one
    (or --monolithic), else the runtime's backend at full depth. Per row: accuracy, mean / p50 /
    p99 ms per call, images/s, mean depth, deadline misses, speed-up (baseline mean / row mean).
    With floors (--min-accuracy, --max-ms, --max-p99-ms, --min-speedup, --min-images-per-s),
    checked on the runtime's default backend (or every row of --backend), it exits 1 when one
    is not met.
    """
    from pipeline.calib_set import find_calib_set
    from runtime.model import diagnose_backends

    b = _open_bundle(bundle, verify=False)  # AdaptiveModel.load verifies every checksum
    m = b.manifest
    cs = find_calib_set(bundle, npz, m, what="benchmark")
    if cs.images is None or len(cs.images) == 0:
        raise UsageError(f"{cs.path}: no images to benchmark with")
    x, y = cs.images, cs.image_labels
    if limit is not None:
        x, y = x[:limit], y[:limit]
    statuses = diagnose_backends(b, device=device)
    usable = [s for s in statuses if s.usable and (backend is None or s.backend == backend)]
    if backend == "onnxruntime" and not usable:  # as the runtime does: the portable ONNX
        usable = [s for s in statuses if s.usable and s.backend == "onnx"]
    if not usable:
        why = "; ".join(f"{s.backend}/{s.target}: {s.reason}" for s in statuses
                        if backend is None or s.backend == backend) or "no artifacts"
        raise UsageError(f"{bundle}: no backend{' ' + backend if backend else ''} can run "
                           f"here ({why})")
    rows: list[_Row] = []
    models: dict[str, Any] = {}
    notes: list[str] = []
    for s in usable:
        if s.backend in models:
            notes.append(f"{s.backend}/{s.target}: not benchmarked (the runtime runs "
                         f"{s.backend} with target {models[s.backend].target})")
            continue
        model = _load_for(bundle, s.backend, device, threads)
        models[s.backend] = model
        if skip_config is not None:
            model.check_skip_config(skip_config)
        model.resolve_rule(rule)
        rows.append(_Row(f"adaptive {s.backend}", "adaptive", model.backend, model.target,
                         _adaptive_fn(model, budget_ms, rule, skip_config),
                         selected=s.selected or (backend is not None)))
    if not any(r.selected for r in rows):
        rows[0].selected = True
    ref = models[next(r.backend for r in rows if r.selected)]
    mono_path = None if no_monolithic else (monolithic or shipped_monolithic(b))
    if mono_path is not None:
        from pipeline.evaluate import MonolithicSession

        if ref.backend in ("onnxruntime", "onnx"):  # exactly the pieces' session options
            session = MonolithicSession.like(ref, mono_path)
        else:
            session = MonolithicSession(mono_path, input_shape=m.input.shape, mean=m.input.mean,
                                        std=m.input.std, intra_op_threads=threads or 0)
        base = _Row("monolithic", "monolithic", "onnxruntime", "monolithic",
                    _mono_fn(session, m.stages, budget_ms))
        base_label = f"monolithic ONNX session ({mono_path.name})"
    else:
        full = "F" * m.stages if "F" * m.stages in m.skip_configs else _default_config(m)
        base = _Row(f"full depth {ref.backend}", "full_depth", ref.backend, ref.target,
                    _adaptive_fn(ref, None, "full", full))
        base_label = f"{ref.backend} at full depth ({full})"
    rows.append(base)

    batches = [x[i:i + batch] for i in range(0, len(y), batch)]
    for i in range(min(warmup, len(batches))):
        for r in rows:
            r.call(batches[i % len(batches)], record=False)
    t0 = time.perf_counter()
    R = len(rows)
    for i, xb in enumerate(batches):
        for j in range(R):
            rows[(i + j) % R].call(xb, record=True)
    wall = time.perf_counter() - t0
    results = [r.result(y, batch, m.stages) for r in rows]
    base_ms = results[-1]["mean_ms"]
    for res in results:
        res["speedup"] = (base_ms / res["mean_ms"]
                          if res["mean_ms"] and not math.isnan(res["mean_ms"]) else None)
    gated = [res for res in results if res["selected"]]
    checks = _floors(gated, min_accuracy, max_ms, max_p99_ms, min_speedup,
                     min_images_per_s)
    failed = [c for c in checks if not c["ok"]]
    report = {"bundle": str(b.root), "model": m.model.name, "device": m.device,
              "data": str(cs.path), "n": int(len(y)), "batch": batch, "budget_ms": budget_ms,
              "rule": rule or m.stopping.rule or "full", "skip_config": skip_config,
              "warmup": warmup, "seconds": round(wall, 3), "baseline": base_label,
              "rows": results, "floors": checks, "passed": not failed, "notes": notes}
    if as_json:
        click.echo(json.dumps(json_safe(report), indent=2))
    else:
        _print_benchmark(report, budget_ms)
    if failed:
        c = failed[0]
        more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
        raise UsageError(f"benchmark below the floor: {c['row']} {c['metric']} "
                           f"{_fmt(c['value'])} (needs {c['op']} {c['limit']:g}){more}")


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_benchmark(rep: dict, budget_ms: Optional[float]) -> None:
    click.echo(f"{rep['model']} ({rep['bundle']}): {rep['n']} images of {rep['data']}, batch "
               f"{rep['batch']}, rule {rep['rule']}"
               + (f", budget {budget_ms:g} ms" if budget_ms is not None else "")
               + f"; baseline: {rep['baseline']}")
    head = ["", "row", "target", "accuracy", "mean ms", "p50 ms", "p99 ms", "images/s",
            "mean depth", "missed", "speed-up"]
    lines = [head]
    for r in rep["rows"]:
        lines.append(["*" if r["selected"] else "", r["name"], str(r["target"]),
                      f"{100 * r['accuracy']:.2f}%", f"{r['mean_ms']:.3f}", f"{r['p50_ms']:.3f}",
                      f"{r['p99_ms']:.3f}", f"{r['images_per_s']:.1f}",
                      f"{r['mean_depth']:.2f}", str(r["deadline_missed"]),
                      f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    for row in lines:
        click.echo("  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    click.echo("* the runtime's default choice on this machine (the row floors apply to)")
    for note in rep["notes"]:
        click.echo(f"note: {note}")
    for c in rep["floors"]:
        click.echo(f"{'PASS' if c['ok'] else 'FAIL'} {c['row']} {c['metric']} {_fmt(c['value'])} "
                   f"{c['op']} {c['limit']:g}")


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------

def inspect_bundle(b, *, verify: bool = True) -> dict[str, Any]:
    """What ``pipeline inspect`` prints, as a JSON-able dict."""
    from pipeline.calib_set import CalibSetError, find_calib_set
    from runtime.latency import cumulative_table, find_groups

    m = b.manifest
    S = m.stages
    cfg = _default_config(m)
    ann = m.annotations if isinstance(m.annotations, dict) else {}
    skip_acc = _skip_accuracy(m)
    integrity: dict[str, Any] = {"verified": verify}
    if verify:
        problems = b.check()
        integrity.update(ok=not problems, files=len(b.files()),
                         problems=[str(p) for p in problems])
    pieces = []
    for p in m.pieces:
        arts = []
        for a in p.artifacts:
            try:
                size = b.resolve(a.file).stat().st_size
            except Exception:  # noqa: BLE001 - unsafe or missing: shown as missing
                size = None
            arts.append({"backend": a.backend, "target": a.target, "file": a.file,
                         "size_bytes": a.size_bytes, "present": size is not None})
        pieces.append({"id": p.id, "kind": p.kind, "stage": p.stage, "skip": p.skip,
                       "macs": p.macs, "params": p.params, "artifacts": arts})
    configs = [{"skip_config": c, "macs": m.cumulative_macs(c, S - 1),
                "val_accuracy": skip_acc.get(c), "default": c == cfg} for c in m.skip_configs]
    tables = []
    for (dev, be, tgt, n), group in find_groups(m).items():
        try:
            cum = cumulative_table(m, dev, be, n, target=tgt, stats=("p50", "p99"))[cfg]
            row = [round(e["p50"], 4) for e in cum]
            p99 = [round(e["p99"], 4) for e in cum]
        except (LookupError, ValueError):
            row, p99 = [], []
        tables.append({"device": dev, "backend": be, "target": tgt, "batch": n,
                       "kind": group.kind, "skip_config": cfg, "cumulative_p50_ms": row,
                       "cumulative_p99_ms": p99})
    st = m.stopping
    cal = ann.get("calibration") if isinstance(ann.get("calibration"), dict) else {}
    try:
        cs = find_calib_set(b.root, None, m, required=False)
        calib = None if cs is None else {"file": str(cs.path), "images": 0 if cs.images is None
                                         else int(len(cs.images)), "labels": int(len(cs.labels)),
                                         "probabilities": sorted(cs.probabilities),
                                         "data": cs.meta.get("data")}
    except CalibSetError as exc:
        calib = {"error": str(exc)}
    dep = getattr(m, "deployment", None)
    return {
        "bundle": str(b.root), "schema_version": m.schema_version,
        "model": {"name": m.model.name, "family": m.model.family, "params": m.model.params,
                  "num_classes": m.model.num_classes},
        "class_names": list(m.class_names),
        "input": {"name": m.input.name, "shape": list(m.input.shape), "dtype": m.input.dtype,
                  "layout": m.input.layout, "mean": list(m.input.mean), "std": list(m.input.std)},
        "device": m.device, "created": m.created, "tool_version": m.tool_version,
        "checkpoint_sha256": m.source.checkpoint_sha256,
        "stages": S, "default_skip_config": cfg, "skip_configs": configs,
        "execution": {cfg: [list(seg) for seg in m.execution[cfg]]},
        "pieces": pieces,
        "backends": [{"backend": be, "target": t} for be, t in m.available_targets()],
        "deployment": None if dep is None else {"profile": dep.profile,
                                                "backend_order": list(dep.backend_order)},
        "stopping": {"rule": st.rule, "params": st.params, "val_accuracy": st.val_accuracy,
                     "mean_latency_ms": st.mean_latency_ms, "created": st.created,
                     "skip_config": getattr(st, "skip_config", None) or cal.get("skip_config"),
                     "n": cal.get("n"),
                     "data": cal.get("data"), "cost_source": cal.get("segment_ms_source")},
        "latency": tables, "integrity": integrity, "calibration_set": calib,
    }


def _print_inspect(d: dict) -> None:
    mo, inp = d["model"], d["input"]
    names = d["class_names"]
    shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
    click.echo(f"bundle: {d['bundle']}")
    click.echo(f"model: {mo['name']} ({mo['family']}), {mo['params']:,} params, "
               f"{mo['num_classes']} classes: {shown}")
    click.echo(f"input: {inp['name']} {inp['dtype']} {inp['layout']} {inp['shape']}, mean "
               f"{[round(v, 4) for v in inp['mean']]}, std {[round(v, 4) for v in inp['std']]} "
               "(uint8 HWC pixels accepted)")
    ck = d["checkpoint_sha256"]
    click.echo(f"device: {d['device'] or 'none (portable)'}; created {d['created']}; tool "
               f"{d['tool_version']}; schema {d['schema_version']}"
               + (f"; checkpoint {ck[:12]}" if ck else ""))
    if d["deployment"]:
        click.echo(f"backend order: {', '.join(d['deployment']['backend_order'])} "
                   f"(profile {d['deployment']['profile']})")
    click.echo(f"stages: {d['stages']}; skip configs ({len(d['skip_configs'])}), MACs at full "
               f"depth [validation accuracy]:")
    click.echo("  " + "  ".join(
        f"{c['skip_config']}{'*' if c['default'] else ''} {_macs(c['macs'])}"
        + (f" [{c['val_accuracy']:.3f}]" if isinstance(c["val_accuracy"], (int, float)) else "")
        for c in d["skip_configs"]) + "   (* default)")
    click.echo(f"execution of {d['default_skip_config']}: " + " | ".join(
        " + ".join(seg) for seg in d["execution"][d["default_skip_config"]]))
    click.echo(f"pieces ({len(d['pieces'])}):")
    rows = [["id", "kind", "stage", "skip", "MACs", "artifacts"]]
    for p in d["pieces"]:
        arts = ", ".join(f"{a['backend']}/{a['target']} {_size(a['size_bytes'])}"
                         + ("" if a["present"] else " MISSING") for a in p["artifacts"])
        rows.append([p["id"], p["kind"], str(p["stage"]),
                     "-" if p["skip"] is None else ("yes" if p["skip"] else "no"),
                     _macs(p["macs"]), arts or "(none)"])
    _table(rows)
    st = d["stopping"]
    stops = ""
    if st["rule"]:
        params = json.dumps(st["params"], separators=(",", ":"))
        if st["rule"] == "router" and isinstance(st["params"].get("policies"), list):
            pols = st["params"]["policies"]
            default = pols[int(st["params"].get("default", 0))]
            params = (f"(kept exits {default.get('exits')}, first span {default.get('start')}, "
                      f"{len(pols)} policies, {len(st['params'].get('budgets') or [])} budgets, "
                      f"epsilon {st['params'].get('epsilon')})")
            stops = _router_stops(default)
        if len(params) > 160:
            params = params[:157] + "..."
        acc = st["val_accuracy"]
        lat = st["mean_latency_ms"]
        click.echo(f"stopping rule: {st['rule']} {params}; validation accuracy "
                   + (f"{acc:.4f}" if acc is not None else "n/a")
                   + (f", mean latency {lat:.3f} ms" if lat is not None else "")
                   + (f"; calibrated on {st['skip_config']}" if st["skip_config"] else "")
                   + (f" ({st['n']} images of {st['data']})" if st["n"] else "")
                   + (f"; costs: {st['cost_source']}" if st["cost_source"] else ""))
        if st["rule"] == "router" and stops:
            click.echo(f"  default policy stops at max_prob >= {stops}")
    else:
        click.echo("stopping rule: none (not calibrated: full depth; `pipeline calibrate`)")
    if d["latency"]:
        cfg = d["default_skip_config"]
        click.echo(f"latency tables (cumulative p50 ms to each exit of {cfg}):")
        S = d["stages"]
        rows = [["device", "backend", "target", "batch", "kind"] + [f"exit {k}" for k in range(S)]]
        for t in d["latency"]:
            cells = [f"{v:.3f}" for v in t["cumulative_p50_ms"]] or ["n/a"] * S
            rows.append([t["device"], t["backend"], t["target"], str(t["batch"]),
                         str(t["kind"])] + cells)
        _table(rows)
    else:
        click.echo("latency tables: none (`pipeline profile --bundle B` measures one)")
    integ = d["integrity"]
    if not integ["verified"]:
        click.echo("integrity: not checked (--no-verify)")
    elif integ["ok"]:
        click.echo(f"integrity: ok ({integ['files']} files, sizes and sha256 match)")
    else:
        click.echo(f"integrity: {len(integ['problems'])} problem(s): {integ['problems'][0]}")
    cal = d["calibration_set"]
    if cal is None:
        click.echo("calibration set: none beside the bundle")
    elif "error" in cal:
        click.echo(f"calibration set: {cal['error']}")
    else:
        click.echo(f"calibration set: {cal['file']} ({cal['images']} images, {cal['labels']} "
                   f"labels, probabilities of {len(cal['probabilities'])} skip configs)")


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@click.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True), callback=bundle_path)
@click.option("--no-verify", is_flag=True, help="Skip the checksum verification.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def inspect_cmd(bundle: Path, no_verify: bool, as_json: bool) -> None:
    """What a bundle holds: model, classes, skip configs, pieces and artifacts, stopping rule,
    latency tables, integrity."""
    b = _open_bundle(bundle, verify=False)
    d = inspect_bundle(b, verify=not no_verify)
    if as_json:
        click.echo(json.dumps(json_safe(d), indent=2))
    else:
        _print_inspect(d)
    if d["integrity"].get("ok") is False:
        raise UsageError(d["integrity"]["problems"][0])


# ---------------------------------------------------------------------------------------------
# doctor
# ---------------------------------------------------------------------------------------------

def _machine() -> dict[str, Any]:
    import importlib.util
    import platform
    import sys

    from runtime.host import machine_arch, package_versions

    try:
        from runtime.host import nvidia_gpus

        gpus = [str(g.get("name")) for g in nvidia_gpus()]
    except Exception:  # noqa: BLE001 - informative only
        gpus = []

    def have(mod: str) -> bool:
        try:
            return importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            return False

    providers = None
    if have("onnxruntime"):
        try:
            import onnxruntime as ort
            providers = list(ort.get_available_providers())
        except Exception:  # noqa: BLE001
            providers = None
    return {"arch": machine_arch(), "platform": platform.platform(terse=True),
            "python": platform.python_version(), "executable": sys.executable,
            "packages": package_versions(), "onnxruntime_providers": providers,
            "pillow": have("PIL"), "torch": have("torch"), "gpus": gpus}


@click.command("doctor")
@click.argument("bundle", type=click.Path(path_type=Path, exists=True), callback=bundle_path)
@click.option("--device", "-d", default=None,
              help="Device profile for the backend order (default: the bundle's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def doctor_cmd(bundle: Path, device: Optional[str], as_json: bool) -> None:
    """Which backends this machine can run for the bundle, and why not.

    Also checks the bundle's integrity and says what the runtime will use (backend, latency
    table, calibration set). Exits 1 when nothing can run or the bundle is damaged."""
    from pipeline.calib_set import CalibSetError, find_calib_set
    from runtime.model import diagnose_backends

    b = _open_bundle(bundle, verify=False)
    m = b.manifest
    problems = [str(p) for p in b.check()]
    statuses = diagnose_backends(b, device=device)
    chosen = next((s for s in statuses if s.selected), None)
    machine = _machine()
    tables = []
    from runtime.latency import latency_groups

    for dev, be, n, kind in latency_groups(m):
        tables.append({"device": dev, "backend": be, "batch": n, "kind": kind})
    use_dev = device or m.device
    table = None
    if chosen is not None:
        back = "onnxruntime" if chosen.backend == "onnx" else chosen.backend
        table = next((t for t in tables if t["device"] == use_dev and t["backend"] == back
                      and t["batch"] == 1), None)
    try:
        cs = find_calib_set(b.root, None, m, required=False)
        calib = None if cs is None else str(cs.path)
        calib_error = None
    except CalibSetError as exc:
        calib, calib_error = None, str(exc)
    verdict_ok = chosen is not None and not problems
    report = {"bundle": str(b.root), "model": m.model.name, "device": m.device,
              "machine": machine, "integrity": {"ok": not problems, "problems": problems},
              "backends": [s.to_dict() for s in statuses],
              "selected": None if chosen is None else chosen.to_dict(),
              "latency_table": table, "latency_tables": tables,
              "calibration_set": calib, "calibration_set_error": calib_error,
              "ok": verdict_ok}
    if as_json:
        click.echo(json.dumps(json_safe(report), indent=2))
    else:
        pk = machine["packages"]
        click.echo(f"bundle: {b.root} ({m.model.name}; device profile {m.device or 'none'})")
        click.echo(f"this machine: {machine['arch']}, {machine['platform']}, python "
                   f"{machine['python']}; " + ", ".join(
                       f"{k} {v or 'not installed'}" for k, v in pk.items())
                   + f"; PIL {'yes' if machine['pillow'] else 'no'}"
                   + f"; GPU {', '.join(g for g in machine['gpus'] if g) or 'none'}")
        if machine["onnxruntime_providers"]:
            click.echo(f"onnxruntime providers: {', '.join(machine['onnxruntime_providers'])}")
        click.echo("backends, in the order the runtime tries them:")
        for s in statuses:
            mark = "*" if s.selected else " "
            state = "usable" if s.usable else f"no: {s.reason}"
            click.echo(f"  {mark} {s.backend:<12} {s.target:<22} {state}")
        if problems:
            click.echo(f"integrity: {len(problems)} problem(s): {problems[0]}")
        else:
            click.echo(f"integrity: ok ({len(b.files())} files, sizes and sha256 match)")
        if chosen is not None:
            if table is not None:
                click.echo(f"latency table: {table['kind']} ({table['device']}, "
                           f"{table['backend']}, batch 1): deadlines and lookahead use it")
            else:
                click.echo("latency table: none for this device and backend: the runtime "
                           "measures as it goes (`pipeline profile --bundle B` records one)")
        click.echo("calibration set: " + (calib or calib_error or "none beside the bundle "
                                          "(`pipeline calibrate/benchmark --npz FILE`)"))
        if verdict_ok:
            click.echo(f"OK: the runtime will use {chosen.backend} ({chosen.target})")
    if problems:
        raise UsageError(f"the bundle is damaged: {problems[0]}")
    if chosen is None:
        why = "; ".join(f"{s.backend}/{s.target}: {s.reason}" for s in statuses) or \
            "no artifacts"
        raise UsageError(f"no backend can run {b.root} on this machine ({why})")


def _router_stops(policy: dict) -> str:
    """``path threshold`` per decision path of a router policy ("never" where it goes on)."""
    from runtime.routing import RouterPolicy

    try:
        pol = RouterPolicy(policy["exits"], policy["start"], policy["decisions"],
                           lam=policy.get("lam", 0.0))
    except (KeyError, TypeError, ValueError):
        return ""
    parts = []
    for path in sorted(pol.decisions, key=lambda p: (len(p), p)):
        t = pol.stop_threshold(path)
        parts.append(f"{path} {'never' if t is None else format(t, '.3f')}")
    return ", ".join(parts)
