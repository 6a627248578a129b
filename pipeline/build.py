"""`pipeline build`: train -> export -> compile -> profile -> calibrate -> package -> evaluate
-> report, for one device profile, with per-stage caching.

::

    from pipeline.build_config import build_config
    from pipeline.build import run_build

    cfg = build_config("recipe.toml", {"build.device": "jetson"})
    result = run_build(cfg)                 # BuildResult: root, stages, report (dict)
    plan = run_build(cfg, dry_run=True)     # writes nothing: result.plan says what would run

Layout of ``<out>/<profile name>/`` (docs/build.md)::

    build.toml            the effective build config
    .build-state.json     per stage: input hash, outputs (content hashes), seconds (atomic)
    bundle/               what ships to the device (compiled for it, calibrated, latency table)
    <model>-<device>.tar.gz   the same bundle as one archive
    host/                 non-host devices only: the same weights compiled for THIS machine;
                          every MEASURED number of the report comes from it
    report.md, report.json, plots/*.png
    train/                the training run (model.pt, eval.json, metrics.jsonl, exits.png)
    work/                 intermediate stage outputs (portable export, monolithic ONNX, ...)

A stage is reused when the content hash of its inputs (its config section, the content hashes
of the upstream stages' outputs, the data files, this machine for measured stages) equals the
one recorded after it last completed and its outputs are intact. Every output is written
atomically (``runtime.atomic``), and the state only after the outputs: a build killed at any
point leaves the previous complete bundle (or none) and the next build completes the rest.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline.build_config import BuildConfig, content_hash
from runtime.jsonsafe import json_safe
from runtime.errors import PipelineError, UsageError

__all__ = ["STAGES", "BuildPaths", "StageRecord", "BuildResult", "run_build", "plan_build",
           "profile_with_threads", "code_hash", "checkpoint_path", "resolve_backends",
           "resolve_device", "device_dir", "data_identity", "BuildError"]

Log = Callable[[str], None]
STAGES = ("train", "export", "compile", "profile", "calibrate", "package", "evaluate", "report")
STATE_SCHEMA = 1
STATE_NAME = ".build-state.json"


class BuildError(PipelineError, RuntimeError):
    """A stage failed for a reason a user can act on (one line)."""


# ---------------------------------------------------------------------------------------------
# paths and state
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildPaths:
    root: Path

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def export(self) -> Path:
        return self.work / "export"

    @property
    def portable(self) -> Path:
        return self.export / "portable"

    @property
    def monolithic(self) -> Path:
        return self.export / "monolithic.onnx"

    @property
    def compiled(self) -> Path:
        return self.work / "compiled"

    @property
    def profiled(self) -> Path:
        return self.work / "profiled"

    @property
    def calibrated(self) -> Path:
        return self.work / "calibrated"

    @property
    def evaluation(self) -> Path:
        return self.work / "evaluate"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def host(self) -> Path:
        return self.root / "host"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def build_toml(self) -> Path:
        return self.root / "build.toml"

    @property
    def state(self) -> Path:
        return self.root / STATE_NAME


@dataclass
class StageRecord:
    """One stage of one build: ``status`` is built / reused / external (--checkpoint) / failed,
    or, in a dry run, build / reuse / external."""
    name: str
    status: str
    seconds: float = 0.0
    why: str = ""
    built_seconds: Optional[float] = None  # how long it took when it was built

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BuildResult:
    root: Path
    device: str
    stages: list[StageRecord]
    dry_run: bool = False
    report: Optional[dict] = None
    seconds: float = 0.0

    @property
    def paths(self) -> BuildPaths:
        return BuildPaths(self.root)


def _load_state(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"schema": STATE_SCHEMA, "stages": {}}
    if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA \
            or not isinstance(data.get("stages"), dict):
        return {"schema": STATE_SCHEMA, "stages": {}}
    return data


def _save_state(path: Path, state: dict) -> None:
    from runtime.atomic import atomic_write_json

    atomic_write_json(path, state)


def sha256_file(path: Path) -> str:
    from runtime.manifest import sha256_file as _sha

    return _sha(path)


# ---------------------------------------------------------------------------------------------
# device, data identity
# ---------------------------------------------------------------------------------------------

def resolve_device(name: str):
    """``(profile, is_host)``: the device profile and whether its code runs on this machine
    (same architecture, the CPU features it lists, and its GPU if it has one)."""
    from devices import load_profile

    profile = load_profile(name)
    return profile, bool(profile.is_host_compatible(check_gpu=True))


def device_dir(cfg: BuildConfig) -> Path:
    profile, _ = resolve_device(cfg.build.device)
    return Path(cfg.build.out) / profile.name


_DIGESTS: dict[str, dict] = {}
CONTENT_HASH_LIMIT = 512 << 20  # bytes of data files hashed by content; beyond: size + mtime


def _data_path(data: str, root: Optional[str]) -> Optional[Path]:
    if root:
        return Path(root).expanduser()
    base = Path(os.environ.get("DATASETS_ROOT", "/usr/share/datasets"))
    key = data.strip().lower().replace("_", "-")
    names = {"fashion-mnist": ["fashion-mnist"], "fashionmnist": ["fashion-mnist"],
             "fmnist": ["fashion-mnist"], "mnist": ["mnist"], "cifar10": ["cifar10", "cifar-10"],
             "cifar-10": ["cifar10", "cifar-10"], "cifar100": ["cifar100", "cifar-100"],
             "cifar-100": ["cifar100", "cifar-100"]}.get(key)
    if names:
        for b in dict.fromkeys([base, Path("/usr/share/datasets")]):
            for n in names:
                if (b / n).is_dir():
                    return b / n
        return None
    p = Path(data).expanduser()
    return p if not key.startswith("synthetic") and p.is_dir() else None


def _bundle_data(cfg) -> Optional[str]:
    """``train.data`` where the bundle's record (``annotations.dataset.name``) cannot find the
    data again: a folder path (``--data /path``, recorded as ``imagefolder``); else None."""
    from train.data.registry import canonical_name

    data = cfg.train.data
    if data.lower().startswith("synthetic"):
        return None
    try:
        canonical_name(data)
    except ValueError:
        return data  # a path to an image folder
    return None


def data_identity(data: str, root: Optional[str]) -> dict:
    """What a data set's content is, for cache keys: its name, and the content hash of the
    files under its root (sizes and mtimes only beyond 512 MiB in total)."""
    ident: dict[str, Any] = {"data": data, "root": root}
    path = _data_path(data, root)
    if path is None:
        return ident
    key = str(path.resolve())
    if key not in _DIGESTS:
        files = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            for name in sorted(filenames):
                files.append(Path(dirpath) / name)
            if len(files) > 200_000:
                break
        total = sum(f.stat().st_size for f in files)
        h = hashlib.sha256()
        by_content = total <= CONTENT_HASH_LIMIT
        for f in files:
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}\0".encode())
            if by_content:
                h.update(sha256_file(f).encode())
            else:
                h.update(str(st.st_mtime_ns).encode())
        _DIGESTS[key] = {"path": key, "files": len(files), "bytes": total,
                         "digest": h.hexdigest(), "by": "content" if by_content else "size+mtime"}
    ident["files"] = _DIGESTS[key]
    return ident


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _batch_model(ctx: "_Ctx", bundle_dir: Path):
    """The bundle for batched whole-split probabilities: same artifacts, more threads (the
    predictions do not depend on the thread count)."""
    from runtime.model import AdaptiveModel

    threads = ctx.cfg.evaluate.batch_threads or usable_cores()
    return AdaptiveModel.load(bundle_dir, warn=False, runner_options={"intra_op_threads": threads})


_HOST_ID: dict = {}
_CODE: dict[tuple, str] = {}
_REPO = Path(__file__).resolve().parents[1]


def code_hash(*parts: Any) -> str:
    """sha256 over the source files (``*.py``, ``*.toml``) of repository paths ``parts``
    (packages or files; a function: its source): a stage is rebuilt when the code that makes its
    outputs changes. Training is the exception (docs/build.md): its code is not hashed."""
    import inspect

    key = tuple(p if isinstance(p, str) else f"{p.__module__}.{p.__qualname__}" for p in parts)
    if key not in _CODE:
        h = hashlib.sha256()
        for part in parts:
            if not isinstance(part, str):
                h.update(inspect.getsource(part).encode())
                continue
            p = _REPO / part
            files = sorted(p.rglob("*.py")) + sorted(p.rglob("*.toml")) if p.is_dir() else [p]
            for f in files:
                if f.is_file() and "__pycache__" not in f.parts:
                    h.update(f"{f.relative_to(_REPO)}\0".encode())
                    h.update(f.read_bytes())
        _CODE[key] = h.hexdigest()
    return _CODE[key]


def _host_identity() -> dict:
    from devices.host import fingerprint

    if _HOST_ID:
        return dict(_HOST_ID)
    fp = fingerprint()
    _HOST_ID.update({k: fp.get(k) for k in ("arch", "cpu_model", "cpu_cores", "usable_cores",
                                           "isa", "memory_gb", "onnxruntime", "numpy")})
    return dict(_HOST_ID)


def _cleanup_stale(root: Path) -> None:
    """Remove temp/backup entries that a killed atomic write left behind."""
    for d in (root, root / "work"):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    try:
                        p.unlink()
                    except OSError:
                        pass


# ---------------------------------------------------------------------------------------------
# the build context
# ---------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, cfg: BuildConfig, log: Log, *, dry_run: bool) -> None:
        self.cfg = cfg
        self.log = log
        self.dry_run = dry_run
        self.profile, self.is_host = resolve_device(cfg.build.device)
        self.paths = BuildPaths(Path(cfg.build.out) / self.profile.name)
        self.state = _load_state(self.paths.state)
        self.outputs: dict[str, dict] = {}
        self.records: dict[str, StageRecord] = {}
        self._host_profile = None

    @property
    def host_profile(self):
        """The profile of this machine, for the host bundle (its ORT threads per [build].threads)."""
        if self._host_profile is None:
            from devices import load_profile
            from devices.host import guess_profile

            base = self.profile if self.is_host else load_profile(guess_profile())
            self._host_profile = profile_with_threads(base, self.cfg.build.threads)
        return self._host_profile

    @property
    def measured_bundle_dir(self) -> str:
        """Name (under compiled/, profiled/, calibrated/) of the bundle measured here."""
        return "device" if self.is_host else "host"

    def device_profile_for_compile(self):
        return self.host_profile if self.is_host else self.profile


@contextlib.contextmanager
def _torch_single_thread():
    """torch work outside training (export, parity checks, data loading) on one thread: it is
    small, and on a shared 2-core machine a 2-thread torch pool that loses a core to another
    process runs 10x slower (export of the default model: 2.5 s vs 23 s measured under load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile_with_threads(profile, threads: int):
    """A copy of ``profile`` whose onnxruntime backend uses ``threads`` intra-op threads
    (0: the profile itself)."""
    if not threads:
        return profile
    p = copy.deepcopy(profile)
    spec = p.backend("onnxruntime")
    if spec is not None:
        spec.options["intra_op_threads"] = int(threads)
    return p


# ---------------------------------------------------------------------------------------------
# stages: inputs (for the cache key), run, outputs check
# ---------------------------------------------------------------------------------------------

def _train_inputs(ctx: _Ctx) -> dict:
    cfg = ctx.cfg
    if cfg.build.checkpoint:
        return {"checkpoint": str(Path(cfg.build.checkpoint).resolve()),
                "sha256": sha256_file(Path(cfg.build.checkpoint))}
    return {"train": cfg.section_dict("train") | {"out": None},
            "data": data_identity(cfg.train.data, cfg.train.data_root)}


#: Training results shared by the builds of every device under one output root: training does
#: not depend on the device (``<build.out>/.train-cache/<training input hash>/``).
TRAIN_CACHE = ".train-cache"
#: What the cache keeps of a training run (not the resumable ``checkpoint.pt``).
_CACHED_TRAIN_FILES = ("model.pt", "metrics.jsonl", "eval.json", "exits.png")


def _train_cache(ctx: _Ctx, input_hash: str) -> Path:
    return Path(ctx.cfg.build.out) / TRAIN_CACHE / input_hash[:32]


def _train_from_cache(ctx: _Ctx, input_hash: str) -> Optional[dict]:
    """The stage's outputs from another device's build with the same training, copied into
    this build's train/; None when there is none (or it does not verify)."""
    cache = _train_cache(ctx, input_hash)
    record = cache / "record.json"
    if not record.is_file() or not (cache / "model.pt").is_file():
        return None
    rec = json.loads(record.read_text())
    if sha256_file(cache / "model.pt") != rec.get("sha256"):
        return None
    paths = ctx.paths
    if paths.train.exists():
        shutil.rmtree(paths.train)
    shutil.copytree(cache, paths.train, ignore=shutil.ignore_patterns("record.json"))
    ctx.log(f"  reusing the training of {cache} (the same training config and data; "
            "training does not depend on the device)")
    return {**rec, "checkpoint": str((paths.train / "model.pt").relative_to(paths.root)),
            "reused_from": str(cache)}


def _train_to_cache(ctx: _Ctx, input_hash: str, out: dict) -> None:
    from runtime.atomic import atomic_directory, atomic_write_json

    with atomic_directory(_train_cache(ctx, input_hash), overwrite=True) as tmp:
        for name in _CACHED_TRAIN_FILES:
            if (ctx.paths.train / name).is_file():
                shutil.copyfile(ctx.paths.train / name, tmp / name)
        atomic_write_json(tmp / "record.json", {k: v for k, v in out.items() if k != "checkpoint"})


def _train_run(ctx: _Ctx, input_hash: str) -> dict:
    from train.trainer import Trainer

    cfg, paths = ctx.cfg, ctx.paths
    if not cfg.build.checkpoint:
        reused = _train_from_cache(ctx, input_hash)
        if reused is not None:
            return reused
    marker = paths.train / ".build-input"
    resume = (paths.train / "checkpoint.pt").is_file() and marker.is_file() \
        and marker.read_text().strip() == input_hash
    if not resume and paths.train.exists():
        shutil.rmtree(paths.train)
    paths.train.mkdir(parents=True, exist_ok=True)
    if not resume:
        from runtime.atomic import atomic_write_text
        atomic_write_text(marker, input_hash + "\n")
    tc = dataclasses.replace(cfg.train, out=str(paths.train))
    if resume:
        ctx.log(f"  resuming the interrupted training run in {paths.train}")
    summary = Trainer(tc, log=ctx.log).fit(resume=resume)
    ckpt = paths.train / "model.pt"
    if not ckpt.is_file():
        raise BuildError(f"training wrote no {ckpt}")
    out = {"checkpoint": str(ckpt.relative_to(paths.root)), "sha256": sha256_file(ckpt),
           "full_depth_accuracy": summary.get("full_depth_accuracy"),
           "base_accuracy": summary.get("base_accuracy"), "steps": summary.get("steps"),
           "epochs": summary.get("epochs")}
    _train_to_cache(ctx, input_hash, out)
    return out


def checkpoint_path(ctx: _Ctx, out: Optional[dict] = None) -> Path:
    """The checkpoint the build exports: --checkpoint (absolute), else train/model.pt."""
    p = Path((out or ctx.outputs["train"]).get("checkpoint", ""))
    return p if p.is_absolute() else ctx.paths.root / p


def _train_ok(ctx: _Ctx, out: dict) -> bool:
    p = checkpoint_path(ctx, out)
    return p.is_file() and sha256_file(p) == out.get("sha256")


def _export_inputs(ctx: _Ctx) -> dict:
    t = ctx.outputs["train"]
    return {"export": ctx.cfg.section_dict("export"), "checkpoint_sha256": t["sha256"],
            "data_root": ctx.cfg.train.data_root,
            "code": code_hash("export", "train/models", "train/path_norms.py",
                              "train/exit_norms.py", _monolithic_exporter())}


def _monolithic_exporter():
    from pipeline.evaluate import export_monolithic
    return export_monolithic


def _export_run(ctx: _Ctx, input_hash: str) -> dict:
    from export.portable import export_checkpoint
    from pipeline.evaluate import export_monolithic
    from runtime.atomic import atomic_directory, atomic_write_json

    cfg, paths, log = ctx.cfg, ctx.paths, ctx.log
    ckpt = checkpoint_path(ctx)
    e = cfg.export
    with atomic_directory(paths.export, overwrite=True) as tmp:
        if e.exit_norms == "per-variant":
            ckpt = _per_variant_exit_norms(ctx, ckpt, tmp / "model-exit-norms.pt")
        elif e.exit_norms == "per-path":
            ckpt = _per_path_norms(ctx, ckpt, tmp / "model-path-norms.pt")
        export_checkpoint(ckpt, tmp / "portable", opset=e.opset, parity_samples=e.parity_samples,
                          progress=log, granularity=e.granularity, exporter=e.exporter,
                          data_root=cfg.train.data_root)
        t0 = time.perf_counter()
        info = export_monolithic(ckpt, tmp / "monolithic.onnx", opset=e.opset, exporter=e.exporter,
                                 parity_samples=e.parity_samples, data_root=cfg.train.data_root)
        atomic_write_json(tmp / "monolithic.json", info)
        log(f"export  monolithic.onnx (whole model, final exit only)  "
            f"{(time.perf_counter() - t0) * 1e3:7.0f} ms  {info['size_bytes'] / 1024:8.1f} KiB  "
            f"{info['macs'] / 1e6:.2f} MMACs  max|onnx-torch| {info['max_logits_diff']:.1e}")
    return {"portable_manifest": sha256_file(paths.portable / "manifest.json"),
            "monolithic": sha256_file(paths.monolithic), "mono_macs": info["macs"]}


def _norm_images(ctx: _Ctx, state: dict):
    """``(uint8 training images, dataset)`` for re-estimating norm statistics: the export's
    ``exit_norm_images`` first of a seeded permutation of the training split."""
    import torch

    from train.data import load_dataset

    t, e = ctx.cfg.train, ctx.cfg.export
    ds = load_dataset(t.data, t.data_root, val_fraction=t.val_fraction, split_seed=t.split_seed,
                      img_size=(state.get("dataset") or {}).get("img_size"))
    n = min(e.exit_norm_images, len(ds.train))
    idx = torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(0))[:n]
    images, _ = ds.train.get_batch(idx.sort().values)
    return images, ds


