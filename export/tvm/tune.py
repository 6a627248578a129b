"""MetaSchedule tuning with a trial budget and a per-(piece, target) database cache.

The JSON database of a piece lives in ``<cache root>/<target slug>-<first 16 hex of the piece's
ONNX sha256>/`` (``database_workload.json``, ``database_tuning_record.json``, ``logs/`` and our
``meta.json``). A rebuild with the same key finds ``meta.json`` saying at least the requested number
of trials were run and skips tuning; the records are applied in any case. Asking for more trials
than were run continues the search in the same database (MetaSchedule seeds it from the records).

Measured with TVM 0.27 on a 2-core x86 machine (see docs/tvm.md):

* MetaSchedule crashes on tasks with a symbolic batch dimension (``parallel_for_dynamic ... Check
  failed: (old_rv != nullptr && new_rv != nullptr)``), so tuned pieces are compiled for a fixed batch.
* ``tune_relax`` finds no tasks in the raw ``from_onnx`` module: it gets the legalized, fused module
  (:func:`prepare_for_tuning`), and ``compile_relax`` gets the *raw* module (it runs the same passes
  itself, so the database keys match; handing it the fused module loses the records).
* The default builder imports ``tvm.s_tir.tensor_intrin`` in every freshly started build worker,
  ~33 s here (23 s of it CUDA intrinsics), longer than the builder's 30 s timeout: every candidate
  failed with "LocalBuilder: Timeout". We build with a function that skips that import (a
  tensorized schedule is already inlined when it reaches the builder). The main process still pays
  the import once per tuning run (inside ``TuneContext``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.errors import CompileError

from .targets import canonical_target_json, is_native, target_slug

__all__ = [
    "TuningResult",
    "sha256_file",
    "tuning_cache_key",
    "default_tuning_root",
    "database_dir",
    "prepare_for_tuning",
    "extract_tasks",
    "open_database",
    "tune_module",
]

META_NAME = "meta.json"
ENV_TUNING_ROOT = "ADN_TVM_TUNING_DB"

Progress = Callable[[str], None] | None


@dataclass
class TuningResult:
    database_dir: Path
    reused: bool  # True: an existing database was used as is (no trials run now)
    trials_run: int  # trials run by this call (0 when reused)
    trials_total: int  # trials recorded in meta.json after this call
    tasks_total: int  # tunable tasks in the piece
    tasks_with_records: int  # tasks the database has a record for (these are applied)
    seconds: float


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tuning_cache_key(onnx_sha256: str, slug: str) -> str:
    """Directory name of a piece's database: ``<target slug>-<16 hex of the ONNX sha256>``."""
    if not slug or "/" in slug:
        raise ValueError(f"bad target slug {slug!r}")
    digest = onnx_sha256.lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"expected a sha256 hex digest, got {onnx_sha256!r}")
    return f"{slug}-{digest[:16]}"


def default_tuning_root() -> Path:
    """``$ADN_TVM_TUNING_DB`` or ``~/.cache/adaptive-depth/tvm-tuning``."""
    env = os.environ.get(ENV_TUNING_ROOT)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "adaptive-depth" / "tvm-tuning"


def database_dir(root: str | os.PathLike | None, onnx_sha256: str, target: dict) -> Path:
    base = Path(root) if root is not None else default_tuning_root()
    return base / tuning_cache_key(onnx_sha256, target_slug(target))


def prepare_for_tuning(mod):
    """Legalize and fuse a relax module so MetaSchedule can extract tasks from it."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    seq = tvm.transform.Sequential(
        [
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
        ]
    )
    return seq(mod)


def extract_tasks(mod, tvm_target) -> list:
    """MetaSchedule tasks of a raw relax module (prepared here)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    return list(ms.relax_integration.extract_tasks(prepare_for_tuning(mod), tvm_target))


def open_database(db_dir: str | os.PathLike):
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    Path(db_dir).mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(db_dir))


