"""Choose which of a bundle's artifacts run on this machine, from the manifest alone.

The bundle's deployment record (manifest schema v2, written by ``pipeline compile``) says in
which order its backends are tried and what each (backend, target) needs: architecture, CPU
features, GPU, TensorRT major. This module compares that with what :mod:`runtime.host` sees and
with what each backend's runtime module says (``why_unusable``), and picks the first that fits;
the portable ONNX, run with onnxruntime, is the last resort.

    choice = select_backend(Bundle.open("b"))           # -> BackendChoice, or
                                                        #    BackendUnavailableError saying why
    for s in diagnose_backends(Bundle.open("b")): ...   # every target, usable here or why not
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from runtime.backends import ARTIFACT_BACKENDS, PORTABLE, backend_info, runtime_module
from runtime.bundle import Bundle
from runtime.errors import PipelineError
from runtime.host import has_gpu, importable, isa_flags, machine_arch, nvidia_gpus, package_versions
from runtime.manifest import DeploymentTarget, Manifest, Requirements

__all__ = ["BackendChoice", "BackendStatus", "BackendUnavailableError", "UnknownDeviceError",
           "select_backend", "diagnose_backends", "known_devices"]

#: Order tried when a bundle has no deployment record (portable bundles).
DEFAULT_BACKEND_ORDER = ("tensorrt", "onnxruntime", "tvm")


class BackendUnavailableError(PipelineError, LookupError):
    """No artifact of the bundle can run on this machine (or the requested backend cannot)."""


class UnknownDeviceError(PipelineError, ValueError):
    """``device=`` names neither the bundle's deployment profile nor a device of its latency
    tables (the message lists the known ones)."""


@dataclass(frozen=True)
class BackendChoice:
    """What :func:`select_backend` picked and why the others were skipped.

    ``backend`` is the artifact backend the executor runs ("onnx" = the portable ONNX, run
    with onnxruntime); ``library`` the Python package that executes it; ``options`` the runner
    options from the deployment record; ``skipped`` maps each backend tried before it to the
    reason it could not be used.
    """
    backend: str
    target: str
    library: str
    options: dict = field(default_factory=dict)
    device: Optional[str] = None
    order: tuple = ()
    skipped: dict = field(default_factory=dict)
    notes: tuple = ()

    def describe(self) -> str:
        what = "portable ONNX with onnxruntime" if self.backend == PORTABLE else self.backend
        text = f"{what} (target {self.target})"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{b}: {why}" for b, why in self.skipped.items())
        return text


@dataclass(frozen=True)
class BackendStatus:
    """One (backend, target) of a bundle as seen from this machine: can it run here, and if
    not, why; ``selected`` marks the one :func:`select_backend` picks by default."""
    backend: str
    target: str
    usable: bool
    reason: Optional[str] = None
    selected: bool = False

    def to_dict(self) -> dict:
        return {"backend": self.backend, "target": self.target, "usable": self.usable,
                "reason": self.reason, "selected": self.selected}


def known_devices(m: Manifest) -> list[str]:
    """Device names this bundle knows: its deployment profile, then its latency tables'."""
    names = [m.device] if m.device else []
    names += sorted({e.device for e in m.latency} - set(names))
    return names


def _requirement_gap(req: Requirements, target: str, arch: str) -> Optional[str]:
    """Why this machine does not meet ``req``, or None."""
    if req.arch and req.arch != arch:
        return f"artifacts compiled for {req.arch} (target {target}), this host is {arch}"
    if req.isa and arch == machine_arch():
        lacking = sorted(set(req.isa) - set(isa_flags()))
        if lacking:
            return (f"compiled for CPU features this host lacks: {', '.join(lacking)} "
                    f"(target {target})")
    if req.gpu and not has_gpu():
        return f"target {target} needs an NVIDIA GPU and none is visible on this machine"
    if req.gpu_compute_capability:
        gpus = nvidia_gpus()
        cc = gpus[0].get("compute_capability") if gpus else None
        if cc and cc != req.gpu_compute_capability:
            return (f"built for GPU compute capability {req.gpu_compute_capability}, "
                    f"this GPU is {cc}")
    if req.tensorrt_major:
        version = package_versions().get("tensorrt")
        if version not in (None, "unknown") and version.split(".")[0] != str(req.tensorrt_major):
            return f"plans for TensorRT {req.tensorrt_major}.x, this machine has TensorRT {version}"
    return None


def _record(m: Manifest, backend: str, target: str) -> DeploymentTarget:
    found = m.deployment.target(backend, target) if m.deployment is not None else None
    return found or DeploymentTarget(backend=backend, target=target)


def _pieces_used(m: Manifest) -> list[str]:
    return sorted({pid for segs in m.execution.values() for seg in segs for pid in seg})


