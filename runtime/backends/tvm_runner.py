"""Run one TVM-compiled piece (a Relax VM library ``.so``) on numpy inputs.

Needs only numpy and the TVM runtime (``tvm`` is imported when a runner is created, with a clear
error if it is missing); it never imports torch, ``train`` or ``export``. Input/output names, the
compiled batch and dtypes come from ``<library>.json`` written by ``export.tvm.compile``.

    runner = TVMPieceRunner("bundle/piece0.x86_64-llvm.so")
    features, logits = runner.run({"x": x})

A library compiled for a fixed batch ``b`` (tuned pieces are) accepts any batch that is a multiple
of ``b``: it is run in chunks of ``b`` and the outputs are concatenated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TVMPieceRunner", "import_tvm"]

_TVM_MISSING = (
    "running TVM pieces needs the Apache TVM runtime: pip install 'apache-tvm==0.27.0.post1' "
    "'apache-tvm-ffi==0.1.14.post1' (or use a bundle built for ONNX Runtime)"
)


def import_tvm():
    """Import tvm or raise an ImportError that says what to install.

    ``tvm_ffi`` imports torch whenever torch is installed (for DLPack interop we do not use). The
    runtime never needs torch, so unless the application already imported it, torch is hidden
    while tvm loads: running a TVM bundle costs neither torch's import time nor its memory.
    """
    import sys

    hide_torch = "torch" not in sys.modules
    if hide_torch:
        sys.modules["torch"] = None  # type: ignore[assignment]  # makes `import torch` fail
    try:
        import tvm  # noqa: PLC0415
        from tvm.runtime.vm import VirtualMachine  # noqa: F401, PLC0415
    except ImportError as exc:
        raise ImportError(_TVM_MISSING) from exc
    finally:
        if hide_torch and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]
    return tvm


def _metadata(path: Path) -> dict[str, Any]:
    meta_path = path.with_name(path.name + ".json")
    if not meta_path.is_file():
        return {}
    try:
        return json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ValueError(f"unreadable TVM piece metadata {meta_path}: {exc}") from exc


def _private_copy(data: bytes, name: str) -> Path:
    """Write ``data`` (a library's verified bytes) to a new private directory (0700) as a 0600
    file and return its path: what is loaded is exactly what was checked, whatever happens to
    the bundle's file afterwards. The caller removes the directory once the library is loaded."""
    tmp = Path(tempfile.mkdtemp(prefix="adn-tvm-"))  # mode 0700, unique, owned by us
    path = tmp / (re.sub(r"[^A-Za-z0-9._-]", "_", name) or "piece.so")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _device(tvm, device: str):
    m = re.fullmatch(r"(cpu|cuda|gpu)(?::(\d+))?", device.strip().lower())
    if m is None:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    index = int(m.group(2) or 0)
    if m.group(1) == "cpu":
        return tvm.cpu(index)
    dev = tvm.cuda(index)
    if not dev.exist:
        raise RuntimeError(f"CUDA device {index} is not available to TVM on this machine")
    return dev


class TVMPieceRunner:
    """Load a compiled piece and run it with the Relax virtual machine.

    Attributes: ``input_names``, ``output_names``, ``batch`` (None: any batch), ``path``, ``device``.
    ``input_names``/``output_names`` override or replace the metadata (a library without its
    ``.json`` gets ``input0..`` / ``output0..``). ``library_bytes``: the library's bytes as
    verified against a bundle manifest (``Bundle.read_artifact``); they are copied to a private
    temporary file (0600 in a fresh 0700 directory, removed once loaded) and that copy is
    loaded, so a file changed in the bundle after the check never runs. ``path`` then only names
    the library in messages (and locates its ``.json`` when names are not given).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        device: str = "cpu",
        *,
        input_names: list[str] | None = None,
        output_names: list[str] | None = None,
        batch: int | None = None,
        library_bytes: bytes | None = None,
    ) -> None:
        tvm = import_tvm()
        from tvm.runtime.vm import VirtualMachine  # noqa: PLC0415

        self._tvm = tvm
        self.path = Path(path)
        if library_bytes is None and not self.path.is_file():
            raise FileNotFoundError(f"TVM piece library not found: {self.path}")
        # Names and batch given by the caller (from a verified bundle manifest) win; the sidecar
        # ``.json`` is only read for standalone use of a library.
        meta = {} if input_names and output_names else _metadata(self.path)
        self.metadata = meta
        self.input_names: list[str] = list(input_names or meta.get("input_names") or ["input0"])
        self._output_names = list(output_names or meta.get("output_names") or [])
        self.batch: int | None = batch if batch is not None else meta.get("batch")
        self.input_dtypes: list[str] = list(meta.get("input_dtypes") or ["float32"] * len(self.input_names))
        self.input_shapes: list[list[Any]] | None = meta.get("input_shapes")
        self.device = device
        self._dev = _device(tvm, device)
        private = _private_copy(library_bytes, self.path.name) if library_bytes is not None else None
        try:
            lib = tvm.runtime.load_module(str(private or self.path))
            self._vm = VirtualMachine(lib, self._dev)
        except Exception as exc:
            raise RuntimeError(
                f"cannot load {self.path} (built for {meta.get('target_slug', 'an unknown target')}): {exc}"
            ) from exc
        finally:
            if private is not None:  # loaded (mapped) or failed: the copy is not needed any more
                shutil.rmtree(private.parent, ignore_errors=True)
        self._main = self._vm["main"]

    @property
    def output_names(self) -> list[str]:
        return self._output_names

    def _check(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise KeyError(f"missing inputs {missing}; this piece takes {self.input_names}")
        arrays = []
        for i, name in enumerate(self.input_names):
            a = np.ascontiguousarray(feeds[name], dtype=self.input_dtypes[i])
            if self.input_shapes is not None and i < len(self.input_shapes):
                want = self.input_shapes[i]
                if a.ndim != len(want) or any(
                    isinstance(w, int) and w != g for w, g in zip(want[1:], a.shape[1:], strict=False)
                ):
                    raise ValueError(f"input {name!r} has shape {a.shape}, expected {want}")
            arrays.append(a)
        n = {a.shape[0] for a in arrays if a.ndim}
        if len(n) > 1:
            raise ValueError(f"inputs disagree on the batch size: {sorted(n)}")
        return arrays

    def _call(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        tvm = self._tvm
        args = [tvm.runtime.tensor(a, device=self._dev) for a in arrays]
        out = self._main(*args)
        if isinstance(out, tvm.runtime.Tensor):
            outs = [out]
        else:
            outs = list(out)
        return [o.numpy() for o in outs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the piece; returns the outputs in ``output_names`` order."""
        arrays = self._check(feeds)
        b = self.batch
        n = arrays[0].shape[0] if arrays[0].ndim else 1
        if b is None or n == b:
            outs = self._call(arrays)
        else:
            if n % b:
                raise ValueError(
                    f"{self.path.name} was compiled for batch {b}; got batch {n}, not a multiple of it"
                )
            parts = [self._call([a[i : i + b] for a in arrays]) for i in range(0, n, b)]
            outs = [np.concatenate([p[k] for p in parts], axis=0) for k in range(len(parts[0]))]
        if not self._output_names:
            self._output_names = [f"output{i}" for i in range(len(outs))]
        return outs

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.run(feeds)

    def __repr__(self) -> str:
        return f"TVMPieceRunner({str(self.path)!r}, device={self.device!r}, batch={self.batch})"


# -- backend registry interface (runtime/backends/__init__.py) -----------------------------------

def open_runner(path: str | os.PathLike, options: dict[str, Any], *, input_names=None,
                output_names=None, data: bytes | None = None) -> "TVMPieceRunner":
    """A Relax VM over one compiled piece library (a private copy of the verified bytes)."""
    return TVMPieceRunner(path, device=options.get("device", "cpu"), batch=options.get("batch"),
                          input_names=input_names, output_names=output_names,
                          library_bytes=data)


def why_unusable(bundle: Any, target: str, artifacts: list) -> str | None:
    """Nothing beyond the generic checks: architecture, ISA flags and GPU come from the
    deployment record, the library from the registry."""
    return None