def _per_variant_exit_norms(ctx: _Ctx, ckpt: Path, out: Path) -> Path:
    """The checkpoint with exit-head norm statistics re-estimated per stage variant on training
    images (train/exit_norms.py), written to ``out``; ``ckpt`` itself when the model has no
    such norms."""
    from train.checkpoint import model_from_checkpoint, save_checkpoint
    from train.exit_norms import recalibrate_exit_norms, supports_exit_norm_twins

    model, state = model_from_checkpoint(ckpt)
    if not supports_exit_norm_twins(model) or getattr(model, "exit_norm_twins", False):
        return ckpt
    images, ds = _norm_images(ctx, state)
    t0 = time.perf_counter()
    with _torch_single_thread():
        new = recalibrate_exit_norms(model.eval(), images, ds.mean, ds.std)
    state = {**state, "model": new.state_dict(), "model_config": new.model_config(),
             "ema": None, "exit_norms": {"per_variant": True, "images": len(images),
                                         "split": "train"}}
    save_checkpoint(state, out)
    ctx.log(f"exit-head norms re-estimated per stage variant on {len(images)} training images "
            f"({time.perf_counter() - t0:.1f} s)")
    return out


def _per_path_norms(ctx: _Ctx, ckpt: Path, out: Path) -> Path:
    """The checkpoint with every norm's statistics re-estimated per skip path on training
    images (train/path_norms.py, ``state["path_norms"]``), written to ``out``; ``ckpt`` itself
    when the model keeps no norm statistics (a ViT's LayerNorms)."""
    from train.checkpoint import model_from_checkpoint, save_checkpoint
    from train.path_norms import has_batch_norms, path_norm_stats

    model, state = model_from_checkpoint(ckpt)
    if not has_batch_norms(model):
        ctx.log(f"norm statistics per path: {type(model).__name__} keeps none (shared pieces)")
        return ckpt
    images, ds = _norm_images(ctx, state)
    t0 = time.perf_counter()
    with _torch_single_thread():
        stats = path_norm_stats(model.eval(), images, ds.mean, ds.std)
    state = {**state, "ema": None, "model": model.state_dict(),
             "path_norms": {"stats": stats, "images": len(images), "split": "train"}}
    save_checkpoint(state, out)
    ctx.log(f"norm statistics re-estimated per skip path ({len(stats)} paths) on "
            f"{len(images)} training images ({time.perf_counter() - t0:.1f} s)")
    return out