def why_unusable(bundle: Bundle, backend: str, target: str, *,
                 arch: Optional[str] = None) -> Optional[str]:
    """Why (backend, target) of ``bundle`` cannot run here, or None."""
    info = backend_info(backend)
    if not importable(info.library):
        why = f"the {info.library} Python package is not importable on this machine"
        if backend == "tensorrt":
            why += (" (install TensorRT; engines are then built on the device with "
                    f"`pipeline engines --bundle {bundle.root}`)")
        return why
    if not importable(info.runtime_module):
        return f"this runtime has no {info.name} runner ({info.runtime_module} is not installed)"
    m = bundle.manifest
    gap = _requirement_gap(_record(m, backend, target).requires, target, arch or machine_arch())
    if gap is not None:
        return gap
    artifacts = [(pid, m.piece(pid).find_artifacts(backend, target)[0]) for pid in _pieces_used(m)]
    return runtime_module(backend).why_unusable(bundle, target, artifacts)


def _order(m: Manifest, backend: Optional[str]) -> list[str]:
    if backend is not None:
        if backend not in ARTIFACT_BACKENDS:
            raise BackendUnavailableError(
                f"unknown backend {backend!r}; known: {', '.join(ARTIFACT_BACKENDS[1:])}, "
                f"{PORTABLE} (the portable ONNX, run with onnxruntime)")
        return [backend] + ([PORTABLE] if backend == "onnxruntime" else [])
    if m.deployment is not None:
        return list(dict.fromkeys([*m.deployment.backend_order, PORTABLE]))
    return [PORTABLE] if m.device is None else [*DEFAULT_BACKEND_ORDER, PORTABLE]


def _check_device(m: Manifest, device: Optional[str]) -> Optional[str]:
    if device is None or device == m.device:
        return m.device
    known = known_devices(m)
    if device not in known:
        raise UnknownDeviceError(f"unknown device {device!r} for this bundle; it knows: "
                                 f"{', '.join(known) or 'none (a portable bundle)'}")
    return device


def select_backend(bundle: Bundle, backend: Optional[str] = None, device: Optional[str] = None,
                   *, arch: Optional[str] = None) -> BackendChoice:
    """Pick the artifacts to run on this machine.

    ``backend=None``: walk the deployment record's backend order, skipping backends whose
    artifacts are missing, whose library is not importable, or whose requirements this machine
    does not meet; the portable ONNX is the last resort. ``backend`` given: only that one
    ("onnxruntime" also accepts the portable ONNX); raises :class:`BackendUnavailableError`
    saying why if it cannot run. ``device``: whose latency table to use (the bundle's profile
    or a device of its latency tables; else :class:`UnknownDeviceError`). Nothing is
    imported or executed here: libraries are looked up with ``importlib.util.find_spec``.
    """
    m = bundle.manifest
    arch = arch or machine_arch()
    dev = _check_device(m, device)
    notes = [] if m.deployment is not None or m.device is None else [
        f"bundle for {m.device!r} has no deployment record; using the default backend order"]
    order = _order(m, backend)
    available: dict[str, list[str]] = {}
    for b, t in m.available_targets():
        available.setdefault(b, []).append(t)
    skipped: dict[str, str] = {}
    for b in order:
        targets = available.get(b, [])
        if not targets:
            skipped[b] = (f"no {b} artifacts in the bundle" if b != PORTABLE
                          else "no portable ONNX artifacts covering every piece")
            continue
        reasons = []
        for t in targets:
            why = why_unusable(bundle, b, t, arch=arch)
            if why is None:
                return BackendChoice(backend=b, target=t, library=backend_info(b).library,
                                     options=_record(m, b, t).runner_options, device=dev,
                                     order=tuple(order), skipped=dict(skipped),
                                     notes=tuple(notes))
            reasons.append(why if len(targets) == 1 else f"{t}: {why}")
        skipped[b] = "; ".join(reasons)
    detail = "; ".join(f"{b}: {why}" for b, why in skipped.items()) or "no artifacts"
    what = f"backend {backend!r}" if backend else "any backend"
    raise BackendUnavailableError(f"{bundle.manifest_path}: cannot run {what} on this "
                                  f"{arch} machine ({detail})")


def diagnose_backends(bundle: Bundle, device: Optional[str] = None, *,
                      arch: Optional[str] = None) -> list[BackendStatus]:
    """Every (backend, target) the bundle ships, in the order they are tried, each with
    whether this machine can run it and why not."""
    m = bundle.manifest
    try:
        chosen = select_backend(bundle, device=device, arch=arch)
        pick: Optional[tuple[str, str]] = (chosen.backend, chosen.target)
    except BackendUnavailableError:
        pick = None
    rank = {b: i for i, b in enumerate(_order(m, None))}
    pairs = sorted(m.available_targets(), key=lambda bt: (rank.get(bt[0], len(rank)), bt))
    out = []
    for b, t in pairs:
        why = why_unusable(bundle, b, t, arch=arch)
        out.append(BackendStatus(b, t, why is None, why, (b, t) == pick))
    return out
