"""ONNX Runtime execution of one piece (the embedded default backend).

Robust on a real device (docs/runtime.md, "Threads and execution providers"):

* intra-/inter-op thread counts larger than the cores this process may use
  (:func:`usable_cores`: CPU affinity, cgroup CPU quota) are clamped to them, with one
  :class:`ThreadClampWarning` per process naming both numbers: a profile's 6 threads on a 2-core
  machine make onnxruntime's spinning workers fight for the cores (50-70 ms stalls);
* an execution provider the options ask for that this onnxruntime cannot use is reported
  (:class:`ProviderUnavailableWarning`, ``runner.providers_missing``), never dropped silently;
  ``runner.providers`` is what the session really runs with;
* unknown runner options are refused with a :class:`runtime.errors.ConfigError` listing the
  known ones;
* ``provider_options`` (per execution provider, checked against
  :data:`runtime.backends.provider_options.KNOWN`) go to the providers this onnxruntime has,
  as ``InferenceSession(providers=[(name, options), ...])``; the TensorRT EP's engine cache
  is placed in the bundle's ``engines/`` directory.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from runtime.backends import backend_info, provider_options as _po, runner_options
from runtime.backends.tensorrt_cache import find_bundle_root
from runtime.host import usable_cores

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC",
           "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}
# Session-creation failures that are the machine's, not the artifact's (an execution provider
# or device that cannot start): re-raised as they are instead of as a BundleIntegrityError.
_NOT_THE_ARTIFACT = ("EPFail", "EngineError", "DeviceReset")
_CPU = "CPUExecutionProvider"

#: Options the runner applies to its session: the registry's (runtime/backends/__init__.py).
SESSION_OPTIONS = tuple(sorted(backend_info("onnxruntime").runner_options))


class ThreadClampWarning(RuntimeWarning):
    """More onnxruntime threads were asked for than this process has cores; clamped."""


class ProviderUnavailableWarning(RuntimeWarning):
    """An execution provider the options ask for cannot be used; the session runs without it."""


# -- once-per-process warnings ---------------------------------------------------------------------

_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(key: tuple, message: str, category: type, stacklevel: int = 3) -> None:
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)


def clamp_threads(intra_op_threads: Optional[int], inter_op_threads: Optional[int],
                  cores: Optional[int] = None) -> tuple[int, int]:
    """``(intra, inter)`` thread counts to give onnxruntime on this machine (0 = its default).

    A count above ``cores`` (default :func:`usable_cores`) is clamped to it, with one
    :class:`ThreadClampWarning` per process and numbers. An unset intra-op count (0/None) lets
    onnxruntime choose, except when this process may use fewer cores than the machine has
    (affinity, cgroup quota), which onnxruntime's default does not see: then ``cores``. The
    inter-op count only matters in parallel execution mode (the runner is sequential); it is
    clamped the same way.
    """
    cores = usable_cores() if cores is None else int(cores)
    intra, inter = int(intra_op_threads or 0), int(inter_op_threads or 0)
    if intra > cores:
        _warn_once(("intra", intra, cores),
                   f"onnxruntime: intra_op_threads {intra} > {cores} usable cores; using {cores}, "
                   "without worker spinning (allow_spinning=true keeps it)",
                   ThreadClampWarning)
        intra = cores
    elif intra == 0 and cores < (os.cpu_count() or cores):
        intra = cores
    if inter > cores:
        _warn_once(("inter", inter, cores),
                   f"onnxruntime: inter_op_threads {inter} > {cores} usable cores; using {cores}",
                   ThreadClampWarning)
        inter = cores
    return intra, inter


def spinning(allow_spinning: Optional[bool], requested_intra: int, intra: int) -> Optional[bool]:
    """Whether intra-op workers spin between calls: an explicit choice wins; threads clamped
    below what the options asked (a profile made for a machine with more cores) do not spin,
    since spinning workers then take the cores the calls need (50-70 ms stalls on 2 cores with
    a 6-core profile, docs/runtime.md); else onnxruntime's default (None)."""
    if allow_spinning is None and int(requested_intra or 0) > intra:
        return False
    return allow_spinning