def _bundle_ok(path: Path, sha: Optional[str] = None) -> bool:
    from runtime.bundle import Bundle

    try:
        Bundle.open(path, verify=True)
    except Exception:  # noqa: BLE001 - any problem: rebuild
        return False
    return sha is None or sha256_file(path / "manifest.json") == sha


def _export_ok(ctx: _Ctx, out: dict) -> bool:
    p = ctx.paths
    return (_bundle_ok(p.portable, out.get("portable_manifest")) and p.monolithic.is_file()
            and sha256_file(p.monolithic) == out.get("monolithic")
            and (p.export / "monolithic.json").is_file())


def resolve_backends(ctx: _Ctx) -> tuple[list[str], dict[str, str]]:
    """The backends to compile for the device and why the others are left out."""
    from export.compile import BackendUnavailable, check_backend

    cfg, profile = ctx.cfg, ctx.profile
    auto = cfg.build.backends == "auto"
    wanted = profile.backend_order() if auto else list(cfg.build.backends)
    chosen, skipped = [], {}
    for b in wanted:
        if auto and b == "tvm" and not cfg.build.tune_trials and any(x != "tvm" for x in wanted):
            skipped[b] = ("left out by default: untuned TVM code is 20-70x slower than ONNX Runtime "
                          "and the runtime prefers onnxruntime; add it with --backends (or tune "
                          "with --tune-trials N)")
            continue
        try:
            check_backend(profile, b)
        except BackendUnavailable as exc:
            if not auto:
                raise UsageError(f"backend {b!r} cannot be compiled for {profile.name}: "
                                 f"{exc}") from None
            skipped[b] = str(exc)
            continue
        chosen.append(b)
    if not chosen:
        raise UsageError(f"nothing to compile for {profile.name}: "
                         + "; ".join(f"{b}: {why}" for b, why in skipped.items()))
    return chosen, skipped


def _compile_inputs(ctx: _Ctx) -> dict:
    backends, _ = resolve_backends(ctx)
    d = {"device_profile": ctx.device_profile_for_compile().to_dict(), "backends": backends,
         "tune_trials": ctx.cfg.build.tune_trials, "precision": build_precision(ctx),
         "portable_manifest": ctx.outputs["export"]["portable_manifest"],
         "code": code_hash("export", "devices")}
    if not ctx.is_host:
        d["host_profile"] = ctx.host_profile.to_dict()
    return d


def _compile_run(ctx: _Ctx, input_hash: str) -> dict:
    from export.compile import compile_bundle
    from runtime.atomic import atomic_directory

    paths, log = ctx.paths, ctx.log
    backends, skipped = resolve_backends(ctx)
    for b, why in skipped.items():
        log(f"skip    {b}: {why}")
    precision = build_precision(ctx)
    quant: dict[str, Any] = {}
    if precision == "int8":
        quant = {"precision": "int8", "calib_images": _quantize_images(ctx)}
        log(f"precision int8: every onnxruntime piece quantized (static QDQ) on "
            f"{len(quant['calib_images'])} validation images, kept where measured faster")
    with atomic_directory(paths.compiled, overwrite=True) as tmp:
        compile_bundle(paths.portable, ctx.device_profile_for_compile(), backends=backends,
                       out_dir=tmp / "device", tune_trials=ctx.cfg.build.tune_trials, progress=log,
                       **quant)
        if not ctx.is_host:
            log(f"host bundle: the same pieces for this machine ({ctx.host_profile.name}), "
                "for the measured numbers")
            compile_bundle(paths.portable, ctx.host_profile, backends=["onnxruntime"],
                           out_dir=tmp / "host", progress=log, **quant)
    out = {"device": sha256_file(paths.compiled / "device" / "manifest.json"),
           "backends": backends, "skipped": skipped}
    if not ctx.is_host:
        out["host"] = sha256_file(paths.compiled / "host" / "manifest.json")
    return out


