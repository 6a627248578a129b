"""TensorRT execution of one piece: a prebuilt engine, name-based I/O, cuda-python copies.

**Not yet run on real TensorRT.** TensorRT cannot be installed in this project's development
environment (no libnvinfer, no GPU). The calls below follow the TensorRT 10.x/11.x Python API
(checked against NVIDIA's API reference and the TensorRT Python bindings) and cuda-python's
runtime API. ``tests/test_tensorrt_runner.py`` checks them against fake ``tensorrt`` and
``cudart`` modules. See docs/tensorrt.md, "Runtime execution".

What it does:

* **Finds the engine, never builds one.** ``path`` is the piece's ``tensorrt`` artifact (the
  ONNX the bundle ships; the build plan comes with the artifact options) or a serialized engine
  (``.plan``/``.engine``/``.trt``). For the ONNX it looks up the engine that
  ``pipeline engines --bundle B`` built on this device:
  ``B/engines/<sm>_trt<version>/<piece>.plan``, keyed by (GPU compute capability, TensorRT
  version, ONNX sha256, plan hash) (:func:`runtime.backends.tensorrt_cache.find_engine`). If the
  engine is missing or stale it raises :class:`EngineNotBuiltError`, which tells the user to run
  ``pipeline engines --bundle B`` on the device.
* ``trt.Runtime(logger).deserialize_cuda_engine(bytes)``; I/O discovered by name
  (``engine.num_io_tensors``, ``get_tensor_name``, ``get_tensor_mode``, ``get_tensor_dtype``,
  ``get_tensor_shape``, ``get_tensor_profile_shape``).
* Each run calls ``context.set_input_shape`` (when the shape changed), reads the output shapes
  with ``context.get_tensor_shape``, calls ``context.set_tensor_address`` for every I/O tensor,
  copies host -> device with ``cudaMemcpyAsync``, calls ``context.execute_async_v3(stream)``,
  copies device -> host and calls ``cudaStreamSynchronize``.
* **Dynamic batch** within the engine's optimisation profile. A batch outside the profile
  raises :class:`EngineShapeError`, which names the limits.
* **Thread-safe.** With static input shapes, each thread gets its own execution context and
  CUDA stream (thread-local; a finished thread's context is handed to the next new thread).
  With dynamic shapes, TensorRT allows at most one context in concurrent use per optimisation
  profile ("each execution context in concurrent use must use a separate optimization
  profile"). So there is one context per profile, and callers wait for a free one. The engines
  ``pipeline engines`` builds have one profile, so their runs are serialised.
* Outputs are numpy arrays in the manifest's output order, with the manifest's dtypes.

``tensorrt`` and cuda-python (``cuda.bindings.runtime`` for cuda-python >= 12.6 / 13, else
``cuda.cudart``) are imported only when a runner is created, through guarded imports that
raise :class:`TensorRTImportError` with install hints. Both can be injected (``trt=``,
``cudart=``), which is how the tests run. Importing this module needs only numpy.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends.tensorrt_cache import (
    EngineNotBuiltError,
    find_bundle_root,
    find_engine,
    normalize_compute_capability,
    parse_trt_version,
    sha256_file,
    sm_tag,
    version_str,
)
from runtime.errors import UsageError
from runtime.manifest import MANIFEST_NAME, Manifest, Piece

__all__ = ["ENGINE_SUFFIXES", "EngineNotBuiltError", "EngineShapeError", "TensorRTImportError",
           "TensorRTPieceRunner", "TensorRTRunnerError", "import_cudart", "import_tensorrt"]

#: File suffixes taken to be serialized engines (anything else is the piece's ONNX).
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
#: cuda-python runtime modules, newest layout first (cuda-python >= 12.6 / 13, then <= 12.x).
CUDART_MODULES = ("cuda.bindings.runtime", "cuda.cudart")
_TRT_NP_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
                  "INT64": "int64", "BOOL": "bool"}
_MANIFEST_NP_DTYPES = {"float32", "float16", "int8", "uint8", "int32", "int64", "bool"}


# ------------------------------------------------------------------------------------- errors
class TensorRTImportError(ImportError):
    """``tensorrt`` (libnvinfer) or cuda-python is not installed on this machine."""


class TensorRTRunnerError(RuntimeError):
    """A TensorRT or CUDA call failed (deserialisation, context creation, execution, copies)."""


class EngineShapeError(UsageError):
    """The inputs do not fit the engine: missing names, wrong rank or sizes, batch outside the profile."""


# ------------------------------------------------------------------------------ guarded imports
def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTImportError` with install hints."""
    try:
        if importlib.util.find_spec("tensorrt") is None:
            raise ModuleNotFoundError("No module named 'tensorrt'")
        return importlib.import_module("tensorrt")
    except Exception as exc:  # ImportError, or OSError from a missing libnvinfer
        raise TensorRTImportError(
            f"TensorRT is not installed ({type(exc).__name__}: {exc}). On Jetson it ships with JetPack "
            "(JetPack 6 -> TensorRT 10.3: apt install python3-libnvinfer); on x86/SBSA: pip install "
            "'tensorrt>=10'. Then build the engines on this device with `pipeline engines --bundle B`.") from exc