def session_options(intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                    graph_optimization_level: str = "all",
                    optimized_model_path: str | Path | None = None,
                    allow_spinning: Optional[bool] = None, *, clamp: bool = True):
    """ORT SessionOptions from a device profile's `onnxruntime` options.

    The monolithic baseline (``pipeline.evaluate.MonolithicSession``) builds its session with
    this same function, so both get identical options. ``allow_spinning``: None keeps ORT's
    default (intra-op worker threads spin while waiting for work); False sets
    ``session.intra_op.allow_spinning=0`` (less CPU burnt between calls on a shared machine).
    ``clamp``: thread counts go through :func:`clamp_threads` (never more than the usable cores).
    """
    import onnxruntime as ort

    if graph_optimization_level not in _LEVELS:
        raise ValueError(f"graph_optimization_level {graph_optimization_level!r}: expected one of "
                         f"{', '.join(_LEVELS)}")
    if clamp:
        requested = int(intra_op_threads or 0)
        intra_op_threads, inter_op_threads = clamp_threads(intra_op_threads, inter_op_threads)
        allow_spinning = spinning(allow_spinning, requested, intra_op_threads)
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[graph_optimization_level])
    if intra_op_threads:
        so.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if allow_spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning",
                                    "1" if allow_spinning else "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return so


def available_providers(requested: list[str] | None) -> list[str]:
    """The requested execution providers this onnxruntime build has, CPU always last."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    chosen = [p for p in (requested or []) if p in have and p != _CPU]
    return chosen + [_CPU]


def missing_providers(requested: Iterable[str] | None,
                      have: Optional[Iterable[str]] = None) -> list[str]:
    """The requested execution providers not in ``have`` (default: this onnxruntime build's)."""
    if have is None:
        import onnxruntime as ort

        have = ort.get_available_providers()
    have = set(have)
    return [p for p in (requested or []) if p not in have]


def check_options(options: dict[str, Any], file: object) -> None:
    """Refuse unknown keys and wrongly typed values (:class:`runtime.errors.ConfigError` with
    ``field="options.<key>"``; ``file``: the artifact the options are for)."""
    from runtime.errors import ConfigError

    for key, value in options.items():
        field = f"options.{key}"
        if key not in SESSION_OPTIONS:
            runner_options("onnxruntime", {key: value}, source=str(file))  # raises ConfigError
        if key in ("intra_op_threads", "inter_op_threads"):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, (int, np.integer)) or value < 0):
                raise ConfigError(file, field, f"expected an integer >= 0 (0: onnxruntime "
                                  f"chooses), got {value!r}")
        elif key == "providers":
            if value is not None and (isinstance(value, (str, bytes)) or not isinstance(
                    value, (list, tuple)) or not all(isinstance(p, str) for p in value)):
                raise ConfigError(file, field, f"expected a list of execution provider names "
                                  f"(e.g. ['CPUExecutionProvider']), got {value!r}")
        elif key == "graph_optimization_level":
            if value not in _LEVELS:
                raise ConfigError(file, field, f"expected one of {', '.join(_LEVELS)}, "
                                  f"got {value!r}")
        elif key == "allow_spinning":
            if value is not None and not isinstance(value, (bool, np.bool_)):
                raise ConfigError(file, field, f"expected true, false or null, got {value!r}")
        elif key == "provider_options" and value is not None:
            from runtime.validate import Validator

            _po.check(Validator(str(file)), value, field)


def _one_line(text: object, limit: int = 300) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