def build_precision(ctx: _Ctx) -> str:
    """fp32 or int8: ``[build].precision``, or the device profile's for "auto"."""
    p = ctx.cfg.build.precision
    if p == "auto":
        p = getattr(ctx.device_profile_for_compile(), "precision", None) or "fp32"
    return p


def _quantize_images(ctx: _Ctx, n: int = 1024):
    """uint8 NHWC validation images for the INT8 calibration and agreement checks."""
    from pipeline.runtime_cmd import split_arrays
    from train.data import load_dataset

    t = ctx.cfg.train
    ds = load_dataset(t.data, t.data_root, val_fraction=t.val_fraction, split_seed=t.split_seed)
    x, _ = split_arrays(ds.val if len(ds.val) else ds.test, n)
    return x


def _bundles_ok(base: Path, out: dict, names=("device", "host")) -> bool:
    return all(_bundle_ok(base / n, out[n]) for n in names if n in out)


def _profile_settings(mode: str):
    from devices.profiler import FULL, QUICK, MeasureSettings

    if mode == "quick":
        return QUICK
    if mode == "full":
        return FULL
    return MeasureSettings(warmup_s=0.1, warmup_calls=10, min_iters=100, max_iters=5000,
                           target_rse=0.03, max_seconds=0.6, block=10)


def _profile_inputs(ctx: _Ctx) -> dict:
    c = ctx.outputs["compile"]
    return {"profile": ctx.cfg.section_dict("profile"),
            "compiled": {k: c[k] for k in ("device", "host") if k in c},
            "machine": _host_identity(), "code": code_hash("devices", "runtime")}


def _profile_run(ctx: _Ctx, input_hash: str) -> dict:
    from devices.latency import estimate_bundle, write_latency
    from devices.profiler import profile_bundle
    from runtime.atomic import atomic_directory
    from runtime.bundle import Bundle

    paths, log, cfg = ctx.paths, ctx.log, ctx.cfg
    batches = list(cfg.profile.batches)
    settings = _profile_settings(cfg.profile.mode)
    info: dict[str, Any] = {}
    with atomic_directory(paths.profiled, overwrite=True) as tmp:
        for name in ("device", "host"):
            if (paths.compiled / name).is_dir():
                shutil.copytree(paths.compiled / name, tmp / name)
        if not ctx.is_host:
            m = Bundle.open(tmp / "device", verify=False).manifest
            order = list(m.deployment.backend_order) if m.deployment else []
            t0 = time.perf_counter()
            for b in order:
                entries = estimate_bundle(tmp / "device", ctx.profile, backend=b, batches=batches)
                write_latency(tmp / "device", entries)
            info["device"] = {"kind": "estimated", "backends": order}
            log(f"estimate {ctx.profile.name}: roofline latency of every piece and exit for "
                f"{', '.join(order)} (batch {', '.join(map(str, batches))}) "
                f"[{(time.perf_counter() - t0) * 1e3:.0f} ms]")
        measured = tmp / ctx.measured_bundle_dir
        r = profile_bundle(measured, batches=batches, settings=settings, progress=log)
        write_latency(measured, r.entries)
        info[ctx.measured_bundle_dir] = {"kind": "measured", "device": r.device,
                                         "backend": r.backend, "target": r.target,
                                         "seconds": round(r.seconds, 2), "mode": cfg.profile.mode}
    out = {"info": info, "device": sha256_file(paths.profiled / "device" / "manifest.json")}
    if not ctx.is_host:
        out["host"] = sha256_file(paths.profiled / "host" / "manifest.json")
    return out


def _calibrate_inputs(ctx: _Ctx) -> dict:
    p = ctx.outputs["profile"]
    return {"calibrate": ctx.cfg.section_dict("calibrate"),
            "profiled": {k: p[k] for k in ("device", "host") if k in p},
            "data": data_identity(ctx.cfg.train.data, ctx.cfg.train.data_root),
            "code": code_hash("runtime", "export/calibration.py", "export/simulate.py",
                              "export/routing_fit.py", "export/merge.py",
                              "pipeline/router_build.py", "pipeline/build.py",
                              "pipeline/evaluate.py", "pipeline/calib_set.py")}


def _calibrate_run(ctx: _Ctx, input_hash: str) -> dict:
    import numpy as np

    from pipeline.calib_set import CALIB_NAME, write_calib_set
    from pipeline.evaluate import config_probabilities
    from pipeline.runtime_cmd import dataset_for_bundle, split_arrays
    from runtime.atomic import atomic_directory, atomic_write_json
    from runtime.model import AdaptiveModel

    paths, log, cfg = ctx.paths, ctx.log, ctx.cfg
    c = cfg.calibrate
    with atomic_directory(paths.calibrated, overwrite=True) as tmp:
        for name in ("device", "host"):
            if (paths.profiled / name).is_dir():
                shutil.copytree(paths.profiled / name, tmp / name)
        here = tmp / ctx.measured_bundle_dir
        model = _batch_model(ctx, here)
        data_name, ds = dataset_for_bundle(model.manifest, _bundle_data(cfg), cfg.train.data_root)
        x, y = split_arrays(ds.val, c.limit or None)
        if len(y) == 0:
            raise BuildError(f"data set {data_name!r} has no validation split to calibrate on")
        log(f"calibrate on {data_name} val split ({len(y)} images) with {model.backend} "
            f"({model.target}) on this machine")
        probs = config_probabilities(model, x, batch_size=cfg.evaluate.batch_size, progress=log)
        # the calibration set that ships beside the bundle (calib.npz; pipeline/calib_set.py)
        meta = write_calib_set(tmp / CALIB_NAME, model.manifest, x, y, probabilities=probs,
                               data=data_name, probabilities_from={
                                   "backend": model.backend, "target": model.target,
                                   "bundle": ctx.measured_bundle_dir})
        log(f"calibration set: {meta['n_images']} images, per-exit probabilities of "
            f"{meta['n_probabilities']} ({(tmp / CALIB_NAME).stat().st_size / 2**20:.1f} MiB)")
        del model
        model = AdaptiveModel.load(here, warn=False, warm=False)
        np.savez_compressed(tmp / "val.npz", labels=y,
                            **{f"p_{cfg_}": p for cfg_, p in probs.items()})
        skip_accuracy = {k: float((p[-1].argmax(axis=1) == y).mean()) for k, p in probs.items()}
        reference = _reference_correct(ctx, model, x, y)
        roles = [("device", tmp / "device", ctx.is_host)]
        if not ctx.is_host:
            roles.append(("host", here, True))
        summary: dict[str, Any] = {"data": data_name, "n": int(len(y)),
                                   "skip_accuracy": skip_accuracy, "bundles": {}}
        for role, bdir, measured in roles:
            t0 = time.perf_counter()
            rec = _calibrate_bundle(ctx, bdir, probs, y, skip_accuracy, data_name,
                                    measured=measured, model=model, same=bdir == here, images=x,
                                    reference_correct=reference)
            summary["bundles"][role] = rec
            log(f"calibrate {role} bundle: {rec['rule']} on {rec['skip_config']} with "
                f"{rec['costs_kind']} costs ({rec['cost_source']}): val accuracy "
                f"{100 * rec['val_accuracy']:.2f}% "
                f"(full depth {100 * rec['full_depth_accuracy']:.2f}%), "
                f"mean depth {rec['mean_exit']:.2f}/{model.stages}, mean latency "
                f"{rec['mean_latency_ms']:.3f} ms [{(time.perf_counter() - t0) * 1e3:.0f} ms]")
        atomic_write_json(tmp / "calibration.json", json_safe(summary))
    out = {"device": sha256_file(paths.calibrated / "device" / "manifest.json"),
           "val": sha256_file(paths.calibrated / "val.npz"),
           "calib": sha256_file(paths.calibrated / "calib.npz")}
    if not ctx.is_host:
        out["host"] = sha256_file(paths.calibrated / "host" / "manifest.json")
    return out