def import_cudart():
    """cuda-python's runtime module (``cuda.bindings.runtime``, else ``cuda.cudart``)."""
    errors = []
    for name in CUDART_MODULES:
        try:
            return importlib.import_module(name)
        except Exception as exc:  # ModuleNotFoundError, or a CUDA driver/library mismatch
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise TensorRTImportError(
        "the TensorRT runner copies tensors to and from the GPU with cuda-python, which is not "
        f"importable ({'; '.join(errors)}). Install it with `pip install cuda-python`, choosing the major "
        "version that matches the device's CUDA (e.g. 'cuda-python>=12.6,<13' on JetPack 6 / CUDA 12). "
        "Neither torch nor pycuda is needed.")


# ------------------------------------------------------------------------------------ CUDA glue
def _error_code(err: Any) -> int:
    return int(getattr(err, "value", err))


class _Cuda:
    """The few cuda-python runtime calls the runner makes, with error checking.

    cuda-python functions return ``(cudaError_t, *values)``.
    """

    def __init__(self, rt, device_id: int):
        self.rt = rt
        self.device_id = int(device_id)

    def _name(self, err: Any) -> str:
        try:
            res = self.rt.cudaGetErrorName(err)
            text = res[-1] if isinstance(res, tuple) else res
            return text.decode() if isinstance(text, bytes) else str(text)
        except Exception:  # noqa: BLE001 - only for the message
            return str(getattr(err, "name", err))

    def call(self, what: str, result: Any):
        if isinstance(result, tuple):
            err, values = result[0], result[1:]
        else:
            err, values = result, ()
        code = _error_code(err)
        if code != 0:
            raise TensorRTRunnerError(f"CUDA error in {what}: {self._name(err)} (code {code})")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    def set_device(self) -> None:
        self.call(f"cudaSetDevice({self.device_id})", self.rt.cudaSetDevice(self.device_id))

    def compute_capability(self) -> str:
        attr = self.rt.cudaDeviceAttr
        major = self.call("cudaDeviceGetAttribute", self.rt.cudaDeviceGetAttribute(
            attr.cudaDevAttrComputeCapabilityMajor, self.device_id))
        minor = self.call("cudaDeviceGetAttribute", self.rt.cudaDeviceGetAttribute(
            attr.cudaDevAttrComputeCapabilityMinor, self.device_id))
        return f"{int(major)}.{int(minor)}"

    def malloc(self, nbytes: int) -> int:
        return int(self.call(f"cudaMalloc({nbytes})", self.rt.cudaMalloc(int(nbytes))))

    def free(self, ptr: int) -> None:
        self.call("cudaFree", self.rt.cudaFree(ptr))

    def stream_create(self):
        return self.call("cudaStreamCreate", self.rt.cudaStreamCreate())

    def stream_destroy(self, stream) -> None:
        self.call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def htod(self, dst: int, src: np.ndarray, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.call("cudaMemcpyAsync (host to device)",
                  self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream))

    def dtoh(self, dst: np.ndarray, src: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.call("cudaMemcpyAsync (device to host)",
                  self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream))

    def synchronize(self, stream) -> None:
        self.call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))