class ORTPieceRunner:
    """An InferenceSession over one piece; thread-safe (ORT sessions allow concurrent run()).

    ``model_bytes``: the piece's ONNX as bytes (what ``Bundle.read_artifact`` returned after
    checking its sha256); the session is created from them, so the bytes that run are the
    bytes that were verified. ``path`` then only names the file in messages. Without
    ``model_bytes`` the session reads ``path``.

    A file that onnxruntime cannot load (not ONNX, an invalid graph, an operator this
    onnxruntime lacks) raises :class:`runtime.errors.BundleIntegrityError` naming it. An
    option outside :data:`SESSION_OPTIONS` raises :class:`runtime.errors.ConfigError`.

    After construction: ``providers`` (what the session runs with, ``session.get_providers()``),
    ``providers_requested``, ``providers_missing`` (requested, not running: not in this
    onnxruntime build, or failed to start), ``intra_op_threads`` / ``inter_op_threads`` (what
    the session got; 0 = onnxruntime's default), ``threads_requested`` (intra, inter) as asked
    and ``session_providers`` (the ``(provider, options)`` pairs the session was given).
    ``provider_options``: per provider (:mod:`runtime.backends.provider_options`); the TensorRT
    EP's engine cache goes under the bundle's ``engines/`` (``bundle_dir``, default: the
    directory holding ``manifest.json`` above ``path``).
    """

    def __init__(self, path: str | Path, providers: list[str] | None = None,
                 intra_op_threads: int | None = None, inter_op_threads: int | None = None,
                 graph_optimization_level: str = "all", *, model_bytes: bytes | None = None,
                 allow_spinning: Optional[bool] = None,
                 provider_options: Optional[dict[str, dict[str, Any]]] = None,
                 bundle_dir: str | Path | None = None, **unknown: Any) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        check_options({"providers": providers, "intra_op_threads": intra_op_threads,
                       "inter_op_threads": inter_op_threads,
                       "graph_optimization_level": graph_optimization_level,
                       "allow_spinning": allow_spinning, "provider_options": provider_options,
                       **unknown}, self.path)
        self.threads_requested = (int(intra_op_threads or 0), int(inter_op_threads or 0))
        self.intra_op_threads, self.inter_op_threads = clamp_threads(intra_op_threads,
                                                                     inter_op_threads)
        self.allow_spinning = spinning(allow_spinning, self.threads_requested[0],
                                       self.intra_op_threads)
        so = session_options(self.intra_op_threads, self.inter_op_threads,
                             graph_optimization_level, allow_spinning=self.allow_spinning,
                             clamp=False)
        if model_bytes is None and not self.path.is_file():
            raise FileNotFoundError(f"ONNX file not found: {self.path}")
        source = model_bytes if model_bytes is not None else str(self.path)
        self.providers_requested = list(providers or [])
        have = ort.get_available_providers()
        chosen = available_providers(providers)
        root = None
        if any(ep == _po.TRT_EP for ep in chosen):
            root = Path(bundle_dir) if bundle_dir is not None else find_bundle_root(self.path)
        #: what the session was given: [(provider, options)], only providers this build has
        self.session_providers = _po.session_providers(chosen, provider_options, root, self.path)
        try:
            self.session = ort.InferenceSession(source, sess_options=so,
                                                providers=self.session_providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception classes
            if type(exc).__name__ in _NOT_THE_ARTIFACT or isinstance(exc, MemoryError):
                raise
            from runtime.errors import BundleIntegrityError

            why = f"{type(exc).__name__}: {_one_line(exc)}"
            raise BundleIntegrityError(self.path, (
                f"onnxruntime {ort.__version__} cannot load this file although its checksum "
                f"matches the manifest ({why}); rebuild the bundle, or run it with the "
                "onnxruntime version it was compiled with") if model_bytes is not None else
                f"onnxruntime {ort.__version__} cannot load this file ({why})") from None
        self.providers = list(self.session.get_providers())
        self.providers_missing = missing_providers(self.providers_requested, self.providers)
        if self.providers_missing:
            absent = [p for p in self.providers_missing if p not in have]
            failed = [p for p in self.providers_missing if p in have]
            why = "; ".join(
                ([f"{', '.join(absent)} not in this onnxruntime {ort.__version__} build "
                  f"(it has: {', '.join(have)})"] if absent else [])
                + ([f"{', '.join(failed)} could not be started (no usable device or driver)"]
                   if failed else []))
            _warn_once(("providers", tuple(self.providers_missing), tuple(self.providers)),
                       f"onnxruntime: requested execution provider(s) "
                       f"{', '.join(self.providers_missing)} unavailable: {why}; running on "
                       f"{', '.join(self.providers)}", ProviderUnavailableWarning)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # The public InferenceSession.run re-validates the feed names and handles execution
        # provider fallback on every call. With the CPU provider alone there is no fallback,
        # and the executor always feeds exactly input_names, so call the bound C++ run
        # directly (a few us per piece at batch 1). Anything else keeps the public path.
        native = getattr(self.session, "_sess", None)
        fast = getattr(native, "run", None)
        if fast is not None and self.providers == [_CPU]:
            names = self.output_names
            self.run = lambda feeds: fast(names, feeds, None)  # type: ignore[method-assign]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feeds)


# -- backend registry interface (runtime/backends/__init__.py) -----------------------------------

def open_runner(path: str | Path, options: dict[str, Any], *, input_names=None, output_names=None,
                data: Optional[bytes] = None) -> "ORTPieceRunner":
    """An ONNX Runtime session over one piece (names come from the ONNX itself)."""
    return ORTPieceRunner(path, model_bytes=data, **options)


def why_unusable(bundle: Any, target: str, artifacts: list) -> Optional[str]:
    """Nothing beyond the registry's generic checks (library, architecture) for ONNX files."""
    return None