def _reference_correct(ctx: _Ctx, model, x, y):
    """Per validation image, 1.0 where the fp32 network (the monolithic ONNX, with the
    bundle's session options) is right: in an int8 build the router's drop is certified
    against it, not against the quantized pieces' own full depth. None in an fp32 build."""
    if build_precision(ctx) != "int8":
        return None
    from pipeline.evaluate import MonolithicSession

    ref = MonolithicSession.like(model, ctx.paths.monolithic).correct(x, y)
    ctx.log(f"int8: the router's accuracy target is certified against the fp32 network "
            f"({100 * ref.mean():.2f}% on the validation split)")
    return ref


def _table_backend(manifest, device: str) -> Optional[str]:
    """The first backend of the bundle's compile order with a batch-1 latency table on
    ``device`` (what the runtime on that device will use once it can)."""
    order = list(manifest.deployment.backend_order) if manifest.deployment else []
    for b in list(order) + ["onnxruntime", "tensorrt", "tvm"]:
        if manifest.latency_group(device, b, 1):
            return b
    return None


def _calibrate_bundle(ctx: _Ctx, bdir: Path, probs: dict, y, skip_accuracy: dict, data_name: str,
                      *, measured: bool, model, same: bool, images=None,
                      reference_correct=None) -> dict:
    """Fit the configured rule for one bundle with that bundle's own latency table and write
    its stopping record and annotations (the same fields `pipeline calibrate` writes);
    ``reference_correct``: what the router's drop is certified against (int8 builds: the fp32
    network)."""
    from devices.latency import segment_costs_ms
    from runtime.bundle import Bundle
    from export.calibration import calibrate
    from runtime.manifest import MANIFEST_NAME, save_manifest, utc_now_iso

    c = ctx.cfg.calibrate
    b = Bundle.open(bdir, verify=False)
    m = b.manifest
    S = m.stages
    device = (next((e.device for e in m.latency if e.kind == "measured"), None) if measured
              else ctx.profile.name)
    backend = _table_backend(m, device)
    if backend is None:
        raise BuildError(f"{bdir}: no batch-1 latency table for {device}")
    kind = m.latency_kind(device, backend, 1)
    costs = {cfg_: segment_costs_ms(m, device, backend, cfg_, 1, "p50") for cfg_ in m.skip_configs}
    full = "F" * S
    use_budget = c.mean_budget_ms is not None and (not measured or ctx.is_host)
    if c.skip_config == "full":
        candidates = [full]
    elif c.skip_config == "auto":
        candidates = list(m.skip_configs)
    else:
        if c.skip_config not in m.skip_configs:
            raise UsageError(f"[calibrate].skip_config {c.skip_config!r} is not a skip config of "
                             f"this model ({', '.join(m.skip_configs)})")
        candidates = [c.skip_config]
    if c.rule == "router":
        return _calibrate_router(ctx, b, probs, y, skip_accuracy, data_name, device=device,
                                 backend=backend, kind=kind, model=model, same=same,
                                 images=images, reference_correct=reference_correct)
    search = []
    best = None
    for cand in candidates:
        kw: dict[str, Any] = {}
        if use_budget:
            kw["mean_budget_ms"] = float(c.mean_budget_ms)
        else:
            # the target is relative to FULL depth of FF..F: a configuration whose own full depth
            # is less accurate has that much less room
            room = float(c.max_drop) - 100.0 * (skip_accuracy[full] - skip_accuracy[cand])
            if room < 0:
                search.append({"skip_config": cand, "eligible": False,
                               "full_depth_accuracy": skip_accuracy[cand]})
                continue
            kw["max_drop"] = room
        if c.risk_delta is not None:
            kw["risk_delta"] = float(c.risk_delta)
        try:
            res = calibrate(c.rule, probs[cand], y, costs[cand], **kw)
        except ValueError as exc:
            search.append({"skip_config": cand, "eligible": False, "error": str(exc)})
            continue
        search.append({"skip_config": cand, "eligible": True, "rule": res.rule_name,
                       "val_accuracy": res.val_accuracy, "mean_latency_ms": res.mean_latency_ms})
        score = (-res.val_accuracy, res.mean_latency_ms) if use_budget \
            else (res.mean_latency_ms, -res.val_accuracy)
        if best is None or score < best[0]:
            best = (score, cand, res)
    if best is None:
        raise BuildError(f"calibration found no skip configuration meeting the target: {search}")
    _score, cfg_, res = best
    new = m.copy()
    new.stopping = res.to_stopping(created=utc_now_iso(), skip_config=cfg_,
                                   skip_accuracy=skip_accuracy)
    source = (f"latency table ({kind}, device {device}, {backend})")
    ann = dict(new.annotations)
    ann["calibration"] = json_safe({
        "rule": res.rule_name, "skip_config": cfg_, "data": data_name, "split": "val",
        "n": int(len(y)), "backend": model.backend, "target": model.target,
        "segment_ms": costs[cfg_], "segment_ms_source": source,
        "max_drop": None if use_budget else float(c.max_drop),
        "mean_budget_ms": float(c.mean_budget_ms) if use_budget else None,
        "risk_delta": c.risk_delta, "full_depth_accuracy": skip_accuracy[full],
        "mean_exit": res.mean_exit, "exit_histogram": res.exit_histogram,
        "requested_rule": c.rule, "created": new.stopping.created,
        "predictions_from": ("this bundle" if same else
                             f"this machine's {model.backend} artifacts ({model.target}) of the same "
                             "ONNX pieces (the host bundle): the same predictions"),
        "skip_config_search": search if len(candidates) > 1 else None,
        "by": "pipeline build",
    })
    new.annotations = ann
    save_manifest(new, b.root / MANIFEST_NAME)
    Bundle.open(b.root, verify=True)
    return {"rule": res.rule_name, "params": res.params, "skip_config": cfg_,
            "val_accuracy": res.val_accuracy, "full_depth_accuracy": skip_accuracy[full],
            "config_full_depth_accuracy": res.full_depth_accuracy,
            "mean_latency_ms": res.mean_latency_ms, "mean_exit": res.mean_exit,
            "exit_histogram": res.exit_histogram, "segment_ms": costs[cfg_],
            "cost_source": source, "costs_kind": kind, "device": device, "backend": backend,
            "target": {"max_drop": None if use_budget else c.max_drop,
                       "mean_budget_ms": c.mean_budget_ms if use_budget else None,
                       "risk_delta": c.risk_delta},
            "details": json_safe({k: v for k, v in res.details.items() if k != "frontier"}),
            "search": search if len(candidates) > 1 else None}


