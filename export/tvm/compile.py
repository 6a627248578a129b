"""Compile one ONNX piece with Apache TVM (Relax) into a shared library for one target.

``compile_onnx(piece.onnx, {"kind": "llvm"}, "out/piece0.x86_64-llvm.so")`` imports the piece with
``tvm.relax.frontend.onnx.from_onnx`` (weights become constants inside the library), builds it and
links it with the compiler for the target's CPU (``g++`` here, ``aarch64-linux-gnu-g++`` for an
aarch64 ``mtriple``). Next to the library it writes ``<library>.json`` (:class:`TVMArtifact`):
input/output names, shapes and dtypes, batch handling, target, slug, tuning state. The runtime
(``runtime/backends/tvm_runner.py``) reads it to name the outputs.

Batch axis (measured with TVM 0.27, see docs/tvm.md): untuned pieces keep the ONNX symbolic batch
dimension (``batch=None``); it costs nothing at batch 1 and serves any batch size. MetaSchedule
cannot tune symbolic shapes, so tuned pieces are compiled for a fixed batch (``batch`` or 1); the
artifact records it and the runner splits larger batches into chunks of that size.

CUDA: TVM 0.27 leaves the kernels as CUDA C++ source when no CUDA driver is present (this build
machine) and the runtime would then need TVM's Python nvcc/nvrtc callback on the device to JIT
them. We compile them ahead of time with ``nvcc`` into a fatbin (SASS + PTX for the target arch) and
store that in the library instead, so ``nvcc`` must be on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .targets import (
    TargetError,
    canonical_target_json,
    cross_compiler,
    host_target,
    target_slug,
    to_tvm_target,
    validate_target,
)
from export.errors import CompileError

from .tune import TuningResult, sha256_file, tune_module

__all__ = ["TVMArtifact", "compile_onnx", "metadata_path", "require_tvm"]

Progress = Callable[[str], None] | None

# Debian packages that provide the cross compilers named by targets.cross_compiler().
_CXX_PACKAGES = {
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "arm-linux-gnueabihf-g++": "g++-arm-linux-gnueabihf",
    "riscv64-linux-gnu-g++": "g++-riscv64-linux-gnu",
    "x86_64-linux-gnu-g++": "g++-x86-64-linux-gnu",
    "g++": "g++",
}


@dataclass
class TVMArtifact:
    """A compiled piece: the library file plus what a runtime needs to call it."""

    path: Path
    target: dict[str, Any]
    target_slug: str
    input_names: list[str]
    input_shapes: list[list[int | str]]  # symbolic dims (the batch) as their name, e.g. "N"
    input_dtypes: list[str]
    output_names: list[str]
    output_shapes: list[list[int | str]]
    output_dtypes: list[str]
    batch: int | None  # None: symbolic batch (any size); else the fixed compiled batch
    onnx_sha256: str
    cxx: str  # compiler that linked the library
    tuned: bool = False
    tune_trials: int = 0  # trials in the database that was applied
    tuning_reused: bool = False  # the database came from the cache (no trials run this time)
    tuned_tasks: int = 0  # tasks with a tuning record (applied) ...
    total_tasks: int = 0  # ... out of this many tunable tasks
    tuning_db: str | None = None
    cuda_format: str | None = None  # "fatbin" for CUDA targets
    compile_seconds: float = 0.0
    tvm_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.path

    @property
    def metadata_path(self) -> Path:
        return metadata_path(self.path)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TVMArtifact:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["path"] = Path(kw["path"])
        return cls(**kw)

    def save(self) -> Path:
        meta = self.to_dict()
        meta["path"] = self.path.name  # relative: the bundle may move
        self.metadata_path.write_text(json.dumps(meta, indent=2) + "\n")
        return self.metadata_path

    @classmethod
    def load(cls, library: str | os.PathLike) -> TVMArtifact:
        library = Path(library)
        d = json.loads(metadata_path(library).read_text())
        d["path"] = str(library)
        return cls.from_dict(d)


def metadata_path(library: str | os.PathLike) -> Path:
    """``piece.so`` -> ``piece.so.json``."""
    library = Path(library)
    return library.with_name(library.name + ".json")


def require_tvm():
    try:
        import tvm  # noqa: PLC0415
        from tvm.relax.frontend import onnx as _  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ImportError(
            "Apache TVM is needed to compile TVM pieces: pip install 'apache-tvm==0.27.0.post1' "
            "'apache-tvm-ffi==0.1.14.post1' (the project's 'tvm' extra)"
        ) from exc
    return tvm


def _say(progress: Progress, msg: str) -> None:
    if progress is not None:
        progress(msg)


# --------------------------------------------------------------------------------------------
# ONNX signature
# --------------------------------------------------------------------------------------------


def _onnx_signature(model) -> tuple[list[str], list[list[int | str]], list[str], list[str]]:
    import onnx  # noqa: PLC0415

    inits = {i.name for i in model.graph.initializer}
    names, shapes, dtypes = [], [], []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or "?")
        names.append(vi.name)
        shapes.append(dims)
        dtypes.append(str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))
    outputs = [o.name for o in model.graph.output]
    return names, shapes, dtypes, outputs


def _relax_shape(tensor_type) -> list[int | str]:
    dims: list[int | str] = []
    for v in tensor_type.shape.values:
        try:
            dims.append(int(v))
        except (TypeError, ValueError):
            dims.append(str(v))
    return dims


def _relax_outputs(mod) -> tuple[list[list[int | str]], list[str]]:
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    return [_relax_shape(f) for f in fields], [str(f.dtype) for f in fields]


# --------------------------------------------------------------------------------------------
# CUDA: compile the kernels ahead of time and repack the library's import blob
# --------------------------------------------------------------------------------------------


class _Blob:
    """Reader/writer for tvm-ffi's packed import blob (``__tvm_ffi__library_bin``).

    Layout (all integers u64 little endian): total length of the rest; import tree row pointers
    (count + values); child indices (count + values); then per module its kind (length + bytes) and,
    except for the ``_lib`` placeholder, its serialized bytes (length + bytes). A CUDA module's
    bytes are ``[fmt string][function map][code bytes]``.
    """

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u64(self) -> int:
        (v,) = struct.unpack_from("<Q", self.data, self.pos)
        self.pos += 8
        return v

    def chunk(self) -> bytes:
        n = self.u64()
        out = self.data[self.pos : self.pos + n]
        if len(out) != n:
            raise CompileError("truncated TVM import blob")
        self.pos += n
        return out

    @staticmethod
    def parse(data: bytes) -> tuple[list[int], list[int], list[tuple[bytes, bytes | None]]]:
        r = _Blob(data)
        total = r.u64()
        if total != len(data) - 8:
            raise CompileError(f"unexpected TVM import blob header ({total} != {len(data) - 8})")
        rows = [r.u64() for _ in range(r.u64())]
        children = [r.u64() for _ in range(r.u64())]
        modules: list[tuple[bytes, bytes | None]] = []
        while r.pos < len(data):
            kind = r.chunk()
            modules.append((kind, None if kind == b"_lib" else r.chunk()))
        return rows, children, modules

    @staticmethod
    def build(rows: list[int], children: list[int], modules: list[tuple[bytes, bytes | None]]) -> bytes:
        def u64(v: int) -> bytes:
            return struct.pack("<Q", v)

        def chunk(b: bytes) -> bytes:
            return u64(len(b)) + b

        body = u64(len(rows)) + b"".join(map(u64, rows))
        body += u64(len(children)) + b"".join(map(u64, children))
        for kind, payload in modules:
            body += chunk(kind)
            if payload is not None:
                body += chunk(payload)
        return u64(len(body)) + body


def _cuda_module_source(payload: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a CUDA module's bytes into (fmt, fmap bytes, code)."""
    r = _Blob(payload)
    fmt = r.chunk()
    # code is the last field; fmap sits between fmt and code. Find code's length prefix by
    # walking back: the code is everything after the u64 that equals the remaining length.
    start = r.pos
    for cut in range(start, len(payload) - 7):
        (n,) = struct.unpack_from("<Q", payload, cut)
        if n == len(payload) - cut - 8:
            return fmt, payload[start:cut], payload[cut + 8 :]
    raise CompileError("cannot locate the kernel code in TVM's CUDA module")


