"""INT8 pieces: static QDQ quantization per piece, accepted only where it pays (issue 15).

Every piece's ONNX is quantized with ``onnxruntime.quantization.quantize_static`` in the **QDQ**
format (QuantizeLinear/DequantizeLinear pairs around fp32 operators): per-channel int8 weights,
uint8 activations, calibrated on the real inputs of that piece (validation images pushed through
the preceding pieces along each skip configuration's plan). ONNX Runtime runs the QDQ file
directly (it fuses the pairs into int8 kernels online); TensorRT reads the same Q/DQ nodes as
explicit quantization; TVM's Relax ONNX frontend imports it (docs/tvm.md). TensorRT reads only
signed int8 with zero point 0, so a bundle with tensorrt artifacts is quantized with int8
symmetric activations (:data:`TENSORRT_QDQ`) and its int8 pieces' tensorrt artifacts point at
the same files (:func:`export.tensorrt.backend.use_qdq_pieces`).

Per piece, variants are tried (all int8; the first convolution kept in fp32 for pieces that read
the raw image; the exit head kept in fp32; both) and the fastest variant whose exit argmax agrees
with fp32 on held-out inputs within ``max_agreement_drop`` is kept, **if** it measures faster
than fp32 by ``min_speedup`` (ONNX Runtime on this host, batch 1, 1 thread, interleaved runs).
Otherwise the piece stays fp32 and the report says why. After the per-piece decisions every exit
of every skip configuration is checked chained (mixed int8/fp32 pieces against all-fp32); an
exit whose agreement falls below the target sends the accepted piece of its path with the lowest
own agreement back to fp32, until every exit passes.

How a bundle records it (docs/export.md, "INT8 pieces"): an accepted piece's ``onnxruntime``
artifact is **replaced** by the QDQ file ``onnxruntime/<target>/<piece>.int8.onnx``; its options
keep the runner options and add ``precision: "int8"``, ``quantization`` (settings, variant,
nodes kept in fp32), ``parity`` (max |Δlogits| and argmax agreement of its exit against fp32 on
held-out inputs) and ``latency`` (fp32 vs int8 ms, ``measured``/``estimated``). The fp32 graph
stays in the bundle as the piece's portable ``onnx`` artifact (the reference, recompilable).
Pieces kept in fp32 get ``precision: "fp32"``. The whole report goes to
``annotations.quantize``. The runtime needs nothing new: the executor opens the onnxruntime
artifact of each piece, whatever its precision, so mixed bundles run as they are.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from runtime.errors import UsageError

__all__ = ["VNNI_FLAGS", "needs_reduce_range", "quantize_piece", "piece_calibration_inputs",
           "logits_parity", "head_nodes", "first_conv", "quantize_manifest", "quantize_bundle",
           "prepare_images", "DEFAULT_MIN_SPEEDUP", "DEFAULT_MAX_AGREEMENT_DROP", "TENSORRT_QDQ"]

Progress = Callable[[str], None]
PathLike = Union[str, "os.PathLike[str]"]

#: x86 CPU flags with int8 dot products (u8 x s8 -> s32 without the 16-bit saturation of
#: AVX2's vpmaddubsw); without one of them ``reduce_range`` (7-bit weights) avoids overflow.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "avx_vnni_int8", "amx_int8")
#: Further flags the report records of the build host (what int8 speed depends on).
HOST_FLAGS = ("avx2", "avx512f", "avx512_bf16", "dotprod", "i8mm")
DEFAULT_MIN_SPEEDUP = 1.05
#: The per-piece gate only catches a quantization that breaks an exit: 2% of argmax flips at
#: most. The accuracy target itself is certified end to end by the stopping rule, recalibrated
#: on the quantized pieces against the fp32 network (pipeline/build.py), on 6,000 images.
DEFAULT_MAX_AGREEMENT_DROP = 0.02
DEFAULT_CALIB = 256
#: 512 held-out images: at 99% agreement 128 images left one flip between pass and fail.
DEFAULT_HELD_OUT = 512
DEFAULT_RUNS = 300
QDQ_SUFFIX = ".int8.onnx"
_BATCH = 64
_QUANT_TYPES = ("QUInt8", "QInt8")
#: The QDQ style TensorRT reads (explicit quantization: signed int8, zero point 0), used for every
#: backend when a device bundle has tensorrt artifacts (ONNX Runtime runs S8S8 QDQ too).
#: Biases stay fp32 (TensorRT's parser reads no int32 DequantizeLinear).
TENSORRT_QDQ = {"activation_type": "QInt8", "symmetric_activations": True, "quantize_bias": False}


# ---------------------------------------------------------------------------------------------
# the ISA question: reduce_range
# ---------------------------------------------------------------------------------------------

def needs_reduce_range(arch: Optional[str] = None, isa: Optional[Sequence[str]] = None) -> bool:
    """Whether u8s8 int8 kernels on this CPU need ``reduce_range`` (7-bit weights).

    x86 without VNNI computes u8 x s8 products with ``vpmaddubsw``, whose 16-bit intermediate
    sums saturate; ONNX Runtime's documentation recommends ``reduce_range`` there. x86 with
    VNNI (``avx512_vnni``/``avx_vnni``) and ARM (``sdot``/``udot`` or widening multiplies) do
    not. ``arch``/``isa`` default to this machine (``/proc/cpuinfo``)."""
    from runtime.host import isa_flags, machine_arch, normalize_arch

    arch = normalize_arch(arch) if arch else machine_arch()
    if arch != "x86_64":
        return False
    flags = set(isa_flags() if isa is None else isa)
    return not (flags & set(VNNI_FLAGS))


# ---------------------------------------------------------------------------------------------
# graph helpers: the nodes a variant keeps in fp32
# ---------------------------------------------------------------------------------------------

def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _ancestors(graph, output: str) -> set[str]:
    producer = {o: n for n in graph.node for o in n.output}
    seen: set[str] = set()
    stack = [output]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        stack.extend(n.input)
    return seen


def first_conv(model) -> list[str]:
    """The first convolution of the graph (the one on raw pixels), as a node-name list."""
    for n in model.graph.node:
        if n.op_type == "Conv":
            return [n.name]
    return []


def head_nodes(model, logits: str = "logits") -> list[str]:
    """The exit head's nodes: what only the logits need. With a ``features*`` output, the
    logits' ancestors minus the features' ancestors (exact); without one (the last stage), the
    nodes walked back from the logits up to the last residual ``Add`` or branch point."""
    g = model.graph
    outs = [o.name for o in g.output]
    feats = [o for o in outs if o != logits]
    if feats:
        keep = _ancestors(g, logits)
        for f in feats:
            keep -= _ancestors(g, f)
        return [n.name for n in g.node if n.name in keep]
    producer = {o: n for n in g.node for o in n.output}
    consumers = _consumers(g)
    names: list[str] = []
    t = logits
    while t in producer:
        n = producer[t]
        if n.op_type == "Add" or n.op_type == "Concat":
            break
        names.append(n.name)
        data_in = [i for i in n.input if i in producer or i in {x.name for x in g.input}]
        if len(data_in) != 1 or len(consumers.get(data_in[0], [])) > 1:
            break
        t = data_in[0]
    return [n.name for n in g.node if n.name in set(names)]


def _one_default_opset(model) -> None:
    """One ``ai.onnx`` opset entry (``onnx.compose.merge_models`` may write ``""`` and
    ``"ai.onnx"`` side by side, which onnxruntime.quantization refuses)."""
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if len(default) <= 1:
        return
    version = max(o.version for o in default)
    others = [(o.domain, o.version) for o in model.opset_import if o.domain not in ("", "ai.onnx")]
    del model.opset_import[:]
    model.opset_import.add(domain="", version=version)
    for domain, v in others:
        model.opset_import.add(domain=domain, version=v)


def _ensure_node_names(model) -> None:
    used = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in used:
                name += "_"
            n.name = name
            used.add(name)


# ---------------------------------------------------------------------------------------------
# one piece
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs 'consider pre-processing' on the root logger per call."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _quant_type(name: Any):
    from onnxruntime.quantization import QuantType

    if isinstance(name, QuantType):
        return name
    if name not in _QUANT_TYPES:
        raise UsageError(f"quantization type {name!r}: expected one of {', '.join(_QUANT_TYPES)}")
    return getattr(QuantType, name)


def quantize_piece(onnx_in: PathLike, onnx_out: PathLike, calib_inputs: Mapping[str, np.ndarray], *,
                   per_channel: bool = True, reduce_range: Optional[bool] = None,
                   exclude_nodes: Sequence[str] = (), activation_type: Any = "QUInt8",
                   weight_type: Any = "QInt8", calibrate_method: str = "MinMax",
                   arch: Optional[str] = None, isa: Optional[Sequence[str]] = None,
                   symmetric_activations: bool = False, quantize_bias: bool = True) -> dict:
    """Write the static QDQ quantization of ``onnx_in`` to ``onnx_out``; return its settings.

    ``calib_inputs``: input name -> float32 batch (the real inputs of this piece; every name
    the graph reads). ``reduce_range=None``: :func:`needs_reduce_range` of ``arch``/``isa``
    (default this machine). ``exclude_nodes``: node names kept in fp32. The result passes
    ``onnx.checker.check_model``. ``symmetric_activations`` with ``activation_type="QInt8"``:
    int8 activations with zero point 0, the only Q/DQ TensorRT reads (:data:`TENSORRT_QDQ`);
    ``quantize_bias=False`` keeps biases fp32."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          quantize_static)

    if reduce_range is None:
        reduce_range = needs_reduce_range(arch, isa)
    model = onnx.load(str(onnx_in))
    names = [i.name for i in model.graph.input]
    missing = [n for n in names if n not in calib_inputs]
    if missing:
        raise UsageError(f"{onnx_in}: no calibration data for input(s) {', '.join(missing)}")
    n = len(calib_inputs[names[0]])
    if n < 1:
        raise UsageError(f"{onnx_in}: empty calibration set")
    _ensure_node_names(model)
    _one_default_opset(model)
    known = {nd.name for nd in model.graph.node}
    unknown = [x for x in exclude_nodes if x not in known]
    if unknown:
        raise UsageError(f"{onnx_in}: exclude_nodes names unknown node(s): {', '.join(unknown)}")
    batches = [{k: np.ascontiguousarray(calib_inputs[k][i:i + _BATCH], dtype=np.float32)
                for k in names} for i in range(0, n, _BATCH)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self):
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(batches)

    out = Path(onnx_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quant-") as tmp:
        src = Path(tmp) / "in.onnx"
        onnx.save(model, str(src))
        with _quiet():
            quantize_static(str(src), str(out), _Reader(), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel, reduce_range=bool(reduce_range),
                            activation_type=_quant_type(activation_type),
                            weight_type=_quant_type(weight_type),
                            nodes_to_exclude=list(exclude_nodes) or None,
                            calibrate_method=getattr(CalibrationMethod, calibrate_method),
                            extra_options={"CalibTensorRangeSymmetric": bool(symmetric_activations),
                                           "ActivationSymmetric": bool(symmetric_activations),
                                           "QuantizeBias": bool(quantize_bias)})
    onnx.checker.check_model(str(out), full_check=True)
    return {"format": "QDQ", "per_channel": bool(per_channel), "reduce_range": bool(reduce_range),
            "activation_type": str(getattr(activation_type, "name", activation_type)),
            "weight_type": str(getattr(weight_type, "name", weight_type)),
            "symmetric_activations": bool(symmetric_activations), "quantize_bias": bool(quantize_bias),
            "calibrate_method": calibrate_method, "calibration_samples": int(n),
            "fp32_nodes": list(exclude_nodes)}


def _session(path: PathLike, level: str = "all"):
    import onnxruntime as ort

    from runtime.backends.onnxruntime_runner import session_options

    so = session_options(intra_op_threads=1, inter_op_threads=1, graph_optimization_level=level)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _run(sess, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    n = len(feeds[names[0]])
    parts: dict[str, list] = {}
    for i in range(0, n, _BATCH):
        outs = sess.run(None, {k: np.ascontiguousarray(feeds[k][i:i + _BATCH], dtype=np.float32)
                               for k in names})
        for o, v in zip(sess.get_outputs(), outs):
            parts.setdefault(o.name, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def logits_parity(fp32: Mapping[str, np.ndarray], int8: Mapping[str, np.ndarray],
                  logits: str = "logits") -> dict:
    """max |Δlogits| and argmax agreement of ``int8`` against ``fp32`` (output dicts)."""
    a, b = np.asarray(fp32[logits], np.float32), np.asarray(int8[logits], np.float32)
    finite = bool(np.isfinite(b).all())
    return {"max_abs_logits_diff": float(np.abs(a - b).max()) if finite else float("inf"),
            "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()) if finite else 0.0,
            "samples": int(len(a))}


# ---------------------------------------------------------------------------------------------
# calibration inputs: validation images through the preceding pieces
# ---------------------------------------------------------------------------------------------

def prepare_images(manifest, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC pixels (normalised as the runtime does) or float32 NCHW model input."""
    from runtime.preprocess import prepare_input

    inp = manifest.input
    x, _batched = prepare_input(np.asarray(images), inp.shape, inp.mean, inp.std,
                                preprocess=inp.raw.preprocess)
    if x.ndim != 4:
        x = x[None]
    return np.ascontiguousarray(x, dtype=np.float32)


def _spread(arrays: list[np.ndarray], n: int) -> np.ndarray:
    """``n`` rows spread evenly over the concatenation (every source and image represented)."""
    cat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
    if len(cat) <= n:
        return cat
    return cat[np.linspace(0, len(cat) - 1, n).round().astype(int)]


def _portable_paths(manifest, root: Path) -> dict[str, Path]:
    out = {}
    for p in manifest.pieces:
        found = p.find_artifacts("onnx")
        if not found:
            raise UsageError(f"piece {p.id!r} has no portable ONNX artifact; INT8 quantization "
                             "calibrates and checks against it")
        out[p.id] = root / found[0].file
    return out


def _calibration_inputs(manifest, root: Path, x: np.ndarray, n: Optional[int],
                        pieces: Optional[Sequence[str]] = None) -> dict[str, dict[str, np.ndarray]]:
    """piece id -> {input name: array} (see :func:`piece_calibration_inputs`)."""
    paths = _portable_paths(manifest, root)
    sessions: dict[str, Any] = {}
    wanted = set(pieces) if pieces is not None else {p.id for p in manifest.pieces}
    name = manifest.input.name
    # env after segment k of a config, by prefix cfg[:k+1] (shared prefixes run once)
    envs: dict[str, dict[str, np.ndarray]] = {"": {name: x}}
    got: dict[str, dict[str, list]] = {}
    seen: set[tuple[str, str]] = set()

    def record(pid: str, prefix: str, env: Mapping[str, np.ndarray]) -> None:
        if pid not in wanted or (pid, prefix) in seen:
            return
        seen.add((pid, prefix))
        piece = manifest.piece(pid)
        slot = got.setdefault(pid, {})
        for t in piece.inputs:
            slot.setdefault(t.name, []).append(env[t.name])

    for cfg in manifest.skip_configs:
        for k, seg in enumerate(manifest.execution[cfg]):
            prefix = cfg[:k]
            env = envs[prefix]
            if cfg[:k + 1] in envs:
                for pid in seg:
                    record(pid, prefix, env)  # already run; same inputs
                continue
            env = dict(env)
            for pid in seg:
                record(pid, prefix, env)
                sess = sessions.get(pid) or sessions.setdefault(pid, _session(paths[pid]))
                env.update(_run(sess, env))
            envs[cfg[:k + 1]] = env
    for p in manifest.pieces:  # merged spans: their input after stage first-1 of any prefix
        if p.first_stage is None or p.id not in wanted:
            continue
        for cfg in manifest.skip_configs:
            if cfg[p.first_stage:p.stage + 1] == p.variant:
                record(p.id, cfg[:p.first_stage], envs[cfg[:p.first_stage]])
    return {pid: {k: _spread(v, n or sum(len(a) for a in v)) for k, v in d.items()}
            for pid, d in got.items()}


def piece_calibration_inputs(bundle, images: np.ndarray, n: Optional[int] = DEFAULT_CALIB,
                             pieces: Optional[Sequence[str]] = None) -> dict[str, dict[str, np.ndarray]]:
    """The real inputs of every piece: ``images`` (uint8 NHWC pixels or float32 NCHW model
    input) pushed through the preceding pieces (the bundle's portable ONNX, ONNX Runtime)
    along every skip configuration's plan; a piece reached from several prefixes (stage 1
    after stage 0 full or skipped) gets rows of each, ``n`` rows in all, spread evenly. Merged
    pieces get their span's input (``n=None``: every row, each prefix's after the other's).
    Returns ``{piece id: {input name: float32 array}}``.
    ``bundle``: a :class:`runtime.bundle.Bundle` or a bundle directory."""
    from runtime.bundle import Bundle

    if not isinstance(bundle, Bundle):
        bundle = Bundle.open(bundle)
    x = prepare_images(bundle.manifest, images)
    return _calibration_inputs(bundle.manifest, bundle.root, x, n, pieces)


# ---------------------------------------------------------------------------------------------
# latency: interleaved, batch 1, one thread
# ---------------------------------------------------------------------------------------------

def _interleaved_ms(paths: Sequence[Path], feeds: Mapping[str, np.ndarray], runs: int,
                    level: str = "all") -> list[float]:
    """Median ms per run of each model, run in turn (order rotated every round) so that a
    background load hits all of them alike."""
    sessions = [_session(p, level) for p in paths]
    calls = []
    for s in sessions:
        names = [i.name for i in s.get_inputs()]
        one = {k: np.ascontiguousarray(feeds[k][:1], dtype=np.float32) for k in names}
        calls.append(lambda s=s, one=one: s.run(None, one))
    for c in calls:  # warm-up
        for _ in range(10):
            c()
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    clock = time.perf_counter
    for r in range(runs):
        rot = order[r % len(order):] + order[:r % len(order)]
        for i in rot:
            t0 = clock()
            calls[i]()
            times[i].append(clock() - t0)
    return [float(np.median(t)) * 1e3 for t in times]


# ---------------------------------------------------------------------------------------------
# a manifest (in a directory being written) and a bundle (in place)
# ---------------------------------------------------------------------------------------------

def _variants(model, piece, exclude, input_name: str) -> list[tuple[str, list[str]]]:
    """(name, nodes kept fp32) per variant to try: ``exclude="auto"``: all int8, first conv
    fp32 (pieces that read the image), head fp32, both; else one variant with those nodes."""
    if exclude != "auto":  # the named nodes this piece has (one list serves every piece)
        names = {n.name for n in model.graph.node}
        mine = [n for n in (exclude or []) if n in names]
        return [("custom" if mine else "all-int8", mine)]
    out = [("all-int8", [])]
    reads_image = any(t.name == input_name for t in piece.inputs)
    conv = first_conv(model) if reads_image else []
    head = head_nodes(model) if piece.returns_logits else []
    if conv:
        out.append(("fp32-first-conv", conv))
    if head:
        out.append(("fp32-head", head))
    if conv and head:
        out.append(("fp32-first-conv+head", list(dict.fromkeys(conv + head))))
    return out


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def quantize_manifest(manifest, root: PathLike, images: np.ndarray, *, backend: str = "onnxruntime",
                      target: Optional[str] = None, exclude: Union[str, Sequence[str]] = "auto",
                      min_speedup: float = DEFAULT_MIN_SPEEDUP,
                      max_agreement_drop: float = DEFAULT_MAX_AGREEMENT_DROP,
                      measure: bool = True, host_is_target: bool = True,
                      reduce_range: Optional[bool] = None, arch: Optional[str] = None,
                      isa: Optional[Sequence[str]] = None, per_channel: bool = True,
                      calib_samples: int = DEFAULT_CALIB, held_out: int = DEFAULT_HELD_OUT,
                      runs: int = DEFAULT_RUNS, pieces: Optional[Sequence[str]] = None,
                      progress: Optional[Progress] = None, activation_type: str = "QUInt8",
                      symmetric_activations: bool = False, quantize_bias: bool = True) -> dict:
    """Quantize the ``backend``/``target`` artifacts of ``manifest`` (files under ``root``) in
    place; return the report (also stored in ``manifest.annotations["quantize"]``).

    ``images``: validation images (uint8 NHWC or float32 NCHW); the first ``calib_samples``
    calibrate, the next ``held_out`` judge agreement (at least 16). ``host_is_target``: this
    machine can stand for the target, so latencies are ``measured``; else they are measured here
    and recorded as ``estimated``. ``measure=False``: no timing, a piece is accepted on its
    agreement alone (the report says so). ``activation_type``/``symmetric_activations``/
    ``quantize_bias``: the QDQ style (:data:`TENSORRT_QDQ` where TensorRT reads the same files). The caller saves the
    manifest."""
    import onnxruntime as ort

    from export.manifest_builder import add_artifact_file
    from runtime.host import isa_flags, machine_arch, normalize_arch
    from runtime.jsonsafe import json_safe

    progress = progress or (lambda _m: None)
    root = Path(root)
    if min_speedup <= 0 or not 0 <= max_agreement_drop < 1:
        raise UsageError(f"min_speedup must be > 0 and max_agreement_drop in [0, 1), got "
                         f"{min_speedup} and {max_agreement_drop}")
    if backend != "onnxruntime":
        raise UsageError(f"INT8 pieces are built for the onnxruntime backend, not {backend!r}")
    targets = sorted({a.target for p in manifest.pieces for a in p.find_artifacts(backend)})
    if target is None:
        if len(targets) != 1:
            raise UsageError(f"the bundle has {len(targets) or 'no'} {backend} targets "
                             f"({', '.join(targets)}); compile it for a device with the "
                             f"{backend} backend first" if not targets else
                             f"name the target: {', '.join(targets)}")
        target = targets[0]
    x = prepare_images(manifest, images)
    n_calib = min(int(calib_samples), max(1, len(x) - 16))
    if len(x) - n_calib < 16:
        raise UsageError(f"INT8 quantization needs at least {16 + 1} images (calibration plus "
                         f"16 held out), got {len(x)}")
    x_cal, x_eval = x[:n_calib], x[n_calib:n_calib + int(held_out)]
    t_arch = normalize_arch(arch) if arch else machine_arch()
    vnni = sorted(set(isa if isa is not None else isa_flags()) & set(VNNI_FLAGS))
    how = "auto" if reduce_range is None else "given"
    if reduce_range is None:
        reduce_range = needs_reduce_range(t_arch, isa)
    rr_why = f"{how}; target {t_arch}" + (
        (f" with {', '.join(vnni)}" if vnni else " without VNNI") if t_arch == "x86_64" else "")
    todo = [p for p in manifest.pieces if p.find_artifacts(backend, target)
            and (pieces is None or p.id in pieces)]
    cal = _calibration_inputs(manifest, root, x_cal, n_calib, [p.id for p in todo])
    ev = _calibration_inputs(manifest, root, x_eval, None, [p.id for p in todo])
    portable = _portable_paths(manifest, root)
    kind = ("measured" if host_is_target else "estimated") if measure else "not measured"
    target_drop = float(max_agreement_drop)
    report: dict[str, Any] = {
        "backend": backend, "target": target, "min_speedup": float(min_speedup),
        "max_agreement_drop": target_drop, "latency_kind": kind,
        "settings": {"format": "QDQ", "per_channel": bool(per_channel),
                     "reduce_range": bool(reduce_range), "reduce_range_why": rr_why,
                     "activation_type": activation_type, "weight_type": "QInt8",
                     "symmetric_activations": bool(symmetric_activations),
                     "quantize_bias": bool(quantize_bias),
                     "calibrate_method": "MinMax", "exclude": exclude},
        "calibration": {"images": int(len(x_cal)), "held_out": int(len(x_eval)),
                        "rows_per_piece": int(n_calib)},
        "host": {"arch": machine_arch(), "processor": platform.processor() or None,
                 "int8_flags": sorted(set(isa_flags()) & (set(VNNI_FLAGS) | set(HOST_FLAGS))),
                 "onnxruntime": ort.__version__},
        "timing": {"batch": 1, "threads": 1, "runs": int(runs), "interleaved": True},
        "pieces": {},
    }
    tmp_dir = Path(tempfile.mkdtemp(prefix=".quantize-", dir=root))
    chosen: dict[str, dict] = {}  # pid -> {file (tmp), variant info}
    try:
        for p in todo:
            art = p.find_artifacts(backend, target)[0]
            entry: dict[str, Any] = {"exit": p.stage}
            report["pieces"][p.id] = entry
            if art.options.get("precision") == "int8":
                entry.update(decision="int8", reason="already int8 in this bundle")
                continue
            import onnx

            model = onnx.load(str(portable[p.id]))
            _ensure_node_names(model)
            fp32_eval = _run(_session(portable[p.id]), ev[p.id])
            tried = []
            for vi, (vname, excl) in enumerate(_variants(model, p, exclude, manifest.input.name)):
                out = tmp_dir / f"{p.id}.{vi}{QDQ_SUFFIX}"
                t0 = time.perf_counter()
                settings = quantize_piece(portable[p.id], out, cal[p.id], per_channel=per_channel,
                                          reduce_range=reduce_range, exclude_nodes=excl,
                                          activation_type=activation_type,
                                          symmetric_activations=symmetric_activations,
                                          quantize_bias=quantize_bias)
                par = logits_parity(fp32_eval, _run(_session(out), ev[p.id]))
                ok = par["argmax_agreement"] >= 1.0 - target_drop - 1e-12
                tried.append({"variant": vname, "fp32_nodes": excl, **par, "passed": ok,
                              "file": out, "settings": settings,
                              "seconds": round(time.perf_counter() - t0, 3)})
            passing = [t for t in tried if t["passed"]]
            level = art.options.get("graph_optimization_level", "all")
            fp32_ms = None
            if measure:  # every variant, so a rejection still says what int8 would have gained
                ms = _interleaved_ms([root / art.file] + [t["file"] for t in tried], ev[p.id],
                                     runs, level if level in ("basic", "extended", "all") else "all")
                fp32_ms = ms[0]
                for t, m_ in zip(tried, ms[1:]):
                    t["int8_ms"] = m_
                    t["speedup"] = fp32_ms / m_ if m_ > 0 else float("inf")
            if measure and passing:
                best = min(passing, key=lambda t: t["int8_ms"])
            elif passing:
                best = max(passing, key=lambda t: (t["argmax_agreement"], -len(t["fp32_nodes"])))
            else:
                best = None
            entry["variants"] = [{k: v for k, v in t.items() if k not in ("file", "settings")}
                                 for t in tried]
            entry["fp32_ms"] = fp32_ms
            if best is None:
                top = max(tried, key=lambda t: t["argmax_agreement"])
                entry.update(decision="fp32", reason=(
                    f"accuracy: best exit-{p.stage} argmax agreement "
                    f"{_fmt_pct(top['argmax_agreement'])} ({top['variant']}) < "
                    f"{_fmt_pct(1 - target_drop)}"
                    + (f" (it would run {top['speedup']:.2f}x faster)" if measure else "")))
            elif measure and best["speedup"] < min_speedup:
                entry.update(decision="fp32", variant=best["variant"], reason=(
                    f"speed: int8 {best['int8_ms']:.3f} ms vs fp32 {fp32_ms:.3f} ms "
                    f"({best['speedup']:.2f}x, {kind}) < required {min_speedup:.2f}x"))
            else:
                entry.update(decision="int8", variant=best["variant"], reason=(
                    f"{best['speedup']:.2f}x faster ({kind}), agreement "
                    f"{_fmt_pct(best['argmax_agreement'])}" if measure else
                    f"agreement {_fmt_pct(best['argmax_agreement'])}; speed not measured"))
                chosen[p.id] = best
            progress(f"int8    {p.id:<24} {entry['decision']:<4}  {entry['reason']}")

        # chained check: every exit of every config, accepted pieces int8, others fp32
        chained: dict[str, list[float]] = {}
        earlier = {p.id: root / p.find_artifacts(backend, target)[0].file for p in manifest.pieces
                   if p.find_artifacts(backend, target)
                   and p.find_artifacts(backend, target)[0].options.get("precision") == "int8"}
        while True:
            chained, bad = _chained_agreement(
                manifest, portable, {**earlier, **{k: v["file"] for k, v in chosen.items()}},
                x_eval, target_drop)
            if bad is None:
                break
            cfg, k, agreement = bad
            path_ids = [pid for seg in manifest.execution[cfg][:k + 1] for pid in seg if pid in chosen]
            if not path_ids:  # only pieces made int8 by an earlier run: reported, not undone
                report["chained_note"] = (f"exit {k} of {cfg} agrees {_fmt_pct(agreement)} with "
                                          "fp32 through pieces quantized by an earlier run")
                break
            victim = min(path_ids, key=lambda pid: chosen[pid]["argmax_agreement"])
            report["pieces"][victim].update(decision="fp32", reason=(
                f"accuracy: chained, exit {k} of {cfg} agreed {_fmt_pct(agreement)} with fp32 "
                f"< {_fmt_pct(1 - target_drop)} with this piece int8"))
            progress(f"int8    {victim:<24} fp32  {report['pieces'][victim]['reason']}")
            del chosen[victim]
        report["chained_argmax_agreement"] = chained

        # write the accepted pieces into the bundle
        replaced: list[str] = []
        for p in todo:
            art = p.find_artifacts(backend, target)[0]
            entry = report["pieces"][p.id]
            if p.id not in chosen:
                if art.options.get("precision") != "int8":
                    art.options = {**art.options, "precision": "fp32"}
                continue
            best = chosen[p.id]
            rel = f"{backend}/{target}/{p.id}{QDQ_SUFFIX}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(best["file"], root / rel)
            opts = {k: v for k, v in art.options.items()
                    if k not in ("saved_optimization_level", "saved_for_provider")}
            opts.update({
                "saved_optimization_level": "disable",
                "precision": "int8",
                "quantization": {**best["settings"], "variant": best["variant"]},
                "parity": {"exit": p.stage, "max_abs_logits_diff": best["max_abs_logits_diff"],
                           "argmax_agreement": best["argmax_agreement"],
                           "samples": best["samples"], "reference": portable[p.id].relative_to(root).as_posix()},
                "latency": {"kind": kind, "fp32_ms": entry.get("fp32_ms"),
                            "int8_ms": best.get("int8_ms"), "speedup": best.get("speedup"),
                            "batch": 1, "threads": 1},
            })
            if art.file != rel:
                replaced.append(art.file)
            add_artifact_file(manifest, root, p.id, rel, backend=backend, target=target,
                              options=json_safe(opts), replace=True)
            entry["file"] = rel
    finally:
        import shutil

        shutil.rmtree(tmp_dir, ignore_errors=True)
    report["accepted"] = [pid for pid, e in report["pieces"].items() if e.get("decision") == "int8"]
    report["rejected"] = {pid: e["reason"] for pid, e in report["pieces"].items()
                          if e.get("decision") == "fp32"}
    report["replaced_files"] = replaced
    manifest.annotations = {**manifest.annotations, "quantize": json_safe(report)}
    return report


def _chained_agreement(manifest, portable: Mapping[str, Path], int8: Mapping[str, Path],
                       x: np.ndarray, drop: float):
    """Argmax agreement of every exit of every config, mixed (``int8`` pieces) vs all-fp32;
    returns ({cfg: [agreement per exit]}, the first failing (cfg, exit, agreement) or None)."""
    name = manifest.input.name
    sessions: dict[tuple[str, bool], Any] = {}

    def sess(pid: str, q: bool):
        key = (pid, q)
        if key not in sessions:
            sessions[key] = _session(int8[pid] if q else portable[pid])
        return sessions[key]

    out: dict[str, list[float]] = {}
    bad = None
    memo: dict[tuple[str, bool], tuple[dict, dict, list]] = {}
    for cfg in manifest.skip_configs:
        ref_env, mix_env, agree = {name: x}, {name: x}, []
        for k, seg in enumerate(manifest.execution[cfg]):
            key = (cfg[:k + 1], True)
            if key in memo:
                ref_env, mix_env, a = memo[key]
                agree.append(a)
                continue
            ref_env, mix_env = dict(ref_env), dict(mix_env)
            for pid in seg:
                ref_env.update(_run(sess(pid, False), ref_env))
                mix_env.update(_run(sess(pid, pid in int8), mix_env))
            a = float((ref_env["logits"].argmax(1) == mix_env["logits"].argmax(1)).mean())
            memo[key] = (ref_env, mix_env, a)
            agree.append(a)
        out[cfg] = agree
        if bad is None:
            for k, a in enumerate(agree):
                if a < 1.0 - drop - 1e-12 and any(
                        pid in int8 for seg in manifest.execution[cfg][:k + 1] for pid in seg):
                    bad = (cfg, k, a)
                    break
    return out, bad


def _profile_of(m):
    if not m.device:
        return None
    try:
        from devices import load_profile
        return load_profile(m.device)
    except Exception:  # noqa: BLE001 - an unknown or invalid profile: this host stands for it
        return None


def target_facts(profile) -> dict:
    """``arch``, ``isa`` and ``host_is_target`` of a device profile for :func:`quantize_manifest`:
    its CPU (``reduce_range`` follows its VNNI flags), and whether this host can stand for it
    (same architecture, every ISA flag of the profile, ONNX Runtime on the CPU provider there);
    ``None``: this host."""
    from runtime.host import isa_flags, machine_arch

    if profile is None:
        return {"arch": machine_arch(), "isa": list(isa_flags()), "host_is_target": True}
    providers = list((profile.backend("onnxruntime").options if profile.backend("onnxruntime")
                      else {}).get("providers") or ["CPUExecutionProvider"])
    return {"arch": profile.arch, "isa": list(profile.hardware.isa),
            "host_is_target": bool(profile.is_host_compatible())
            and providers[0] == "CPUExecutionProvider"}


def quantize_bundle(bundle_dir: PathLike, images: np.ndarray, *,
                    exclude: Union[str, Sequence[str]] = "auto",
                    min_speedup: float = DEFAULT_MIN_SPEEDUP,
                    max_agreement_drop: float = DEFAULT_MAX_AGREEMENT_DROP, measure: bool = True,
                    progress: Optional[Progress] = None, **kw: Any) -> dict:
    """Quantize a device bundle in place (its ``onnxruntime`` pieces, stage and merged ones);
    return the report. Accepted pieces' artifacts are replaced by QDQ files, then the manifest
    is validated and rewritten atomically and the replaced fp32 files are removed. Whether this
    host stands for the target (latencies ``measured``, else ``estimated``) and ``reduce_range``
    come from the bundle's device profile (:func:`target_facts`) unless given in ``kw`` (``host_is_target``, ``reduce_range``, ``arch``, ``isa``; other keys: see
    :func:`quantize_manifest`). A bundle with tensorrt artifacts is quantized in the TensorRT
    style (:data:`TENSORRT_QDQ`) and its int8 pieces' tensorrt artifacts are pointed at the QDQ
    files (:func:`export.tensorrt.backend.use_qdq_pieces`)."""
    from runtime.bundle import Bundle
    from runtime.manifest import MANIFEST_NAME, save_manifest

    root = Path(bundle_dir)
    bundle = Bundle.open(root)
    m = bundle.manifest.copy()
    target = kw.pop("target", None)
    facts = target_facts(_profile_of(m))
    has_trt = any(p.find_artifacts("tensorrt") for p in m.pieces)
    for key, value in {**facts, **(TENSORRT_QDQ if has_trt else {})}.items():
        if kw.get(key) is None:
            kw[key] = value
    report = quantize_manifest(m, root, images, target=target, exclude=exclude,
                               min_speedup=min_speedup, max_agreement_drop=max_agreement_drop,
                               measure=measure, progress=progress, **kw)
    if has_trt:  # the tensorrt artifacts of int8 pieces read the same QDQ files
        from export.tensorrt.backend import use_qdq_pieces

        use_qdq_pieces(m, root, progress=progress)
    save_manifest(m, root / MANIFEST_NAME)
    still = {a.file for p in m.pieces for a in p.artifacts}
    for rel in report.get("replaced_files", []):
        if rel not in still:
            with contextlib.suppress(OSError):
                (root / rel).unlink()
    Bundle.open(root)
    return report