def _calibrate_router(ctx: _Ctx, b, probs: dict, y, skip_accuracy: dict, data_name: str, *,
                      device: str, backend: str, kind: str, model, same: bool,
                      images=None, reference_correct=None) -> dict:
    """Fit the joint router (pipeline/router_build.py) for one bundle, write its stopping
    record and the merged pieces of the spans its dropped exits leave (quantized like the
    other pieces in an int8 build)."""
    from pipeline.router_build import add_router_pieces, fit_bundle_router, router_annotation
    from runtime.bundle import Bundle
    from runtime.manifest import MANIFEST_NAME, save_manifest

    c = ctx.cfg.calibrate
    m = b.manifest
    full = "F" * m.stages
    fit = fit_bundle_router(m, probs, y, device, backend, max_drop=float(c.max_drop),
                            delta=c.risk_delta, epsilon=float(c.epsilon),
                            reference_correct=reference_correct, progress=ctx.log)
    new = m.copy()
    new.stopping, ann = router_annotation(
        fit, skip_accuracy, full, data=data_name, n=len(y), backend=model.backend,
        target=model.target, device=device, table_backend=backend, kind=kind,
        max_drop=float(c.max_drop), risk_delta=c.risk_delta, epsilon=float(c.epsilon),
        extra={"by": "pipeline build", "predictions_from": (
            "this bundle" if same else f"this machine's {model.backend} artifacts "
            f"({model.target}) of the same ONNX pieces (the host bundle): the same predictions")})
    new.annotations = {**new.annotations, "calibration": ann}
    save_manifest(new, b.root / MANIFEST_NAME)
    merged = add_router_pieces(b.root, fit.rule, progress=ctx.log)
    if merged:
        ctx.log(f"merged pieces for the router's multi-stage spans: {', '.join(merged)}")
        if build_precision(ctx) == "int8" and images is not None:
            from export.quantize import quantize_bundle

            quantize_bundle(b.root, images[:1024], progress=ctx.log)
    Bundle.open(b.root, verify=True)
    return {"rule": "router", "params": fit.rule.params(), "skip_config": full,
            "val_accuracy": fit.val_accuracy, "full_depth_accuracy": skip_accuracy[full],
            "config_full_depth_accuracy": skip_accuracy[full],
            "mean_latency_ms": fit.mean_latency_ms, "mean_exit": ann["mean_exit"],
            "exit_histogram": fit.exit_histogram, "segment_ms": None,
            "cost_source": ann["segment_ms_source"], "costs_kind": kind, "device": device,
            "backend": backend, "target": {"max_drop": c.max_drop, "mean_budget_ms": None,
                                           "risk_delta": c.risk_delta},
            "details": ann["router"], "merged_pieces": merged, "search": None}


def archive_name(ctx: _Ctx, model_name: str) -> str:
    # A model of your own is named by its "module:factory" spec: no ':' (tar/scp read host:path).
    from export.backends import artifact_id

    return f"{artifact_id(model_name)}-{ctx.profile.name}"


def _package_inputs(ctx: _Ctx) -> dict:
    cal = ctx.outputs["calibrate"]
    return {"calibrated": {k: cal[k] for k in ("device", "host", "calib") if k in cal},
            "monolithic": ctx.outputs["export"]["monolithic"],
            "archive": ctx.cfg.build.archive,
            "code": code_hash("export/archive.py", "runtime/atomic.py", "pipeline/build.py")}


def _package_run(ctx: _Ctx, input_hash: str) -> dict:
    from export.archive import pack_bundle
    from runtime.atomic import atomic_directory, atomic_write_bytes
    from runtime.bundle import Bundle

    paths, log = ctx.paths, ctx.log
    with atomic_directory(paths.bundle, overwrite=True) as tmp:
        shutil.copytree(paths.calibrated / "device", tmp, dirs_exist_ok=True)
        Bundle.open(tmp, verify=True)
    log(f"wrote {paths.bundle} (ships to {ctx.profile.name})")
    out: dict[str, Any] = {"device": sha256_file(paths.bundle / "manifest.json")}
    if not ctx.is_host:
        with atomic_directory(paths.host, overwrite=True) as tmp:
            shutil.copytree(paths.calibrated / "host", tmp, dirs_exist_ok=True)
            Bundle.open(tmp, verify=True)
        log(f"wrote {paths.host} (the same weights for this machine: the measured numbers)")
        out["host"] = sha256_file(paths.host / "manifest.json")
    calib = paths.root / "calib.npz"  # the calibration set, beside the bundle(s)
    atomic_write_bytes(calib, (paths.calibrated / "calib.npz").read_bytes())
    out["calib"] = sha256_file(calib)
    log(f"wrote {calib} (calibration set for `pipeline calibrate/benchmark` on the device; "
        f"{calib.stat().st_size / 2**20:.1f} MiB)")
    mono = paths.root / "monolithic.onnx"  # the static baseline `pipeline benchmark` compares
    atomic_write_bytes(mono, paths.monolithic.read_bytes())
    out["monolithic"] = sha256_file(mono)
    log(f"wrote {mono} (the whole model as one graph: the baseline of `pipeline benchmark`)")
    for old in paths.root.glob("*.tar.gz"):
        old.unlink()
    if ctx.cfg.build.archive:
        m = Bundle.open(paths.bundle, verify=False).manifest
        name = archive_name(ctx, m.model.name)
        arc = paths.root / f"{name}.tar.gz"
        pack_bundle(paths.bundle, arc, arcname=name)
        log(f"wrote {arc} ({arc.stat().st_size / 1024:.1f} KiB; unpacks to {name}/)")
        out["archive"] = arc.name
        out["archive_sha256"] = sha256_file(arc)
    return out


def _package_ok(ctx: _Ctx, out: dict) -> bool:
    p = ctx.paths
    ok = _bundle_ok(p.bundle, out.get("device"))
    if "host" in out:
        ok = ok and _bundle_ok(p.host, out["host"])
    calib = p.root / "calib.npz"
    ok = ok and calib.is_file() and sha256_file(calib) == out.get("calib")
    mono = p.root / "monolithic.onnx"
    ok = ok and mono.is_file() and sha256_file(mono) == out.get("monolithic")
    if out.get("archive"):
        arc = p.root / out["archive"]
        ok = ok and arc.is_file() and sha256_file(arc) == out.get("archive_sha256")
    return ok


def _evaluate_inputs(ctx: _Ctx) -> dict:
    pk = ctx.outputs["package"]
    return {"evaluate": ctx.cfg.section_dict("evaluate"),
            "bundles": {k: pk[k] for k in ("device", "host") if k in pk},
            "monolithic": ctx.outputs["export"]["monolithic"],
            "val": ctx.outputs["calibrate"]["val"], "machine": _host_identity(),
            "data": data_identity(ctx.cfg.train.data, ctx.cfg.train.data_root),
            "code": code_hash("runtime", "devices", "pipeline/build.py", "pipeline/evaluate.py")}


def _evaluate_run(ctx: _Ctx, input_hash: str) -> dict:
    from runtime.atomic import atomic_directory, atomic_write_json

    paths = ctx.paths
    results = evaluate_build(ctx)
    with atomic_directory(paths.evaluation, overwrite=True) as tmp:
        atomic_write_json(tmp / "results.json", json_safe(results))
    return {"results": sha256_file(paths.evaluation / "results.json")}