def _stream_handle(stream: Any) -> int:
    """``execute_async_v3`` takes the stream as an integer handle (cuda-python's cudaStream_t converts)."""
    return int(stream)


# ------------------------------------------------------------------------------ engine metadata
@dataclass(frozen=True)
class _Tensor:
    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # engine shape; -1 = dynamic

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)


@dataclass
class _Slot:
    """One execution context with its CUDA stream and device buffers (used by one caller at a time)."""
    context: Any
    stream: Any
    profile: int
    thread: threading.Thread | None = None
    buffers: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (pointer, capacity)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)   # input shapes last set


def _np_dtype(trt, dtype: Any, name: str) -> np.dtype:
    nptype = getattr(trt, "nptype", None)
    if nptype is not None:
        try:
            return np.dtype(nptype(dtype))
        except Exception:  # noqa: BLE001 - BF16/FP8/INT4 have no numpy type; try the name
            pass
    key = str(getattr(dtype, "name", dtype)).rsplit(".", 1)[-1].upper()
    if key in _TRT_NP_DTYPES:
        return np.dtype(_TRT_NP_DTYPES[key])
    raise TensorRTRunnerError(f"tensor '{name}': TensorRT dtype {dtype} has no numpy equivalent (BF16/FP8/INT4 "
                              "engine I/O is not supported; keep float32 I/O, e.g. AutoCast --keep_io_types)")


def _dims(d: Any) -> tuple[int, ...]:
    return tuple(int(x) for x in d)


@dataclass
class _Located:
    engine_path: Path
    bundle_dir: Path | None
    piece: Piece | None
    options: dict  # the piece's tensorrt artifact options (empty when unknown)
    sidecar: dict | None


