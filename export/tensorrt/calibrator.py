"""INT8 entropy calibration for TensorRT 10 (implicit quantization), fed from numpy batches.

TensorRT 10 deprecates implicit INT8 (``IInt8EntropyCalibrator2``) in favour of Q/DQ ONNX models;
TensorRT 11 removed it. It is still the simplest INT8 path on Jetson Orin with JetPack 6
(TensorRT 10.3), so it is provided here.

Layout: :class:`CalibrationFeeder` holds all the logic (re-batching to the calibration batch,
shape/dtype checks, host->device copies through an injectable allocator, an atomic calibration
cache file) and needs neither TensorRT nor CUDA. :func:`make_entropy_calibrator` wraps it in a
subclass of ``trt.IInt8EntropyCalibrator2`` that is created lazily, only when a ``tensorrt``
module is available (or a fake one is injected by tests).
"""
from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from export.tensorrt.config import EngineBuildPlan, TensorRTError

ONNX_TO_NUMPY = {"FLOAT": np.float32, "FLOAT16": np.float16, "DOUBLE": np.float64, "INT8": np.int8,
                 "UINT8": np.uint8, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_}

Batch = np.ndarray | Mapping[str, np.ndarray]


class DeviceAllocator(Protocol):
    def malloc(self, nbytes: int) -> int: ...
    def copy_htod(self, ptr: int, array: np.ndarray) -> None: ...
    def free(self, ptr: int) -> None: ...