def _read_meta(db_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((db_dir / META_NAME).read_text())
    except (OSError, ValueError):
        return None


def _count_records(db_dir: Path) -> int:
    try:
        with open(db_dir / "database_tuning_record.json") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def _make_fast_build():
    # A nested function: cloudpickle sends it to the build worker by value, so the worker does
    # not need to import this package (it is started with ``python -m tvm.exec.popen_worker``).
    def _fast_build(mod, target, _params):
        from tvm.driver import build as tvm_build  # noqa: PLC0415
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: PLC0415

        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return _fast_build


def _run_tuning(prepared_mod, tvm_target, db_dir: Path, trials: int, n_tasks: int, seed: int | None):
    """Run MetaSchedule (separate function so tests can check it is not called on reuse)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    import logging  # noqa: PLC0415

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    if ms_logger.level == logging.NOTSET:  # MetaSchedule would default to DEBUG (XGBoost spam)
        ms_logger.setLevel(logging.INFO)
    per_iter = max(4, min(64, trials // max(1, n_tasks)))
    workers = max(1, min(4, os.cpu_count() or 1))
    builder = ms.builder.LocalBuilder(f_build=_make_fast_build(), max_workers=workers, timeout_sec=120.0)
    runner = ms.runner.LocalRunner(timeout_sec=60.0)
    database = open_database(db_dir)
    ms.relax_integration.tune_relax(
        prepared_mod,
        None,
        tvm_target,
        str(db_dir),
        max_trials_global=trials,
        num_trials_per_iter=per_iter,
        builder=builder,
        runner=runner,
        database=database,
        seed=seed,
    )
    return database


def tune_module(
    mod,
    tvm_target,
    target: dict,
    onnx_sha256: str,
    trials: int,
    tuning_db_dir: str | os.PathLike | None = None,
    *,
    progress: Progress = None,
    seed: int | None = 0,
):
    """Tune ``mod`` (raw from_onnx module, static shapes) or reuse its cached database.

    Returns ``(database, TuningResult)``; pass the database with the raw module to
    ``ms.relax_integration.compile_relax``.
    """
    if trials <= 0:
        raise ValueError("trials must be positive")
    t0 = time.perf_counter()
    db_dir = database_dir(tuning_db_dir, onnx_sha256, target)
    meta = _read_meta(db_dir)
    done = int(meta.get("trials", 0)) if meta else 0
    tasks = extract_tasks(mod, tvm_target)
    reused = meta is not None and done >= trials
    trials_run = 0
    if reused:
        _say(
            progress,
            f"tvm tune: reusing {db_dir} ({_count_records(db_dir)} records from {done} trials >= "
            f"{trials} requested); skipping tuning",
        )
    else:
        if not is_native(target):
            raise CompileError(
                f"no tuning database at {db_dir} and target {target_slug(target)} cannot be "
                f"measured on this machine; tune on the device (MetaSchedule RPC runner) and copy "
                f"the database here, or compile with tune_trials=0"
            )
        if target.get("kind") != "llvm":
            raise CompileError("local tuning is only implemented for llvm (CPU) targets")
        trials_run = trials - done
        what = f"continuing {db_dir} (+{trials_run} trials)" if meta else f"into {db_dir}"
        _say(
            progress,
            f"tvm tune: {len(tasks)} tasks, {trials_run} trials {what}; MetaSchedule's first step "
            f"imports its tensor intrinsics (~30 s)",
        )
        db_dir.mkdir(parents=True, exist_ok=True)
        t1 = time.perf_counter()
        _run_tuning(prepare_for_tuning(mod), tvm_target, db_dir, trials_run, len(tasks), seed)
        new_meta = {
            "onnx_sha256": onnx_sha256,
            "target": json.loads(canonical_target_json(target)),
            "target_slug": target_slug(target),
            "trials": done + trials_run,
            "tasks": [t.task_name for t in tasks],
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        (db_dir / META_NAME).write_text(json.dumps(new_meta, indent=2) + "\n")
        _say(
            progress,
            f"tvm tune: {trials_run} trials in {time.perf_counter() - t1:.0f} s, "
            f"{_count_records(db_dir)} records in the database",
        )
    database = open_database(db_dir)
    covered = sum(
        1
        for task in tasks
        if database.query_tuning_record(task.dispatched[0], tvm_target, "main") is not None
    )
    result = TuningResult(
        database_dir=db_dir,
        reused=reused,
        trials_run=trials_run,
        trials_total=max(done, done + trials_run),
        tasks_total=len(tasks),
        tasks_with_records=covered,
        seconds=time.perf_counter() - t0,
    )
    _say(progress, f"tvm tune: database has records for {covered}/{len(tasks)} tasks")
    return database, result
