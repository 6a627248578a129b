"""ONNX export of one piece: eval mode, opset >= 17, dynamic batch axis, single file, checked.

Two exporters (docs/export.md):

* ``"torchscript"`` (default): ``torch.onnx.export(..., dynamo=False)``. Honours the requested
  opset exactly (17 by default) and takes ~0.2-0.9 s per piece here.
* ``"dynamo"``: ``torch.onnx.export(..., dynamo=True, external_data=False)`` (needs onnxscript).
  Its lowest implemented opset is 18 and it takes ~2-5 s per piece. Used automatically when the
  TorchScript exporter is not available in the installed torch.

Both fold BatchNorm into the convolutions. :func:`check_onnx` runs ``onnx.checker`` (full check,
with shape inference) and checks the opset, the tensor names and that axis 0 of every input and
output is the symbolic batch dimension ``N``.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from export.errors import ExportError

MIN_OPSET = 17
DEFAULT_OPSET = 17
BATCH_DIM = "N"
EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
DYNAMO_MIN_OPSET = 18  # the dynamo exporter's lowest implemented opset (17 -> 18, not down-converted)


@dataclass
class OnnxInfo:
    """What :func:`check_onnx` found in an exported file."""

    path: Path
    opset: int
    inputs: dict[str, list]   # name -> shape (dims: int or "N")
    outputs: dict[str, list]
    exporter: str
    size_bytes: int


def _dims(value_info) -> list:
    return [d.dim_param if d.dim_param else int(d.dim_value)
            for d in value_info.type.tensor_type.shape.dim]


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset {opset!r}: the export needs ONNX opset >= {MIN_OPSET}")
    return opset


def export_module(module: nn.Module, example: Tensor, path: str | os.PathLike, *, input_name: str,
                  output_names: Sequence[str], opset: int = DEFAULT_OPSET,
                  exporter: str = DEFAULT_EXPORTER) -> str:
    """Export ``module(example)`` to ``path`` (a single ONNX file). Returns the exporter used.

    A batch of 1 is doubled so that no exporter specialises the batch axis. Output shapes the
    exporter left symbolic (e.g. the token axis of a ViT) are set from the torch outputs; the
    full ``onnx.checker`` run in :func:`check_onnx` then verifies them by shape inference.
    """
    check_opset(opset)
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter {exporter!r}: expected one of {', '.join(EXPORTERS)}")
    if example.shape[0] < 2:
        example = torch.cat([example, example])
    module.eval()
    with torch.no_grad():
        outs = module(example)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    shapes = {n: list(o.shape[1:]) for n, o in zip(output_names, outs)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [input_name, *output_names]
    if exporter == "torchscript":
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                              output_names=list(output_names), opset_version=opset,
                              dynamic_axes={n: {0: BATCH_DIM} for n in names},
                              do_constant_folding=True, dynamo=False)
        _fix_io_shapes(path, shapes)
        return exporter
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                          output_names=list(output_names), opset_version=max(opset, DYNAMO_MIN_OPSET),
                          dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                          dynamo=True, external_data=False, verbose=False)
    _fix_io_shapes(path, shapes)
    return exporter


def _fix_io_shapes(path: Path, output_shapes: dict[str, list[int]]) -> None:
    """Axis 0 of every graph input/output is ``N``; output sample dims are the torch ones."""
    import onnx

    model = onnx.load(str(path))
    changed = False
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_param != BATCH_DIM:
            dims[0].dim_param = BATCH_DIM
            changed = True
        want = output_shapes.get(vi.name)
        if want is None or len(dims) != len(want) + 1:
            continue
        for d, size in zip(list(dims)[1:], want):
            if d.dim_param or d.dim_value != size:
                d.dim_value = int(size)  # clears dim_param (oneof)
                changed = True
    if changed:
        onnx.save(model, str(path))


def check_onnx(path: str | os.PathLike, *, input_names: Sequence[str], output_names: Sequence[str],
               min_opset: int = MIN_OPSET, exporter: str = "") -> OnnxInfo:
    """``onnx.checker`` (full), opset, I/O names, dynamic batch axis, no external data."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path.name}: onnx.checker failed: {str(exc).splitlines()[0]}") from exc
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"{path.name}: initializer {init.name!r} uses external data; "
                              "the bundle needs single-file ONNX")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < min_opset:
        raise ExportError(f"{path.name}: opset {opset} < {min_opset}")
    inputs = {vi.name: _dims(vi) for vi in model.graph.input}
    outputs = {vi.name: _dims(vi) for vi in model.graph.output}
    for kind, have, want in (("inputs", inputs, input_names), ("outputs", outputs, output_names)):
        if list(have) != list(want):
            raise ExportError(f"{path.name}: graph {kind} are {list(have)}, expected {list(want)}")
        for name, dims in have.items():
            if not dims or dims[0] != BATCH_DIM:
                raise ExportError(f"{path.name}: {kind[:-1]} {name!r} has shape {dims}: axis 0 "
                                  f"must be the dynamic batch dimension {BATCH_DIM!r}")
            if any(not isinstance(d, int) for d in dims[1:]):
                raise ExportError(f"{path.name}: {kind[:-1]} {name!r} has shape {dims}: only the "
                                  "batch axis may be dynamic")
    return OnnxInfo(path=path, opset=opset, inputs=inputs, outputs=outputs, exporter=exporter,
                    size_bytes=path.stat().st_size)