class CudaPythonAllocator:
    """Device memory through cuda-python (``pip install cuda-python``), no torch/pycuda needed."""

    def __init__(self):
        self._rt = None
        for name in ("cuda.bindings.runtime", "cuda.cudart"):
            try:
                self._rt = importlib.import_module(name)
                break
            except Exception:
                continue
        if self._rt is None:
            raise TensorRTError("INT8 calibration needs cuda-python for device buffers: pip install cuda-python")

    def _check(self, result, what: str):
        err = result[0] if isinstance(result, tuple) else result
        if int(err) != 0:
            raise TensorRTError(f"CUDA {what} failed with error {err}")
        return result[1] if isinstance(result, tuple) and len(result) > 1 else None

    def malloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(nbytes), "cudaMalloc"))

    def copy_htod(self, ptr: int, array: np.ndarray) -> None:
        self._check(self._rt.cudaMemcpy(ptr, array.ctypes.data, array.nbytes,
                                        self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy")

    def free(self, ptr: int) -> None:
        self._check(self._rt.cudaFree(ptr), "cudaFree")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_bytes(buf: Any) -> bytes:
    if isinstance(buf, bytes):
        return buf
    if hasattr(buf, "tobytes"):
        return buf.tobytes()
    return bytes(memoryview(buf))


class CalibrationFeeder:
    """TensorRT-free core of the calibrator.

    ``batches`` yields numpy arrays (single-input models) or ``{input_name: array}`` dicts, each
    with a leading sample axis of any length; samples are re-chunked into batches of exactly
    ``batch_size`` (TensorRT calibrates at the optimization profile's *opt* shape); a final
    partial batch is dropped. ``input_shapes`` maps each input name to its per-sample shape and
    ``input_dtypes`` to a numpy dtype (arrays are cast, e.g. float64 -> float32).
    ``batches=None`` means: calibrate from ``cache_path`` only (it must exist).
    """

    def __init__(self, batches: Iterable[Batch] | None, cache_path: str | Path | None, *,
                 input_shapes: Mapping[str, tuple[int, ...]], batch_size: int,
                 input_dtypes: Mapping[str, Any] | None = None, max_batches: int | None = None,
                 allocator: DeviceAllocator | Callable[[], DeviceAllocator] | None = None,
                 log: Callable[[str], None] | None = None):
        if batch_size < 1:
            raise ValueError(f"calibration batch_size must be >= 1, got {batch_size}")
        self.cache_path = Path(cache_path) if cache_path is not None else None
        self.input_shapes = {k: tuple(v) for k, v in input_shapes.items()}
        self.input_dtypes = {k: np.dtype(v) for k, v in (input_dtypes or {}).items()}
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.log = log or (lambda msg: None)
        self.error: BaseException | None = None
        self.batches_served = 0
        self._allocator_arg = allocator
        self._allocator: DeviceAllocator | None = None
        self._buffers: dict[str, int] = {}
        if batches is None:
            if self.cache_path is None or not self.cache_path.is_file() or self.cache_path.stat().st_size == 0:
                raise TensorRTError(f"INT8 calibration needs validation batches or an existing calibration "
                                    f"cache, and there is no cache at {self.cache_path}")
            self._chunks: Iterator[dict[str, np.ndarray]] = iter(())
        else:
            self._chunks = self._rechunk(iter(batches))
            first = next(self._chunks, None)  # validate eagerly, in Python, not inside TensorRT
            if first is None:
                raise TensorRTError(f"calibration data yielded fewer than batch_size={batch_size} samples")
            self._chunks = _prepend(first, self._chunks)

    # -- batches
    def _as_dict(self, item: Batch) -> dict[str, np.ndarray]:
        if isinstance(item, Mapping):
            missing = set(self.input_shapes) - set(item)
            if missing:
                raise TensorRTError(f"calibration batch lacks input(s) {sorted(missing)}; "
                                    f"expected {sorted(self.input_shapes)}")
            return {k: np.asarray(item[k]) for k in self.input_shapes}
        if len(self.input_shapes) != 1:
            raise TensorRTError(f"the model has inputs {sorted(self.input_shapes)}: yield dicts "
                                "{name: array}, not bare arrays")
        return {next(iter(self.input_shapes)): np.asarray(item)}

    def _check(self, name: str, arr: np.ndarray) -> np.ndarray:
        want = self.input_shapes[name]
        if arr.ndim != len(want) + 1 or tuple(arr.shape[1:]) != want:
            raise TensorRTError(f"calibration input '{name}' has shape {tuple(arr.shape)}; expected "
                                f"(N, {', '.join(map(str, want))})")
        dtype = self.input_dtypes.get(name, np.dtype(np.float32))
        return np.ascontiguousarray(arr, dtype=dtype)

    def _rechunk(self, it: Iterator[Batch]) -> Iterator[dict[str, np.ndarray]]:
        pending: dict[str, list[np.ndarray]] = {k: [] for k in self.input_shapes}
        have = 0
        for item in it:
            arrays = {k: self._check(k, v) for k, v in self._as_dict(item).items()}
            counts = {v.shape[0] for v in arrays.values()}
            if len(counts) != 1:
                raise TensorRTError(f"calibration inputs disagree on the number of samples: "
                                    f"{ {k: v.shape[0] for k, v in arrays.items()} }")
            for k, v in arrays.items():
                pending[k].append(v)
            have += counts.pop()
            while have >= self.batch_size:
                joined = {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in pending.items()}
                yield {k: np.ascontiguousarray(v[:self.batch_size]) for k, v in joined.items()}
                pending = {k: [v[self.batch_size:]] for k, v in joined.items()}
                have -= self.batch_size
        if have:
            self.log(f"calibration: dropped {have} trailing sample(s) (not a full batch of {self.batch_size})")

    def next_batch(self) -> dict[str, np.ndarray] | None:
        """The next host batch, or ``None`` when done (records errors instead of raising)."""
        if self.error is not None:
            return None
        if self.max_batches is not None and self.batches_served >= self.max_batches:
            return None
        try:
            chunk = next(self._chunks, None)
        except Exception as exc:  # never let an exception escape into TensorRT's C++ frames
            self.error = exc
            self.log(f"calibration stopped: {exc}")
            return None
        if chunk is not None:
            self.batches_served += 1
        return chunk

    def next_pointers(self, names: Iterable[str]) -> list[int] | None:
        """Copy the next batch to device memory; device pointers in ``names`` order, or None."""
        chunk = self.next_batch()
        if chunk is None:
            self.free()
            return None
        try:
            if self._allocator is None:
                arg = self._allocator_arg
                if arg is None:
                    self._allocator = CudaPythonAllocator()
                elif isinstance(arg, type) or not hasattr(arg, "malloc"):
                    self._allocator = arg()  # a class or zero-argument factory
                else:
                    self._allocator = arg
            ptrs = []
            for name in names:
                if name not in chunk:
                    raise TensorRTError(f"TensorRT asked for calibration input '{name}', the data has "
                                        f"{sorted(chunk)}")
                arr = chunk[name]
                if name not in self._buffers:
                    self._buffers[name] = self._allocator.malloc(arr.nbytes)
                self._allocator.copy_htod(self._buffers[name], arr)
                ptrs.append(self._buffers[name])
            return ptrs
        except Exception as exc:
            self.error = exc
            self.log(f"calibration stopped: {exc}")
            self.free()
            return None

    def free(self) -> None:
        if self._allocator is not None:
            for ptr in self._buffers.values():
                try:
                    self._allocator.free(ptr)
                except Exception:  # pragma: no cover - best effort
                    pass
        self._buffers.clear()

    # -- cache
    def read_cache(self) -> bytes | None:
        if self.cache_path is None or not self.cache_path.is_file():
            return None
        data = self.cache_path.read_bytes()
        if data:
            self.log(f"calibration: using cache {self.cache_path}")
        return data or None

    def write_cache(self, cache: Any) -> None:
        if self.cache_path is None:
            return
        try:
            _write_atomic(self.cache_path, _to_bytes(cache))
            self.log(f"calibration: wrote cache {self.cache_path}")
        except Exception as exc:
            self.error = exc


def _prepend(first, rest):
    yield first
    yield from rest


_CLASSES: dict[int, type] = {}


def _calibrator_class(trt) -> type:
    base = getattr(trt, "IInt8EntropyCalibrator2", None)
    if base is None:
        raise TensorRTError(
            f"TensorRT {getattr(trt, '__version__', '?')} has no IInt8EntropyCalibrator2 (implicit INT8 "
            "was removed in TensorRT 11); quantize the ONNX with ModelOpt (Q/DQ nodes) instead")
    cls = _CLASSES.get(id(base))
    if cls is not None:
        return cls

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        """``trt.IInt8EntropyCalibrator2`` backed by a :class:`CalibrationFeeder`."""

        def __init__(self, feeder: CalibrationFeeder):
            base.__init__(self)  # trampoline classes must initialise the pybind11 base explicitly
            self.feeder = feeder

        @property
        def error(self):
            return self.feeder.error

        def get_batch_size(self):
            # Explicit-batch networks carry the batch in the tensor shape (the calibration
            # profile's opt shape); TensorRT expects 1 here (as Polygraphy's calibrator does).
            return 1

        def get_batch(self, names, *args):
            return self.feeder.next_pointers(list(names))

        def read_calibration_cache(self, *args):
            return self.feeder.read_cache()

        def write_calibration_cache(self, cache, *args):
            self.feeder.write_cache(cache)

        def free(self):
            self.feeder.free()

    _CLASSES[id(base)] = EntropyCalibrator
    return EntropyCalibrator


def make_entropy_calibrator(batches: Iterable[Batch] | None, cache_path: str | Path | None, *,
                            input_shapes: Mapping[str, tuple[int, ...]], batch_size: int,
                            input_dtypes: Mapping[str, Any] | None = None, max_batches: int | None = None,
                            allocator: DeviceAllocator | None = None, trt=None,
                            log: Callable[[str], None] | None = None):
    """An ``IInt8EntropyCalibrator2`` fed by numpy ``batches`` with a calibration cache file."""
    if trt is None:
        from export.tensorrt.builder import require_tensorrt
        trt = require_tensorrt()
    cls = _calibrator_class(trt)
    feeder = CalibrationFeeder(batches, cache_path, input_shapes=input_shapes, batch_size=batch_size,
                               input_dtypes=input_dtypes, max_batches=max_batches, allocator=allocator,
                               log=log)
    return cls(feeder)


def calibrator_for_plan(plan: EngineBuildPlan, batches: Iterable[Batch] | None,
                        cache_path: str | Path | None, **kwargs):
    """:func:`make_entropy_calibrator` with input names, shapes, dtypes and batch from ``plan``."""
    if not plan.needs_calibrator:
        raise TensorRTError("this build plan does not use an INT8 calibrator "
                            f"(precision={plan.precision}, TensorRT {plan.trt_version[0]}.x, "
                            f"Q/DQ in ONNX: {plan.onnx_has_qdq})")
    return make_entropy_calibrator(
        batches, cache_path,
        input_shapes={s.name: s.sample_shape for s in plan.inputs},
        input_dtypes={s.name: ONNX_TO_NUMPY.get(s.dtype, np.float32) for s in plan.inputs},
        batch_size=plan.calibration_batch or 1, **kwargs)