def evaluate_build(ctx: _Ctx) -> dict:
    """The evaluate stage: test-set numbers of the packaged bundles (pipeline/evaluate.py)."""
    import numpy as np

    from devices.latency import STATS, cumulative_table, segment_costs_ms
    from pipeline import evaluate as ev
    from pipeline.runtime_cmd import dataset_for_bundle, split_arrays
    from runtime.model import AdaptiveModel
    from runtime.rules import rule_from_stopping

    cfg, paths, log = ctx.cfg, ctx.paths, ctx.log
    e = cfg.evaluate
    here = paths.bundle if ctx.is_host else paths.host
    model = AdaptiveModel.load(here, warn=False)
    m = model.manifest
    S = m.stages
    full = "F" * S
    mono_info = json.loads((paths.export / "monolithic.json").read_text())
    mono_macs = int(mono_info["macs"])
    data_name, ds = dataset_for_bundle(m, _bundle_data(cfg), cfg.train.data_root)
    x, y = split_arrays(ds.test, e.limit or None)
    if len(y) == 0:
        raise BuildError(f"data set {data_name!r} has an empty test split")
    limited = ", --eval-limit" if e.limit else ""
    log(f"evaluate on {data_name} test split ({len(y)} images{limited})"
        f" with {model.backend} ({model.target}) on this machine")
    probs = ev.config_probabilities(_batch_model(ctx, here), x, batch_size=e.batch_size,
                                    progress=log)
    host_dev = model.latency_device
    host_backend = model.table.backend
    table = cumulative_table(m, host_dev, host_backend, 1, stats=STATS)
    cal = m.annotations.get("calibration") or {}
    cal_cfg = cal.get("skip_config") or full
    val = np.load(paths.calibrated / "val.npz")
    val_y = val["labels"]
    val_probs = val[f"p_{cal_cfg}"]
    p50 = segment_costs_ms(m, host_dev, host_backend, cal_cfg, 1, "p50")

    static = ev.static_points(probs, y, m, table, mono_macs)
    skip_acc = m.stopping.skip_accuracy
    offset = 100.0 * (skip_acc.get(full, 0.0) - skip_acc.get(cal_cfg, 0.0))
    curves = ev.rule_curves(e.rules, e.max_drops, val_probs, val_y, probs[cal_cfg], y, cal_cfg,
                            p50, table, m, mono_macs, drop_offset_points=offset, progress=log)
    rule = rule_from_stopping(m.stopping)
    cum_mean = np.array([r["mean"] for r in table[cal_cfg]])
    cum_p99 = np.array([r["p99"] for r in table[cal_cfg]])
    if m.stopping.rule == "router":
        deployed = ev.router_operating_point(rule, probs, y, m, table, mono_macs)
    else:
        deployed_exits = (ev.simulate_exits(rule, probs[cal_cfg], p50) if rule is not None
                          else np.full(len(y), S - 1))
        deployed = ev.operating_point(probs[cal_cfg], y, deployed_exits, cum_mean, cum_p99, m,
                                      cal_cfg, mono_macs)
    deployed.update(rule=m.stopping.rule or "full", kind="simulated")
    full_exits = np.full(len(y), S - 1)
    full_pt = ev.operating_point(probs[full], y, full_exits,
                                 np.array([r["mean"] for r in table[full]]),
                                 np.array([r["p99"] for r in table[full]]), m, full, mono_macs)
    full_pt.update(rule="full", kind="simulated")
    default_cfg = model.default_skip_config
    budgets = list(e.budgets_ms) or ev.default_budgets(table, default_cfg)
    bpoints = ev.budget_points(model, budgets, probs, y, table, mono_macs)
    headline_budget = e.headline_budget_ms or budgets[len(budgets) // 2]

    mono = ev.MonolithicSession.like(model, paths.monolithic)
    n_meas = min(len(y), e.measure_limit or len(y))
    log(f"measure at batch 1, interleaved: monolithic ONNX Runtime session, segmented full depth, "
        f"adaptive ({m.stopping.rule or 'full'}), budget {headline_budget:g} ms; {n_meas} images "
        f"(threads: intra {mono.options['intra_op_threads'] or 'auto'}, inter "
        f"{mono.options['inter_op_threads'] or 'auto'})")
    headline = ev.measure_headline(model, mono, x[:n_meas], y[:n_meas], full_config=full,
                                   budget_ms=headline_budget, mono_macs=mono_macs,
                                   warmup=e.warmup, progress=log)
    if n_meas == len(y):
        mono_acc = headline["variants"]["monolithic"]["accuracy"]
    else:
        mono_acc = mono.accuracy(x, y, e.batch_size)
    from devices.host import fingerprint

    fp = fingerprint()
    results: dict[str, Any] = {
        "data": {"name": data_name, "split": "test", "n": int(len(y)),
                 "limited": bool(e.limit), "val_n": int(len(val_y))},
        "host": {"device": host_dev, "backend": host_backend, "target": model.target,
                 "bundle": here.name, "latency_kind": m.latency_kind(host_dev, host_backend, 1),
                 "machine": {k: fp.get(k) for k in ("arch", "cpu_model", "cpu_cores",
                                                    "usable_cores", "onnxruntime", "numpy",
                                                    "python")},
                 "threads": mono.options},
        "monolithic": {**mono_info, "accuracy": mono_acc},
        "calibration": {"skip_config": cal_cfg, "rule": m.stopping.rule,
                        "params": m.stopping.params, "val_accuracy": m.stopping.val_accuracy,
                        "segment_ms": p50, "full_depth_val_accuracy": cal.get("full_depth_accuracy")},
        "latency_table": {cfg_: rows for cfg_, rows in table.items()},
        "static": static, "rule_curves": curves, "budgets": bpoints,
        "deployed": deployed, "full_depth": full_pt, "headline_budget_ms": headline_budget,
        "measured": headline,
        "test_full_depth_accuracy_per_config": {k: float((p[-1].argmax(axis=1) == y).mean())
                                                for k, p in probs.items()},
    }
    # --- measured budget sweep (issue 12 item 5; pipeline/evaluate.py:budget_sweep) ---
    n_sweep = min(len(y), e.measure_limit or ev.SWEEP_DEFAULT_LIMIT)
    results["budget_sweep"] = ev.budget_sweep(model, x[:n_sweep], y[:n_sweep], table, static,
                                              mono=mono, warmup=e.warmup, progress=log)
    # --- end of the budget sweep ---
    if not ctx.is_host:
        results["device_estimate"] = _device_estimate(ctx, probs, y, mono_macs)
    return results


def _device_estimate(ctx: _Ctx, probs: dict, y, mono_macs: int) -> dict:
    """The shipped bundle's own rule and ESTIMATED latency on the device, on the test set."""
    import numpy as np

    from devices.latency import cumulative_table, segment_costs_ms
    from pipeline import evaluate as ev
    from runtime.bundle import Bundle
    from runtime.rules import rule_from_stopping

    m = Bundle.open(ctx.paths.bundle, verify=False).manifest
    S = m.stages
    dev = ctx.profile.name
    out: dict[str, Any] = {"device": dev, "kind": "estimated", "backends": {}}
    cal = m.annotations.get("calibration") or {}
    cfg_ = cal.get("skip_config") or "F" * S
    rule = rule_from_stopping(m.stopping)
    order = list(m.deployment.backend_order) if m.deployment else []
    for b in order:
        if not m.latency_group(dev, b, 1):
            continue
        table = cumulative_table(m, dev, b, 1, stats=("mean", "p99"))
        p50 = segment_costs_ms(m, dev, b, cfg_, 1, "p50")
        if m.stopping.rule == "router":
            pt = ev.router_operating_point(rule, probs, y, m, table, mono_macs)
        else:
            exits = ev.simulate_exits(rule, probs[cfg_], p50) if rule is not None \
                else np.full(len(y), S - 1)
            cum = np.array([r["mean"] for r in table[cfg_]])
            pt = ev.operating_point(probs[cfg_], y, exits, cum,
                                    np.array([r["p99"] for r in table[cfg_]]), m, cfg_, mono_macs)
        pt["full_depth_latency_ms"] = float(table["F" * S][-1]["mean"])
        pt["speedup_vs_full_depth"] = pt["full_depth_latency_ms"] / max(pt["mean_latency_ms"], 1e-12)
        pt["cumulative_ms"] = {c: [r["mean"] for r in rows] for c, rows in table.items()}
        out["backends"][b] = pt
    out["rule"] = m.stopping.rule
    out["skip_config"] = cfg_
    out["val_accuracy"] = m.stopping.val_accuracy
    out["calibrated_with"] = cal.get("segment_ms_source")
    return out


def _evaluate_ok(ctx: _Ctx, out: dict) -> bool:
    p = ctx.paths.evaluation / "results.json"
    return p.is_file() and sha256_file(p) == out.get("results")


def _report_inputs(ctx: _Ctx) -> dict:
    return {"results": ctx.outputs["evaluate"]["results"],
            "acceptance": ctx.cfg.section_dict("acceptance"),
            "package": {k: v for k, v in ctx.outputs["package"].items()},
            "config": content_hash(ctx.cfg.to_dict()),
            "code": code_hash("pipeline/report.py", "pipeline/report_plots.py", "devices/plots.py")}


def _report_run(ctx: _Ctx, input_hash: str) -> dict:
    from pipeline.report import write_report

    results = json.loads((ctx.paths.evaluation / "results.json").read_text())
    stages = [ctx.records[s].to_dict() for s in STAGES if s in ctx.records]
    written = write_report(ctx.paths.root, results=results, cfg=ctx.cfg, profile=ctx.profile,
                           is_host=ctx.is_host, stages=stages,
                           archive=ctx.outputs["package"].get("archive"),
                           train_summary=ctx.outputs.get("train"), log=ctx.log)
    return {name: sha256_file(path) for name, path in written.items()}


def _report_ok(ctx: _Ctx, out: dict) -> bool:
    root = ctx.paths.root
    return all((root / name).is_file() and sha256_file(root / name) == sha
               for name, sha in out.items())


_STAGE_FNS = {
    "train": (_train_inputs, _train_run, _train_ok),
    "export": (_export_inputs, _export_run, _export_ok),
    "compile": (_compile_inputs, _compile_run,
                lambda ctx, out: _bundles_ok(ctx.paths.compiled, out)),
    "profile": (_profile_inputs, _profile_run,
                lambda ctx, out: _bundles_ok(ctx.paths.profiled, out)),
    "calibrate": (_calibrate_inputs, _calibrate_run,
                  lambda ctx, out: _bundles_ok(ctx.paths.calibrated, out)
                  and (ctx.paths.calibrated / "val.npz").is_file()
                  and sha256_file(ctx.paths.calibrated / "val.npz") == out.get("val")
                  and (ctx.paths.calibrated / "calib.npz").is_file()
                  and sha256_file(ctx.paths.calibrated / "calib.npz") == out.get("calib")),
    "package": (_package_inputs, _package_run, _package_ok),
    "evaluate": (_evaluate_inputs, _evaluate_run, _evaluate_ok),
    "report": (_report_inputs, _report_run, _report_ok),
}

_DESCRIPTIONS = {
    "train": "train the model",
    "export": "export ONNX pieces + the monolithic ONNX",
    "compile": "compile for the device's backends",
    "profile": "latency tables",
    "calibrate": "fit the stopping rule on the validation split",
    "package": "publish the bundle (+ archive)",
    "evaluate": "test set through the runtime",
    "report": "report.md, report.json, plots",
}


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------

def _effective_config(cfg: BuildConfig, paths: BuildPaths, log: Log) -> BuildConfig:
    """Fill in what the build decides: the training run directory, and with --checkpoint the
    recipe the checkpoint was trained with."""
    train = dataclasses.replace(cfg.train, out=str(paths.train))
    if cfg.build.checkpoint:
        ckpt = Path(cfg.build.checkpoint)
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint not found: {ckpt}")
        from train.checkpoint import load_checkpoint
        from train.config import TrainConfig

        state = load_checkpoint(ckpt)
        saved = dict(state.get("config") or {})
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        saved = {k: v for k, v in saved.items() if k in known}
        if cfg.train.data_root:
            saved["data_root"] = cfg.train.data_root
        saved["out"] = str(Path(saved.get("out") or ckpt.parent))
        train = TrainConfig.from_dict(saved, source=str(ckpt))
        build = dataclasses.replace(cfg.build, checkpoint=str(ckpt.resolve()))
        return dataclasses.replace(cfg, train=train, build=build)
    return dataclasses.replace(cfg, train=train)


def _ctx(cfg: BuildConfig, log: Log, dry_run: bool) -> _Ctx:
    ctx = _Ctx(cfg, log, dry_run=dry_run)
    eff = _effective_config(cfg, ctx.paths, log)
    if not eff.build.device.lower().endswith(".toml"):  # aliases: record the profile's name
        eff = dataclasses.replace(eff, build=dataclasses.replace(eff.build,
                                                                 device=ctx.profile.name))
    ctx.cfg = eff
    return ctx


def plan_build(cfg: BuildConfig, *, force: bool = False, log: Log = print) -> BuildResult:
    """What a build would do (reuse or build, per stage, and why), without writing anything."""
    return run_build(cfg, force=force, dry_run=True, log=log)


def run_build(cfg: BuildConfig, *, force: bool = False, dry_run: bool = False,
              log: Log = print, fail_after: Optional[str] = None) -> BuildResult:
    """Run (or with ``dry_run`` only plan) the build of ``cfg``; see the module docstring.

    ``force`` rebuilds every stage. ``fail_after`` (tests) raises right after that stage's
    outputs are written, before its state is recorded, as a build killed there would.
    """
    t_all = time.perf_counter()
    ctx = _ctx(cfg, log, dry_run)
    paths = ctx.paths
    header = (f"build {paths.root}: {ctx.cfg.train.model} on {ctx.cfg.train.data} for "
              f"{ctx.profile.name} ({ctx.profile.arch}"
              + ("; this machine" if ctx.is_host else
                 "; not this machine: device latency ESTIMATED, measured numbers from a host "
                 "bundle") + ")")
    log(header)
    if not dry_run:
        paths.root.mkdir(parents=True, exist_ok=True)
        _cleanup_stale(paths.root)
        from runtime.atomic import atomic_write_text

        atomic_write_text(paths.build_toml, ctx.cfg.to_toml(
            "Effective config of `pipeline build` (defaults < --config file < options).\n"
            f"Rebuild with: pipeline build --config {paths.build_toml}"))
        ctx.state["device"] = ctx.profile.name
    stages_state = ctx.state.setdefault("stages", {})
    upstream_changed: Optional[str] = None
    for i, name in enumerate(STAGES, 1):
        inputs_fn, run_fn, ok_fn = _STAGE_FNS[name]
        prev = stages_state.get(name) or {}
        t0 = time.perf_counter()
        if name == "train" and ctx.cfg.build.checkpoint:
            ins = inputs_fn(ctx)
            ctx.outputs[name] = {"checkpoint": ins["checkpoint"], "sha256": ins["sha256"]}
            ctx.records[name] = StageRecord(name, "external", 0.0,
                                            f"--checkpoint {ctx.cfg.build.checkpoint}")
            log(f"[{i}/{len(STAGES)}] train: skipped, using checkpoint {ctx.cfg.build.checkpoint}")
            continue
        if dry_run and upstream_changed:
            ctx.records[name] = StageRecord(name, "build", 0.0,
                                            f"after {upstream_changed} (its outputs change)")
            continue
        ins = inputs_fn(ctx)
        h = content_hash(ins)
        why = ""
        reuse = False
        if force:
            why = "--force"
        elif not prev:
            why = "no previous build"
        elif prev.get("input_hash") != h:
            why = "inputs changed"
        elif not ok_fn(ctx, prev.get("outputs") or {}):
            why = "outputs missing or modified"
        else:
            reuse = True
        if dry_run:
            if reuse:
                ctx.outputs[name] = prev["outputs"]
                ctx.records[name] = StageRecord(name, "reuse", 0.0, "inputs unchanged",
                                                prev.get("seconds"))
            else:
                ctx.records[name] = StageRecord(name, "build", 0.0, why)
                upstream_changed = name
            continue
        if reuse:
            ctx.outputs[name] = prev["outputs"]
            ctx.records[name] = StageRecord(name, "reused", time.perf_counter() - t0,
                                            "inputs unchanged", prev.get("seconds"))
            log(f"[{i}/{len(STAGES)}] {name}: reused ({_DESCRIPTIONS[name]}; inputs unchanged)")
            continue
        log(f"[{i}/{len(STAGES)}] {name}: {_DESCRIPTIONS[name]} ({why})")
        stages_state.pop(name, None)  # a half-done stage must never look complete
        _save_state(paths.state, ctx.state)
        try:
            if name == "train":
                outputs = run_fn(ctx, h)
            else:
                with _torch_single_thread():
                    outputs = run_fn(ctx, h)
        except BaseException:
            ctx.records[name] = StageRecord(name, "failed", time.perf_counter() - t0, why)
            raise
        seconds = time.perf_counter() - t0
        if fail_after == name:
            raise KeyboardInterrupt(f"simulated interruption after the {name} stage")
        ctx.outputs[name] = outputs
        ctx.records[name] = StageRecord(name, "built", seconds, why, seconds)
        stages_state[name] = {"input_hash": h, "outputs": json_safe(outputs),
                              "seconds": round(seconds, 3),
                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _save_state(paths.state, ctx.state)
        log(f"      {name} built in {seconds:.1f} s")
    report = None
    if not dry_run and paths.report_json.is_file():
        report = json.loads(paths.report_json.read_text())
    return BuildResult(root=paths.root, device=ctx.profile.name,
                       stages=[ctx.records[s] for s in STAGES], dry_run=dry_run, report=report,
                       seconds=time.perf_counter() - t_all)
