"""Roofline latency *estimates* for a piece of the network on a device profile.

    latency = max(compute_time, memory_time) + per_call_overhead

    compute_time = 2 * macs * batch / (peak_flops * efficiency)
    memory_time  = bytes_for_batch / (bandwidth * MEMORY_EFFICIENCY)

These are ESTIMATES from published peak numbers, not measurements.  Callers must label
them as such (every :class:`Estimate` carries ``kind = "estimated"`` and its
assumptions); the measuring profiler's tables replace them.

Which peak is used depends on the backend and its options:

* ``tensorrt`` -> the GPU: tensor cores for fp16 (``gpu_fp16_gflops``) and int8/best
  (``gpu_int8_tops``), CUDA cores for fp32; a ``dla_core`` option -> that DLA core
  (``dla_int8_tops`` for int8/best, half of it for fp16).
* ``onnxruntime`` -> the GPU (fp32 CUDA cores) when the first provider is CUDA or
  TensorRT, else the CPU (scaled by ``intra_op_threads / cpu_cores`` when set).
* ``tvm`` -> the GPU (fp32) for a ``cuda`` target, else the CPU (scaled by
  ``num-cores``).

Stdlib only (runs on-device).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from runtime.backends import BACKENDS

from .profile import Profile

__all__ = [
    "COMPUTE_EFFICIENCY",
    "MEMORY_EFFICIENCY",
    "PER_CALL_OVERHEAD_MS",
    "Estimate",
    "estimate",
    "estimate_bytes_moved",
    "estimate_latency_ms",
]

#: Fraction of peak compute a backend typically sustains on conv/GEMM-heavy vision
#: networks at batch 1.  Deliberately modest, round numbers (order-of-magnitude
#: assumptions, not measurements): small early-exit segments rarely fill a device.
COMPUTE_EFFICIENCY: dict[tuple[str, str], float] = {
    ("onnxruntime", "cpu"): 0.30,  # MLAS kernels
    ("tvm", "cpu"): 0.25,  # untuned schedules; tuning can roughly double this
    ("onnxruntime", "gpu"): 0.35,  # CUDA EP, fp32 on CUDA cores
    ("tvm", "gpu"): 0.25,  # untuned CUDA schedules
    ("tensorrt", "gpu"): 0.40,  # fp32 on CUDA cores
    ("tensorrt", "tensor"): 0.30,  # fp16/int8 on tensor cores
    ("tensorrt", "dla"): 0.30,
}
#: Fraction of peak DRAM bandwidth achievable (STREAM-like: 60-80 % is typical).
MEMORY_EFFICIENCY = 0.70
#: Fixed cost per call (launch / enqueue + synchronise, session overhead), in ms.
#: Host<->device copies are not included.
PER_CALL_OVERHEAD_MS: dict[tuple[str, str], float] = {
    ("onnxruntime", "cpu"): 0.02,
    ("onnxruntime", "gpu"): 0.08,
    ("tvm", "cpu"): 0.01,
    ("tvm", "gpu"): 0.05,
    ("tensorrt", "gpu"): 0.05,
    ("tensorrt", "dla"): 0.20,  # DLA task submission is slower than a GPU launch
}


@dataclass(frozen=True)
class Estimate:
    """A roofline latency estimate.  ``kind`` is always ``"estimated"``."""

    latency_ms: float
    compute_ms: float
    memory_ms: float
    overhead_ms: float
    bound: str  # "compute" | "memory"
    profile: str
    backend: str
    unit: str  # "cpu" | "gpu" | "dla"
    precision: str  # "fp32" | "fp16" | "int8"
    batch: int
    macs: int
    bytes_moved: int
    peak_gflops: float  # peak of the chosen unit/precision (GOPS for int8)
    compute_efficiency: float
    bandwidth_gbs: float
    memory_efficiency: float
    assumptions: tuple[str, ...] = field(default_factory=tuple)
    kind: str = "estimated"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["assumptions"] = list(self.assumptions)
        return d


def estimate_bytes_moved(
    param_count: int,
    activation_elements: int,
    *,
    dtype_bytes: int = 4,
    activation_passes: float = 2.0,
    input_elements: int = 0,
    output_elements: int = 0,
) -> int:
    """DRAM traffic of one piece at batch 1, in bytes.

    Weights are read once; every intermediate activation element is written once and
    read once (``activation_passes = 2``); the piece's input is read and its output
    written once.  ``dtype_bytes``: 4 fp32, 2 fp16, 1 int8.  Assumes no activation stays
    in cache between layers -- an upper bound for small pieces, close for large ones.
    """
    for name, v in (("param_count", param_count), ("activation_elements", activation_elements),
                    ("input_elements", input_elements), ("output_elements", output_elements)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if dtype_bytes <= 0:
        raise ValueError(f"dtype_bytes must be > 0, got {dtype_bytes}")
    elems = param_count + activation_passes * activation_elements + input_elements + output_elements
    return int(round(elems * dtype_bytes))


def _precision_of(profile: Profile, backend: str) -> str:
    spec = profile.backend(backend)
    if backend == "tensorrt" and spec is not None:
        p = spec.get("precision", "fp16")
        return "int8" if p in ("int8", "best") else p
    return "fp32"


def _unit_of(profile: Profile, backend: str) -> str:
    spec = profile.backend(backend)
    if not profile.hardware.has_gpu:
        return "cpu"
    if backend == "tensorrt":
        return "dla" if spec is not None and spec.get("dla_core") is not None else "gpu"
    if backend == "onnxruntime":
        providers = spec.get("providers", []) if spec is not None else []
        return "gpu" if providers and providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
    if backend == "tvm":
        target = spec.get("target", {}) if spec is not None else {}
        return "gpu" if target.get("kind") == "cuda" else "cpu"
    return "cpu"


def estimate(
    macs: int,
    bytes_moved: int,
    profile: Profile,
    backend: str,
    batch: int = 1,
    *,
    shared_bytes: int = 0,
    precision: str | None = None,
    unit: str | None = None,
) -> Estimate:
    """Roofline estimate for ``macs`` multiply-accumulates moving ``bytes_moved`` bytes.

    ``macs`` and ``bytes_moved`` are per sample (batch 1).  Compute scales with
    ``batch``; of ``bytes_moved``, ``shared_bytes`` (the weights, read once per call) do
    not scale and the rest does.  ``precision`` ("fp32"/"fp16"/"int8") and ``unit``
    ("cpu"/"gpu"/"dla") override what the backend's options imply.  The backend need
    not be in the profile (then its defaults are assumed).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of: {', '.join(BACKENDS)})")
    if macs < 0 or bytes_moved < 0 or shared_bytes < 0:
        raise ValueError("macs, bytes_moved and shared_bytes must be >= 0")
    if shared_bytes > bytes_moved:
        raise ValueError("shared_bytes cannot exceed bytes_moved")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    hw, peak = profile.hardware, profile.peak
    assumptions: list[str] = [
        "roofline: max(compute, memory) + fixed per-call overhead; published peak numbers, not measured",
        "1 MAC = 2 FLOP (int8: 2 ops)",
    ]
    if backend == "tensorrt" and not hw.has_gpu:
        raise ValueError(f"profile '{profile.name}' has no GPU; tensorrt needs one")
    unit = unit or _unit_of(profile, backend)
    precision = precision or _precision_of(profile, backend)
    if unit not in ("cpu", "gpu", "dla"):
        raise ValueError(f"unit must be cpu, gpu or dla, got {unit!r}")
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    if unit in ("gpu", "dla") and not hw.has_gpu:
        raise ValueError(f"profile '{profile.name}' has no GPU")
    if unit == "dla" and not hw.dla_cores:
        raise ValueError(f"profile '{profile.name}' has no DLA")
    if unit == "dla" and backend != "tensorrt":
        raise ValueError("only tensorrt runs on a DLA")
    if backend == "tensorrt" and unit == "cpu":
        raise ValueError("tensorrt runs on a GPU or DLA, not the CPU")

    spec = profile.backend(backend)
    if unit == "cpu":
        precision = "fp32"
        gflops = peak.cpu_fp32_gflops
        threads = None
        if spec is not None and backend == "onnxruntime":
            threads = spec.get("intra_op_threads") or None
        elif spec is not None and backend == "tvm":
            threads = spec.get("target", {}).get("num-cores")
        if threads and threads < hw.cpu_cores:
            gflops *= threads / hw.cpu_cores
            assumptions.append(f"CPU peak scaled to {threads}/{hw.cpu_cores} cores")
        eff_key = (backend, "cpu")
        bandwidth = peak.memory_bandwidth_gbs
    elif unit == "dla":
        if precision == "fp32":
            raise ValueError("DLA runs fp16 or int8 only")
        gflops = peak.dla_int8_tops * 1000.0 * (0.5 if precision == "fp16" else 1.0)
        if precision == "fp16":
            assumptions.append("DLA fp16 throughput taken as half its int8 throughput")
        assumptions.append("one DLA core; layers that fall back to the GPU are not modelled")
        eff_key = (backend, "dla")
        bandwidth = peak.memory_bandwidth_gbs
    else:
        bandwidth = peak.gpu_bandwidth_gbs
        tensor = backend == "tensorrt" and precision != "fp32"
        eff_key = (backend, "tensor" if tensor else "gpu")
        if precision == "fp32":
            gflops = peak.gpu_fp32_gflops
        elif precision == "fp16":
            gflops = peak.gpu_fp16_gflops or 2 * peak.gpu_fp32_gflops
            if not peak.gpu_fp16_gflops:
                assumptions.append("no tensor-core fp16 peak given; assumed 2x fp32")
        else:  # int8
            if peak.gpu_int8_tops:
                gflops = peak.gpu_int8_tops * 1000.0
            else:
                gflops = peak.gpu_fp16_gflops or 2 * peak.gpu_fp32_gflops
                assumptions.append("no int8 peak given; assumed equal to the fp16 peak")
        if hw.gpu_memory_gb is None:
            assumptions.append("integrated GPU: shares system DRAM bandwidth with the CPU")
        else:
            assumptions.append("discrete GPU: VRAM bandwidth; host<->device copies not included")

    efficiency = COMPUTE_EFFICIENCY[eff_key]
    overhead = PER_CALL_OVERHEAD_MS[(backend, unit)]
    assumptions.append(
        f"compute efficiency {efficiency:.2f} of peak ({eff_key[0]} on {eff_key[1]}); "
        f"memory efficiency {MEMORY_EFFICIENCY:.2f} of peak bandwidth; overhead {overhead} ms/call"
    )
    compute_ms = (2.0 * macs * batch) / (gflops * 1e9 * efficiency) * 1e3
    total_bytes = shared_bytes + (bytes_moved - shared_bytes) * batch
    memory_ms = total_bytes / (bandwidth * 1e9 * MEMORY_EFFICIENCY) * 1e3
    bound = "compute" if compute_ms >= memory_ms else "memory"
    return Estimate(
        latency_ms=max(compute_ms, memory_ms) + overhead,
        compute_ms=compute_ms,
        memory_ms=memory_ms,
        overhead_ms=overhead,
        bound=bound,
        profile=profile.name,
        backend=backend,
        unit=unit,
        precision=precision,
        batch=batch,
        macs=int(macs),
        bytes_moved=int(bytes_moved),
        peak_gflops=float(gflops),
        compute_efficiency=efficiency,
        bandwidth_gbs=float(bandwidth),
        memory_efficiency=MEMORY_EFFICIENCY,
        assumptions=tuple(assumptions),
    )


def estimate_latency_ms(macs: int, bytes_moved: int, profile: Profile, backend: str, batch: int = 1) -> float:
    """Estimated latency in ms (see :func:`estimate`; the caller must label it estimated)."""
    return estimate(macs, bytes_moved, profile, backend, batch).latency_ms