# ------------------------------------------------------------------------------------ the runner
class TensorRTPieceRunner:
    """Runs one piece with a TensorRT engine built on this device; thread-safe.

    ``path``: the piece's ``tensorrt`` artifact (its ONNX) in a bundle, or an engine file.
    Options (the artifact's options plus the caller's ``runner_options``):

    * ``build_plan`` (from the artifact): the bundle's engine build plan; the engine found must
      agree with it on every option-derived field. ``compute_capability`` / ``trt_major`` (from
      the artifact): what the bundle was compiled for; only used to explain a missing engine.
    * ``bundle_dir``, ``piece_id``: default to the directory holding ``manifest.json`` above
      ``path`` and the piece whose ``tensorrt`` artifact is ``path``.
    * ``engine_path``: use this engine file and skip the cache lookup.
    * ``device_id`` (0): the CUDA device. ``verify`` (True): check the engine's sha256 against its
      sidecar. ``log_level`` ("warning"): TensorRT logger severity.
    * ``input_names`` / ``output_names``: override the manifest's order (mainly for bare engines).
    * ``trt`` / ``cudart``: the modules to use (default: guarded imports); the tests inject fakes.

    Unknown options (e.g. onnxruntime thread counts, ``profile_options``) are ignored.
    """

    def __init__(self, path: str | Path, *, build_plan: Mapping[str, Any] | None = None,
                 compute_capability: Any = None, trt_major: int | None = None,
                 bundle_dir: str | Path | None = None, piece_id: str | None = None,
                 engine_path: str | Path | None = None, device_id: int = 0, verify: bool = True,
                 log_level: str = "warning", input_names: list[str] | None = None,
                 output_names: list[str] | None = None, trt=None, cudart=None, **_ignored: Any) -> None:
        self._closed = False
        self._slots: list[_Slot] = []           # every context made, for close()
        self._slots_lock = threading.Lock()
        self._local = threading.local()         # static shapes: this thread's context
        self._cond = threading.Condition()      # dynamic shapes: one context per optimisation profile
        self._busy: set[int] = set()
        self._pool: dict[int, _Slot] = {}
        self.trt = trt if trt is not None else import_tensorrt()
        cudart = cudart if cudart is not None else import_cudart()
        self._cuda = _Cuda(cudart, device_id)
        self.path = Path(path)
        self.device_id = int(device_id)

        version_text = getattr(self.trt, "__version__", None)
        if not version_text:
            raise TensorRTImportError("cannot read tensorrt.__version__ from the TensorRT module")
        self.trt_version = parse_trt_version(version_text)
        if self.trt_version[0] < 10:
            raise TensorRTRunnerError(
                f"TensorRT {version_str(self.trt_version)} is not supported: the runner uses the name-based "
                "I/O API of TensorRT 10/11 (JetPack 5 devices should use the onnxruntime backend)")
        self._cuda.set_device()
        self.compute_capability = normalize_compute_capability(self._cuda.compute_capability())

        loc = self._locate(engine_path, bundle_dir, piece_id, verify, build_plan, compute_capability, trt_major)
        self.engine_path = loc.engine_path
        self.bundle_dir = loc.bundle_dir
        self.piece_id = loc.piece.id if loc.piece is not None else piece_id

        self._logger = self.trt.Logger(getattr(self.trt.Logger, str(log_level).upper(), self.trt.Logger.WARNING))
        self._runtime = self.trt.Runtime(self._logger)
        data = self.engine_path.read_bytes()
        self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            where = f" --bundle {self.bundle_dir}" if self.bundle_dir is not None else " --bundle B"
            raise TensorRTRunnerError(
                f"TensorRT {version_str(self.trt_version)} could not deserialize {self.engine_path} (see the "
                "TensorRT log); it was probably built by another TensorRT version or for another GPU. Rebuild "
                f"it on this device with `pipeline engines{where} --force`.")
        self._discover_io(loc.piece, input_names, output_names)

    # -- locating the engine -----------------------------------------------------------------
    def _locate(self, engine_path, bundle_dir, piece_id, verify, build_plan, expected_cc, trt_major) -> _Located:
        direct = Path(engine_path) if engine_path is not None else (
            self.path if self.path.suffix.lower() in ENGINE_SUFFIXES else None)
        root = Path(bundle_dir) if bundle_dir is not None else find_bundle_root(direct or self.path)
        manifest = None
        if root is not None and (root / MANIFEST_NAME).is_file():
            manifest = Manifest.from_json((root / MANIFEST_NAME).read_text(encoding="utf-8"),
                                          source=str(root / MANIFEST_NAME))
        piece, options = self._find_piece(manifest, root, piece_id, direct)

        if direct is not None:
            if not direct.is_file():
                raise EngineNotBuiltError(f"TensorRT engine file not found: {direct}")
            return _Located(direct, root, piece, options, self._check_bare_engine(direct, verify))

        if manifest is None:
            raise EngineNotBuiltError(
                f"cannot tell which bundle {self.path} belongs to (no {MANIFEST_NAME} in the directories above "
                "it); pass bundle_dir= and piece_id=, or engine_path= for an engine file")
        if piece is None:
            raise EngineNotBuiltError(
                f"{self.path} is not the tensorrt artifact of any piece in {root / MANIFEST_NAME}; pass piece_id=")
        plan = build_plan if build_plan is not None else options.get("build_plan")
        expected_cc = expected_cc if expected_cc is not None else options.get("compute_capability")
        trt_major = trt_major if trt_major is not None else options.get("trt_major")
        found = find_engine(root, piece.id, self.path, compute_capability=self.compute_capability,
                            trt_version=self.trt_version, build_plan=plan if isinstance(plan, Mapping) else None,
                            verify=verify, hint=self._hint(expected_cc, trt_major))
        return _Located(found.path, root, piece, options, found.sidecar)

    def _find_piece(self, manifest: Manifest | None, root: Path | None, piece_id: str | None,
                    direct: Path | None) -> tuple[Piece | None, dict]:
        if manifest is None:
            return None, {}
        try:
            rel = self.path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            rel = None
        if piece_id is not None:
            try:
                piece = manifest.piece(piece_id)
            except KeyError:
                raise EngineNotBuiltError(f"piece {piece_id!r} is not in {root / MANIFEST_NAME}") from None
        else:
            piece = None
            matches = [p for p in manifest.pieces if any(a.file == rel for a in p.find_artifacts("tensorrt"))]
            if len(matches) == 1:
                piece = matches[0]
            elif direct is not None:  # engines/<sm>_trt<ver>/<piece>.plan
                piece = next((p for p in manifest.pieces if p.id == direct.stem), None)
            if piece is None:
                return None, {}
        arts = piece.find_artifacts("tensorrt")
        art = next((a for a in arts if a.file == rel), arts[0] if arts else None)
        return piece, dict(art.options) if art is not None else {}

    def _hint(self, expected_cc: Any, trt_major: Any) -> str:
        notes = []
        try:
            if expected_cc is not None and normalize_compute_capability(expected_cc) != self.compute_capability:
                notes.append(f"the bundle was compiled for {sm_tag(expected_cc)} but this GPU is "
                             f"{sm_tag(self.compute_capability)}")
        except ValueError:
            pass
        if isinstance(trt_major, int) and trt_major != self.trt_version[0]:
            notes.append(f"the bundle's build plan is for TensorRT {trt_major}.x but TensorRT "
                         f"{version_str(self.trt_version)} is installed")
        return (" Note: " + "; ".join(notes) + ".") if notes else ""

    def _check_bare_engine(self, engine_file: Path, verify: bool) -> dict | None:
        """An engine given directly: if a sidecar sits next to it, check GPU, TensorRT and sha256."""
        sidecar = engine_file.with_suffix(".json")
        try:
            meta = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict):
            return None
        built_cc, built_trt = meta.get("compute_capability"), meta.get("tensorrt_version")
        problems = []
        try:
            if built_cc is not None and normalize_compute_capability(built_cc) != self.compute_capability:
                problems.append(f"GPU {sm_tag(built_cc)} (this one is {sm_tag(self.compute_capability)})")
            if built_trt is not None and parse_trt_version(built_trt) != self.trt_version:
                problems.append(f"TensorRT {built_trt} (installed: {version_str(self.trt_version)})")
        except ValueError:
            pass
        if problems:
            raise EngineNotBuiltError(
                f"{engine_file} was built for {' and '.join(problems)}; engines only run on the GPU and TensorRT "
                "version that built them - run `pipeline engines --bundle B` on this device")
        if verify and meta.get("engine_sha256") and sha256_file(engine_file) != meta["engine_sha256"]:
            raise EngineNotBuiltError(f"engine file {engine_file} is corrupt (sha256 mismatch with "
                                      f"{sidecar.name}); rebuild it with `pipeline engines --bundle B --force`")
        return meta

    # -- I/O discovery -------------------------------------------------------------------------
    def _discover_io(self, piece: Piece | None, input_names, output_names) -> None:
        trt, engine = self.trt, self.engine
        tensors: dict[str, _Tensor] = {}
        for i in range(int(engine.num_io_tensors)):
            name = engine.get_tensor_name(i)
            mode = engine.get_tensor_mode(name)
            if mode == trt.TensorIOMode.INPUT:
                is_input = True
            elif mode == trt.TensorIOMode.OUTPUT:
                is_input = False
            else:
                continue
            tensors[name] = _Tensor(name, is_input, _np_dtype(trt, engine.get_tensor_dtype(name), name),
                                    _dims(engine.get_tensor_shape(name)))
        self._tensors = tensors
        engine_inputs = [t.name for t in tensors.values() if t.is_input]
        self._engine_outputs = [t.name for t in tensors.values() if not t.is_input]
        where = f"piece '{self.piece_id}' in the manifest" if piece is not None else "the given names"

        if input_names is None:
            input_names = [t.name for t in piece.inputs] if piece is not None else engine_inputs
        if sorted(input_names) != sorted(engine_inputs):
            raise TensorRTRunnerError(
                f"{self.engine_path}: engine inputs {engine_inputs} differ from {where} ({list(input_names)}); "
                "was the engine built from another ONNX? Rebuild with `pipeline engines --bundle B --force`")
        if output_names is None:
            output_names = [t.name for t in piece.outputs] if piece is not None else self._engine_outputs
        missing = [n for n in output_names if n not in self._engine_outputs]
        if missing:
            raise TensorRTRunnerError(
                f"{self.engine_path}: outputs {missing} of {where} are not engine outputs "
                f"({self._engine_outputs}); rebuild with `pipeline engines --bundle B --force`")
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._output_dtypes = {}
        if piece is not None:
            for t in piece.outputs:
                if t.dtype in _MANIFEST_NP_DTYPES:
                    self._output_dtypes[t.name] = np.dtype(t.dtype)

        dynamic = [n for n in engine_inputs if tensors[n].dynamic]
        self.dynamic = bool(dynamic)
        n_profiles = max(1, int(getattr(engine, "num_optimization_profiles", 1) or 1))
        # per profile: input name -> (min shape, max shape)
        self._profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []
        for p in range(n_profiles if self.dynamic else 1):
            ranges = {}
            for n in dynamic:
                lo, _opt, hi = engine.get_tensor_profile_shape(n, p)
                ranges[n] = (_dims(lo), _dims(hi))
            self._profiles.append(ranges)

    @property
    def batch_limits(self) -> tuple[int, int] | None:
        """(min, max) batch over the optimisation profiles; None for a static batch."""
        lows = [r[0][0] for prof in self._profiles for r in prof.values() if r[0]]
        highs = [r[1][0] for prof in self._profiles for r in prof.values() if r[1]]
        if not lows:
            return None
        return min(lows), max(highs)

    # -- feeds ---------------------------------------------------------------------------------
    def _arrays(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise EngineShapeError(f"missing input(s) {missing} (the engine takes {self.input_names})")
        out = {}
        for name in self.input_names:
            t = self._tensors[name]
            a = np.ascontiguousarray(feeds[name], dtype=t.dtype)
            if a.ndim != len(t.shape):
                raise EngineShapeError(f"input '{name}' has shape {a.shape}; the engine expects {len(t.shape)} "
                                       f"dimensions {self._shape_text(t.shape)}")
            for axis, (got, want) in enumerate(zip(a.shape, t.shape)):
                if want >= 0 and got != want:
                    what = "a static batch" if axis == 0 else f"axis {axis}"
                    raise EngineShapeError(f"input '{name}' has shape {a.shape}; the engine was built with {what} "
                                           f"of {want} {self._shape_text(t.shape)}")
            out[name] = a
        return out

    @staticmethod
    def _shape_text(shape: tuple[int, ...]) -> str:
        return "(" + ", ".join("N" if d < 0 else str(d) for d in shape) + ")"

    def _fitting_profiles(self, arrays: dict[str, np.ndarray]) -> list[int]:
        def inside(shape, lo, hi) -> bool:
            return all(a <= s <= b for s, a, b in zip(shape, lo, hi))

        fits = [p for p, ranges in enumerate(self._profiles)
                if all(inside(arrays[n].shape, lo, hi) for n, (lo, hi) in ranges.items())]
        if fits:
            return fits
        bad = [(n, lo, hi) for n, (lo, hi) in self._profiles[0].items() if not inside(arrays[n].shape, lo, hi)]
        name, lo, hi = bad[0]
        shape = arrays[name].shape
        if len(self._profiles) == 1 and inside(shape[1:], lo[1:], hi[1:]):
            raise EngineShapeError(
                f"batch {shape[0]} is outside the engine's optimisation profile for input '{name}': "
                f"min_batch {lo[0]}, max_batch {hi[0]} (shapes {lo}..{hi}). Split the batch, or raise "
                "max_batch in the device profile's tensorrt options, recompile the bundle and rebuild the "
                "engines on the device (`pipeline engines --bundle B --force`)")
        limits = "; ".join(f"profile {p}: " + ", ".join(f"'{n}' {r[0]}..{r[1]}" for n, r in ranges.items())
                           for p, ranges in enumerate(self._profiles))
        shapes = {n: a.shape for n, a in arrays.items()}
        raise EngineShapeError(f"input shapes {shapes} fit none of the engine's optimisation profiles ({limits})")

    # -- execution contexts --------------------------------------------------------------------
    def _new_slot(self, profile: int, thread: threading.Thread | None) -> _Slot:
        self._cuda.set_device()
        context = self.engine.create_execution_context()
        if context is None:
            raise TensorRTRunnerError(f"TensorRT could not create an execution context for {self.engine_path} "
                                      "(out of GPU memory?)")
        stream = self._cuda.stream_create()
        slot = _Slot(context, stream, profile, thread)
        if profile != 0:  # a new context starts on profile 0
            context.set_optimization_profile_async(profile, _stream_handle(stream))
        with self._slots_lock:
            self._slots.append(slot)
        return slot

    def _thread_slot(self) -> _Slot:
        slot = getattr(self._local, "slot", None)
        if slot is None:
            me = threading.current_thread()
            with self._slots_lock:  # adopt the context of a thread that has finished
                slot = next((s for s in self._slots if s.thread is not None and not s.thread.is_alive()), None)
                if slot is not None:
                    slot.thread = me
            if slot is None:
                slot = self._new_slot(0, me)
            self._local.slot = slot
        return slot

    def _acquire(self, profiles: list[int]) -> _Slot:
        with self._cond:
            while True:
                free = [p for p in profiles if p not in self._busy]
                if free:
                    p = free[0]
                    self._busy.add(p)
                    break
                self._cond.wait()
        try:
            slot = self._pool.get(p)
            if slot is None:
                slot = self._pool[p] = self._new_slot(p, None)
            return slot
        except BaseException:
            self._release(p)
            raise

    def _release(self, profile: int) -> None:
        with self._cond:
            self._busy.discard(profile)
            self._cond.notify_all()

    # -- run -----------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, Any]) -> list[np.ndarray]:
        """Named inputs (numpy) in, outputs in ``output_names`` order out."""
        if self._closed:
            raise TensorRTRunnerError("this TensorRT runner was closed")
        arrays = self._arrays(feeds)
        if not self.dynamic:
            return self._execute(self._thread_slot(), arrays)
        slot = self._acquire(self._fitting_profiles(arrays))
        try:
            return self._execute(slot, arrays)
        finally:
            self._release(slot.profile)

    def _buffer(self, slot: _Slot, name: str, nbytes: int) -> int:
        ptr, cap = slot.buffers.get(name, (0, 0))
        if cap < nbytes:
            if ptr:
                self._cuda.free(ptr)
                slot.buffers.pop(name, None)
            ptr = self._cuda.malloc(max(int(nbytes), 1))
            slot.buffers[name] = (ptr, max(int(nbytes), 1))
        return ptr

    def _execute(self, slot: _Slot, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        cuda, ctx = self._cuda, slot.context
        cuda.set_device()
        for name in self.input_names:
            shape = arrays[name].shape
            if self._tensors[name].dynamic and slot.shapes.get(name) != shape:
                slot.shapes.pop(name, None)
                if not ctx.set_input_shape(name, shape):
                    raise EngineShapeError(f"TensorRT refused shape {shape} for input '{name}' "
                                           "(see the TensorRT log)")
                slot.shapes[name] = shape
        outputs = {}
        for name in self._engine_outputs:
            shape = _dims(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise TensorRTRunnerError(f"output '{name}' has a data-dependent shape {shape}; this runner "
                                          "supports only outputs whose shape follows from the input shapes")
            outputs[name] = np.empty(shape, dtype=self._tensors[name].dtype)
        for name, a in [*arrays.items(), *outputs.items()]:
            if not ctx.set_tensor_address(name, self._buffer(slot, name, a.nbytes)):
                raise TensorRTRunnerError(f"TensorRT refused the device address of tensor '{name}'")
        try:
            for name, a in arrays.items():
                cuda.htod(slot.buffers[name][0], a, slot.stream)
            if not ctx.execute_async_v3(_stream_handle(slot.stream)):
                raise TensorRTRunnerError(f"TensorRT execute_async_v3 failed for {self.engine_path} (see the "
                                          "TensorRT log)")
            for name, a in outputs.items():
                cuda.dtoh(a, slot.buffers[name][0], slot.stream)
            cuda.synchronize(slot.stream)
        except BaseException:
            try:  # never hand back a slot with work still in flight on its buffers
                cuda.synchronize(slot.stream)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        result = []
        for name in self.output_names:
            a = outputs[name]
            want = self._output_dtypes.get(name)
            result.append(a if want is None or a.dtype == want else a.astype(want))
        return result

    # -- cleanup -------------------------------------------------------------------------------
    def close(self) -> None:
        """Free device buffers and streams and drop the contexts (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with self._slots_lock:
            slots, self._slots = self._slots, []
        for slot in slots:
            for ptr, _cap in slot.buffers.values():
                try:
                    self._cuda.free(ptr)
                except Exception:  # noqa: BLE001 - best effort at teardown
                    pass
            slot.buffers.clear()
            try:
                self._cuda.stream_destroy(slot.stream)
            except Exception:  # noqa: BLE001
                pass
            slot.context = None
        self._pool = {}
        self._local = threading.local()
        self.engine = None

    def __enter__(self) -> "TensorRTPieceRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"TensorRTPieceRunner({str(self.engine_path)!r}, piece={self.piece_id!r}, "
                f"TensorRT {version_str(self.trt_version)}, {sm_tag(self.compute_capability)})")


# -- backend registry interface (runtime/backends/__init__.py) -----------------------------------

def open_runner(path: str | Path, options: dict[str, Any], *, input_names=None, output_names=None,
                data: bytes | None = None) -> "TensorRTPieceRunner":
    """The engine built on this device for the piece whose ONNX is at ``path``.

    ``data`` (the ONNX's verified bytes) is not loaded: the engine runs, and its sidecar's
    ONNX sha256 is checked against the manifest when it is found.
    """
    return TensorRTPieceRunner(path, input_names=input_names, output_names=output_names,
                               **options)


def _gpu_and_tensorrt() -> tuple[str | None, str | None]:
    """(compute capability of GPU 0, installed TensorRT version), each None when it cannot be
    read without importing tensorrt / CUDA (nvidia-smi, package metadata)."""
    from runtime.host import nvidia_gpus, package_versions

    gpus = nvidia_gpus()
    cc = gpus[0].get("compute_capability") if gpus else None
    version = package_versions().get("tensorrt")
    return cc, (None if version in (None, "unknown") else version)


def why_unusable(bundle: Any, target: str, artifacts: list) -> str | None:
    """Why the engines under ``engines/`` cannot serve this GPU, or None.

    When this GPU's compute capability (``nvidia-smi``) and the installed TensorRT version
    (package metadata) can be read without importing anything heavy, each piece's engine is
    looked up exactly as the runner will (``find_engine``: directory
    ``engines/<sm>_trt<version>/``, the sidecar's ONNX sha256, build options and cache key;
    the engine's own sha256 is left to the runner). Otherwise (Jetson without nvidia-smi,
    TensorRT from apt without metadata) only the presence of ``engines/*/<piece>.plan`` is
    checked and the runner reports a mismatch when it opens the engine.
    """
    pieces = [pid for pid, _ in artifacts]
    engines = bundle.root / "engines"
    missing = [pid for pid in pieces
               if not (engines.is_dir() and any(engines.glob(f"*/{pid}.plan")))]
    if missing:
        return (f"TensorRT engines not built for this bundle ({len(missing)} of {len(pieces)} "
                f"pieces missing, e.g. {missing[0]!r}): run `pipeline engines --bundle "
                f"{bundle.root}` on the device")
    cc, version = _gpu_and_tensorrt()
    if cc is None or version is None:
        return None  # not determinable cheaply: the runner checks when it opens the engine
    for pid, art in artifacts:
        plan = (art.options or {}).get("build_plan")
        try:
            find_engine(bundle.root, pid, bundle.resolve(art.file), compute_capability=cc,
                        trt_version=version, build_plan=plan if isinstance(plan, Mapping) else None,
                        verify=False)
        except (EngineNotBuiltError, ValueError) as exc:
            return " ".join(str(exc).split())
    return None