def _nvcc_fatbin(source: str, arch: str, tvm_target) -> bytes:
    from tvm.support import nvcc  # noqa: PLC0415

    sm = arch.split("_", 1)[1]
    gencode = ["-gencode", f"arch=compute_{sm.rstrip('af')},code=[sm_{sm},compute_{sm.rstrip('af')}]"]
    with tvm_target:
        out = nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc")
    return bytes(out)


def _make_cuda_packer(arch: str, tvm_target, progress: Progress, stats: dict[str, Any]):
    """``fpack_imports`` for export_library: kernels -> nvcc fatbin, blob -> assembler file."""
    from tvm.runtime import _ffi_api  # noqa: PLC0415

    def pack(mod, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        if is_system_lib or prefix:
            raise CompileError("CUDA export as a system library is not supported")
        blob = _ffi_api.ModulePackImportsToTensor(mod).numpy().tobytes()
        rows, children, modules = _Blob.parse(blob)
        new_modules = []
        for kind, payload in modules:
            if kind == b"cuda" and payload is not None:
                fmt, fmap, code = _cuda_module_source(payload)
                if fmt == b"cuda":
                    t0 = time.perf_counter()
                    fatbin = _nvcc_fatbin(code.decode(), arch, tvm_target)
                    _say(
                        progress,
                        f"tvm: nvcc {arch}: {len(code) // 1024} KiB CUDA source -> "
                        f"{len(fatbin) // 1024} KiB fatbin in {time.perf_counter() - t0:.1f} s",
                    )
                    fmt, code = b"fatbin", fatbin
                stats.setdefault("cuda_formats", []).append(fmt.decode())
                payload = struct.pack("<Q", len(fmt)) + fmt + fmap + struct.pack("<Q", len(code)) + code
            new_modules.append((kind, payload))
        bin_path = os.path.join(workspace_dir, "devc.bin")
        with open(bin_path, "wb") as f:
            f.write(_Blob.build(rows, children, new_modules))
        asm_path = os.path.join(workspace_dir, "devc.S")
        sym = "__tvm_ffi__library_bin"
        with open(asm_path, "w") as f:
            f.write(
                f'\t.section .rodata\n\t.globl {sym}\n\t.type {sym}, %object\n\t.balign 16\n'
                f'{sym}:\n\t.incbin "{bin_path}"\n{sym}_end:\n\t.size {sym}, {sym}_end - {sym}\n'
                '\t.section .note.GNU-stack,"",%progbits\n'
            )
        return asm_path

    return pack


# --------------------------------------------------------------------------------------------
# compile
# --------------------------------------------------------------------------------------------


def _require_tool(cmd: str, why: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        pkg = _CXX_PACKAGES.get(cmd)
        hint = f" (Debian/Ubuntu: apt-get install {pkg})" if pkg else ""
        raise CompileError(f"{why} needs `{cmd}` on PATH, which was not found{hint}")
    return path


def _arch_num(name: str) -> int:
    digits = "".join(c for c in name if c.isdigit())
    return int(digits) if digits else 0


def _check_nvcc_arch(nvcc: str, arch: str) -> None:
    """Fail early when this nvcc cannot generate code for ``arch`` (CUDA 13 dropped sm_5x-sm_72)."""
    import subprocess  # noqa: PLC0415

    try:
        res = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return  # old nvcc without the flag: let the compile itself report problems
    known = set(res.stdout.split())
    want = "compute_" + arch.split("_", 1)[1].rstrip("af")
    if res.returncode == 0 and known and want not in known:
        raise CompileError(
            f"{nvcc} cannot compile for {arch} (it supports {' '.join(sorted(known, key=_arch_num))}); put an nvcc "
            f"of the device's CUDA version first on PATH (e.g. CUDA 12.x for Jetson Xavier / JetPack 5-6)"
        )


def compile_onnx(
    onnx_path: str | os.PathLike,
    target: dict,
    out_path: str | os.PathLike,
    *,
    batch: int | None = None,
    tune_trials: int = 0,
    tuning_db_dir: Path | None = None,
    progress: Progress = None,
    cc: str | None = None,
) -> TVMArtifact:
    """Compile an ONNX piece for ``target`` into ``out_path`` (a ``.so``) plus ``<out>.json``.

    batch: ``None`` keeps a symbolic batch when untuned and uses batch 1 when tuning (MetaSchedule
    cannot tune symbolic shapes); an int compiles for exactly that batch.
    tune_trials: MetaSchedule trial budget (0: no tuning). A database cached under
    ``tuning_db_dir`` (default ``$ADN_TVM_TUNING_DB`` or ``~/.cache/adaptive-depth/tvm-tuning``)
    for the same (ONNX sha256, target slug) with at least that many trials is reused as is.
    progress: called with one-line status messages.
    cc: override the linker/cross compiler (default from the target's CPU architecture).
    """
    t_start = time.perf_counter()
    tdict = validate_target(target, check_with_tvm=False)
    onnx_path = Path(onnx_path)
    out_path = Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX piece not found: {onnx_path}")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be a positive int or None, got {batch!r}")
    if tune_trials < 0:
        raise ValueError("tune_trials must be >= 0")
    is_cuda = tdict["kind"] == "cuda"
    if is_cuda:
        nvcc = _require_tool("nvcc", f"compiling for CUDA target {target_slug(tdict)} (kernels are built ahead of time)")
        _check_nvcc_arch(nvcc, tdict["arch"])
    cxx = cc or cross_compiler(tdict)
    _require_tool(cxx, f"linking for {target_slug(tdict)} ({host_target(tdict).get('mtriple', 'host')})")

    tvm = require_tvm()
    import onnx  # noqa: PLC0415
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    validate_target(tdict, check_with_tvm=True)
    tvm_target = to_tvm_target(tdict)
    if tune_trials > 0 and tdict["kind"] == "llvm" and "num-cores" not in tdict:
        # MetaSchedule's CPU rules need num-cores; use the same target to compile.
        tdict_tune = dict(tdict, **{"num-cores": max(1, os.cpu_count() or 1)})
        tvm_target = to_tvm_target(tdict_tune)
    slug = target_slug(tdict)
    sha = sha256_file(onnx_path)

    model = onnx.load(str(onnx_path))
    in_names, in_shapes, in_dtypes, out_names = _onnx_signature(model)
    if not in_names:
        raise CompileError(f"{onnx_path} has no graph inputs")
    eff_batch = batch if batch is not None else (1 if tune_trials > 0 else None)
    shape_dict = None
    if eff_batch is not None:
        shape_dict = {}
        for name, shape in zip(in_names, in_shapes, strict=True):
            if not shape:
                raise CompileError(f"input {name!r} is a scalar; cannot set a batch size")
            rest = shape[1:]
            if any(not isinstance(d, int) for d in rest):
                raise CompileError(
                    f"input {name!r} has dynamic non-batch dims {shape}; only axis 0 may be dynamic"
                )
            shape_dict[name] = [eff_batch, *rest]
    _say(progress, f"tvm: importing {onnx_path.name} for {slug} (batch {eff_batch or 'symbolic'})")
    try:
        mod = from_onnx(model, shape_dict=shape_dict, keep_params_in_input=False)
    except Exception as exc:  # the frontend raises many types
        raise CompileError(f"TVM's ONNX frontend failed on {onnx_path}: {exc}") from exc
    out_shapes, out_dtypes = _relax_outputs(mod)
    if len(out_shapes) != len(out_names):
        raise CompileError(f"{onnx_path}: {len(out_names)} ONNX outputs but TVM returns {len(out_shapes)}")
    final_in_shapes = [
        [eff_batch, *s[1:]] if eff_batch is not None else s for s in in_shapes
    ]

    tuning: TuningResult | None = None
    try:
        if tune_trials > 0:
            from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

            database, tuning = tune_module(
                mod, tvm_target, tdict, sha, tune_trials, tuning_db_dir, progress=progress
            )
            _say(progress, "tvm: building with the tuning records")
            ex = ms.relax_integration.compile_relax(database, mod, tvm_target, None)
        else:
            _say(progress, f"tvm: building (untuned) for {slug}")
            ex = tvm.compile(mod, tvm_target)
    except (TargetError, CompileError):
        raise
    except Exception as exc:
        raise CompileError(f"TVM build of {onnx_path.name} for {slug} failed: {exc}") from exc

    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = {}
    tmp_out = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory(prefix="tvm-export-") as work:
            kwargs: dict[str, Any] = {"cc": cxx, "workspace_dir": work}
            if is_cuda:
                kwargs["fpack_imports"] = _make_cuda_packer(tdict["arch"], tvm_target, progress, stats)
            ex.export_library(str(tmp_out), **kwargs)
        os.replace(tmp_out, out_path)
    except (CompileError, TargetError):
        raise
    except Exception as exc:
        raise CompileError(f"exporting {out_path.name} with {cxx} failed: {exc}") from exc
    finally:
        if tmp_out.exists():
            tmp_out.unlink()

    art = TVMArtifact(
        path=out_path,
        target=json.loads(canonical_target_json(tdict)),
        target_slug=slug,
        input_names=in_names,
        input_shapes=final_in_shapes,
        input_dtypes=in_dtypes,
        output_names=out_names,
        output_shapes=out_shapes,
        output_dtypes=out_dtypes,
        batch=eff_batch,
        onnx_sha256=sha,
        cxx=cxx,
        tuned=tuning is not None and tuning.tasks_with_records > 0,
        tune_trials=tuning.trials_total if tuning else 0,
        tuning_reused=bool(tuning and tuning.reused),
        tuned_tasks=tuning.tasks_with_records if tuning else 0,
        total_tasks=tuning.tasks_total if tuning else 0,
        tuning_db=str(tuning.database_dir) if tuning else None,
        cuda_format=(stats.get("cuda_formats") or [None])[0] if is_cuda else None,
        compile_seconds=round(time.perf_counter() - t_start, 3),
        tvm_version=str(tvm.__version__),
    )
    art.save()
    _say(progress, f"tvm: wrote {out_path} ({out_path.stat().st_size // 1024} KiB) in {art.compile_seconds:.1f} s")
    return art
