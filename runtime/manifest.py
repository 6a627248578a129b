"""Bundle manifest: schema (dataclasses), strict validation, JSON (de)serialisation.

The manifest (``manifest.json`` at the root of a bundle directory) is the contract between
``export/`` (writes it) and ``runtime/`` (reads it). See docs/bundle.md for the schema
field by field and the versioning policy. Stdlib only.

Reading::

    m = load_manifest("bundle/manifest.json")        # -> Manifest, or ManifestError
    m = Manifest.from_dict(d, source="manifest.json") # every field validated

Every validation error names the file and the JSON path, e.g.
``manifest.json: pieces[2].artifacts[0].sha256: expected 64 hex chars, got 'abc'``.

Building (export/)::

    m = new_manifest(model_name="resnet20-ee", family="resnet", num_classes=10,
                     params=272474, input_shape=[3, 32, 32],
                     mean=[0.4914, 0.4822, 0.4465], std=[0.247, 0.243, 0.261],
                     stages=3, tool_version="0.1.0")
    m.add_piece(Piece(id="stage0.full", kind="stage", stage=0, skip=False,
                      returns_logits=True,
                      inputs=[TensorSpec("x", ["N", 3, 32, 32])],
                      outputs=[TensorSpec("features", ["N", 16, 32, 32]),
                               TensorSpec("logits", ["N", 10])],
                      macs=1_000_000, params=10_000))
    m.add_artifact_file(bundle_dir, "stage0.full", "onnx/stage0.full.onnx",
                        backend="onnx", target="portable")   # computes sha256/size
    ...
    m.set_execution("FFF", [["stage0.full"], ["stage1.full"], ["stage2.full"]])
    save_manifest(m, bundle_dir / "manifest.json")   # validates, then writes atomically

Unknown keys are an ERROR at every level (a typo must not be silently ignored); free-form
data for tools goes in ``annotations`` (top level), ``Artifact.options``,
``Stopping.params``, ``LatencyEntry.fingerprint`` or ``Source.metrics``.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, NoReturn, Optional, Union

from .atomic import atomic_write_json
from .errors import ManifestError, UnsafePathError

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "BACKENDS",
    "RUNTIME_BACKENDS",
    "PIECE_KINDS",
    "TENSOR_DTYPES",
    "LATENCY_KINDS",
    "ModelInfo",
    "RawInputSpec",
    "InputSpec",
    "ExitInfo",
    "TensorSpec",
    "Artifact",
    "Piece",
    "Stopping",
    "LatencyEntry",
    "Source",
    "Manifest",
    "new_manifest",
    "all_skip_configs",
    "load_manifest",
    "save_manifest",
    "sha256_file",
    "check_relpath",
    "utc_now_iso",
]

#: Current manifest schema version. Readers accept 1..SCHEMA_VERSION; newer is refused.
SCHEMA_VERSION = 1
#: File name of the manifest at the root of a bundle directory.
MANIFEST_NAME = "manifest.json"
#: Artifact backends. "onnx" is the portable ONNX file, the others are compiled/runtime forms.
BACKENDS = ("onnx", "onnxruntime", "tvm", "tensorrt")
#: Backends a latency can be measured/estimated for (something that executes).
RUNTIME_BACKENDS = ("onnxruntime", "tvm", "tensorrt")
PIECE_KINDS = ("stage", "mandatory", "skippable", "head", "segment")
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")
INPUT_DTYPES = ("float32", "float16")
INPUT_LAYOUTS = ("NCHW",)
RAW_DTYPES = ("uint8",)
RAW_LAYOUTS = ("HWC",)
LATENCY_KINDS = ("measured", "estimated")
#: Output name a piece with returns_logits=True must have.
LOGITS = "logits"
#: Symbolic dimension allowed in tensor shapes (the dynamic batch dim); -1 means the same.
DYNAMIC_DIM = "N"
MAX_STAGES = 16
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_MAX_JSON_DEPTH = 32
_MAX_STR = 4096

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED_FILES = {MANIFEST_NAME}

DEFAULT_RAW_NOTE = (
    "raw input: uint8 HWC image with the model's H and W, values 0..255; the runtime "
    "computes x = (raw / 255 - mean) / std per channel and transposes to CHW "
    "(resizing/cropping is the caller's job)"
)

JSONValue = Union[None, bool, int, float, str, list, dict]
Dim = Union[int, str]


# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------

def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with offset, seconds precision: '2025-01-31T12:00:00+00:00'."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def all_skip_configs(stages: int) -> list[str]:
    """All 2**stages skip configs in canonical order: 'FF..F', 'FF..T', ..., 'TT..T'."""
    if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= MAX_STAGES:
        raise ValueError(f"stages must be an int in 1..{MAX_STAGES}, got {stages!r}")
    return ["".join(c) for c in itertools.product("FT", repeat=stages)]


def sha256_file(path: os.PathLike | str, *, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's contents, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk_size)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def check_relpath(rel: object) -> Optional[str]:
    """Why ``rel`` is not a safe bundle-relative file path, or ``None`` if it is.

    Safe: a non-empty str, '/'-separated, relative, no '', '.' or '..' components, no
    backslash, colon, NUL or control character, not the manifest itself, at most 1024 chars.
    """
    if not isinstance(rel, str):
        return f"expected a relative path string, got {_tname(rel)}"
    if not rel:
        return "empty path"
    if len(rel) > 1024:
        return "path longer than 1024 chars"
    if rel.startswith("/") or rel.startswith("\\") or re.match(r"[A-Za-z]:", rel):
        return f"absolute path {rel!r} escapes the bundle"
    if "\\" in rel:
        return f"backslash in path {rel!r} (use '/')"
    if ":" in rel:
        return f"':' in path {rel!r} is not portable"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return f"control character in path {rel!r}"
    parts = rel.split("/")
    if ".." in parts:
        return f"'..' in path {rel!r} escapes the bundle"
    if any(p in ("", ".") for p in parts):
        return f"empty or '.' component in path {rel!r}"
    if rel in _RESERVED_FILES:
        return f"{rel!r} is reserved for the manifest"
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "path is not valid UTF-8"
    return None


def _tname(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _short(v: object, n: int = 60) -> str:
    try:
        r = repr(v)
    except Exception:  # pragma: no cover - exotic objects
        r = f"<{type(v).__name__}>"
    return r if len(r) <= n else r[: n - 3] + "..."


def _key(parent: str, key: object) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    k = str(key)
    if _IDENT_RE.fullmatch(k):
        return f"{parent}.{k}" if parent else k
    return f"{parent}[{json.dumps(k, ensure_ascii=True)}]"


class _V:
    """Validation context: raises ManifestError(source, json_path, reason)."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, path: str, reason: str) -> NoReturn:
        raise ManifestError(self.source, path, reason)

    def obj(self, v: object, path: str, required: Iterable[str],
            optional: Iterable[str] = ()) -> dict:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {_tname(v)}")
        required = tuple(required)
        allowed = set(required) | set(optional)
        for k in v:
            if not isinstance(k, str):
                self.fail(path, f"object key {_short(k)} is not a string")
            if k not in allowed:
                self.fail(_key(path, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in required:
            if k not in v:
                self.fail(_key(path, k), "missing required field")
        return v

    def str_(self, v: object, path: str, *, pattern: Optional[re.Pattern] = None,
             what: str = "", allow_empty: bool = False, max_len: int = _MAX_STR) -> str:
        if not isinstance(v, str):
            self.fail(path, f"expected a string, got {_tname(v)}")
        if not v and not allow_empty:
            self.fail(path, "must not be empty")
        if len(v) > max_len:
            self.fail(path, f"string longer than {max_len} chars")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(path, "string is not valid UTF-8 (lone surrogate)")
        if pattern is not None and not pattern.fullmatch(v):
            self.fail(path, f"expected {what or 'pattern ' + pattern.pattern}, got {_short(v)}")
        return v

    def opt_str(self, v: object, path: str, **kw) -> Optional[str]:
        return None if v is None else self.str_(v, path, **kw)

    def enum(self, v: object, path: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        if not isinstance(v, str) or v not in choices:
            self.fail(path, f"expected one of {', '.join(repr(c) for c in choices)}, "
                            f"got {_short(v)}")
        return v

    def int_(self, v: object, path: str, *, lo: Optional[int] = None,
             hi: Optional[int] = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(path, f"expected an integer, got {_tname(v)}")
        if lo is not None and v < lo:
            self.fail(path, f"expected an integer >= {lo}, got {_short(v)}")
        if hi is not None and v > hi:
            self.fail(path, f"expected an integer <= {hi}, got {_short(v)}")
        return int(v)

    def num(self, v: object, path: str, *, lo: Optional[float] = None,
            hi: Optional[float] = None, lo_open: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(path, f"expected a number, got {_tname(v)}")
        try:
            f = float(v)
        except OverflowError:
            self.fail(path, "number out of range")
        if not math.isfinite(f):
            self.fail(path, f"expected a finite number, got {_short(v)}")
        if lo is not None and (f <= lo if lo_open else f < lo):
            self.fail(path, f"expected a number {'>' if lo_open else '>='} {lo}, got {_short(v)}")
        if hi is not None and f > hi:
            self.fail(path, f"expected a number <= {hi}, got {_short(v)}")
        return f

    def opt_num(self, v: object, path: str, **kw) -> Optional[float]:
        return None if v is None else self.num(v, path, **kw)

    def bool_(self, v: object, path: str) -> bool:
        if not isinstance(v, bool):
            self.fail(path, f"expected true or false, got {_tname(v)}")
        return v

    def list_(self, v: object, path: str, *, min_len: int = 0,
              max_len: Optional[int] = None) -> list:
        if not isinstance(v, list):
            self.fail(path, f"expected an array, got {_tname(v)}")
        if len(v) < min_len:
            self.fail(path, f"expected at least {min_len} item(s), got {len(v)}")
        if max_len is not None and len(v) > max_len:
            self.fail(path, f"expected at most {max_len} item(s), got {len(v)}")
        return v

    def json_value(self, v: object, path: str, _depth: int = 0) -> JSONValue:
        """Validate a free-form JSON value and return a deep copy."""
        if _depth > _MAX_JSON_DEPTH:
            self.fail(path, f"nested deeper than {_MAX_JSON_DEPTH} levels")
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                self.fail(path, "NaN/Infinity are not valid JSON")
            return float(v)
        if isinstance(v, str):
            return self.str_(v, path, allow_empty=True, max_len=1 << 20)
        if isinstance(v, list):
            return [self.json_value(x, _key(path, i), _depth + 1) for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    self.fail(path, f"object key {_short(k)} is not a string")
                self.str_(k, path, allow_empty=True)
                out[k] = self.json_value(x, _key(path, k), _depth + 1)
            return out
        self.fail(path, f"not a JSON value: {_tname(v)}")

    def json_obj(self, v: object, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {_tname(v)}")
        return self.json_value(v, path)  # type: ignore[return-value]

    def timestamp(self, v: object, path: str) -> str:
        s = self.str_(v, path, max_len=64)
        try:
            t = _dt.datetime.fromisoformat(s)
        except (ValueError, TypeError, OverflowError):
            self.fail(path, f"expected an ISO 8601 time like '2025-01-31T12:00:00+00:00', "
                            f"got {_short(s)}")
        if t.tzinfo is None or t.utcoffset() is None:
            self.fail(path, f"ISO time must carry a timezone offset (e.g. +00:00), got {_short(s)}")
        return s

    def opt_timestamp(self, v: object, path: str) -> Optional[str]:
        return None if v is None else self.timestamp(v, path)

    def sha256(self, v: object, path: str) -> str:
        if not isinstance(v, str) or not _HEX64_RE.fullmatch(v):
            self.fail(path, f"expected 64 hex chars (lowercase sha256), got {_short(v)}")
        return v

    def ident(self, v: object, path: str, what: str = "an id") -> str:
        return self.str_(v, path, pattern=_ID_RE,
                         what=f"{what} ([A-Za-z0-9][A-Za-z0-9_.+-]*, <= 128 chars)")


# ----------------------------------------------------------------------------------------
# dataclasses
# ----------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ModelInfo:
    name: str
    family: str
    num_classes: int
    params: int

    def to_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "num_classes": self.num_classes,
                "params": self.params}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "ModelInfo":
        d = v.obj(d, p, ("name", "family", "num_classes", "params"))
        return cls(name=v.str_(d["name"], _key(p, "name"), max_len=256),
                   family=v.str_(d["family"], _key(p, "family"), max_len=256),
                   num_classes=v.int_(d["num_classes"], _key(p, "num_classes"), lo=1),
                   params=v.int_(d["params"], _key(p, "params"), lo=0))


@dataclass(kw_only=True)
class RawInputSpec:
    """What the runtime accepts as *raw* input before normalisation (documentation + check)."""
    dtype: str = "uint8"
    layout: str = "HWC"
    note: str = DEFAULT_RAW_NOTE

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "layout": self.layout, "note": self.note}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "RawInputSpec":
        d = v.obj(d, p, ("dtype", "layout"), ("note",))
        return cls(dtype=v.enum(d["dtype"], _key(p, "dtype"), RAW_DTYPES),
                   layout=v.enum(d["layout"], _key(p, "layout"), RAW_LAYOUTS),
                   note=v.str_(d.get("note", ""), _key(p, "note"), allow_empty=True))


@dataclass(kw_only=True)
class InputSpec:
    """Per-sample model input: shape [C, H, W]; mean/std per channel in [0,1] pixel units.

    ``name`` is the tensor name the first piece of every plan reads the (normalised,
    batched NCHW) input from."""
    shape: list[int]
    mean: list[float]
    std: list[float]
    name: str = "x"
    dtype: str = "float32"
    layout: str = "NCHW"
    raw: RawInputSpec = field(default_factory=RawInputSpec)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "layout": self.layout,
                "mean": [float(x) for x in self.mean], "std": [float(x) for x in self.std],
                "raw": self.raw.to_dict()}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "InputSpec":
        d = v.obj(d, p, ("name", "shape", "dtype", "layout", "mean", "std", "raw"))
        ps = _key(p, "shape")
        shape = [v.int_(x, _key(ps, i), lo=1, hi=1 << 20)
                 for i, x in enumerate(v.list_(d["shape"], ps, min_len=3, max_len=3))]
        c = shape[0]
        pm, pd = _key(p, "mean"), _key(p, "std")
        mean = [v.num(x, _key(pm, i), lo=0.0, hi=1.0) for i, x in enumerate(v.list_(d["mean"], pm))]
        std = [v.num(x, _key(pd, i), lo=0.0, lo_open=True, hi=1.0)
               for i, x in enumerate(v.list_(d["std"], pd))]
        if len(mean) != c:
            v.fail(pm, f"expected {c} values (one per channel, shape[0]), got {len(mean)}")
        if len(std) != c:
            v.fail(pd, f"expected {c} values (one per channel, shape[0]), got {len(std)}")
        return cls(name=v.str_(d["name"], _key(p, "name"), max_len=256),
                   shape=shape, mean=mean, std=std,
                   dtype=v.enum(d["dtype"], _key(p, "dtype"), INPUT_DTYPES),
                   layout=v.enum(d["layout"], _key(p, "layout"), INPUT_LAYOUTS),
                   raw=RawInputSpec._parse(v, d["raw"], _key(p, "raw")))


@dataclass(kw_only=True)
class ExitInfo:
    """Exit ``index`` follows stage ``stage`` (always equal in schema v1)."""
    index: int
    stage: int

    def to_dict(self) -> dict:
        return {"index": self.index, "stage": self.stage}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "ExitInfo":
        d = v.obj(d, p, ("index", "stage"))
        return cls(index=v.int_(d["index"], _key(p, "index"), lo=0),
                   stage=v.int_(d["stage"], _key(p, "stage"), lo=0))


@dataclass
class TensorSpec:
    """A graph input/output. ``shape`` items are ints >= 1, or "N"/-1 for the dynamic batch dim."""
    name: str
    shape: list[Dim]
    dtype: str = "float32"

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, s in enumerate(self.shape) if s == DYNAMIC_DIM or s == -1]

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "TensorSpec":
        d = v.obj(d, p, ("name", "shape", "dtype"))
        ps = _key(p, "shape")
        shape: list[Dim] = []
        for i, x in enumerate(v.list_(d["shape"], ps, max_len=16)):
            if x == DYNAMIC_DIM and isinstance(x, str):
                shape.append(x)
            elif isinstance(x, int) and not isinstance(x, bool) and (x == -1 or 1 <= x <= 1 << 31):
                shape.append(int(x))
            else:
                v.fail(_key(ps, i), f"expected an integer >= 1, or \"N\" or -1 for the "
                                     f"dynamic batch dim, got {_short(x)}")
        return cls(name=v.str_(d["name"], _key(p, "name"), max_len=256), shape=shape,
                   dtype=v.enum(d["dtype"], _key(p, "dtype"), TENSOR_DTYPES))


@dataclass(kw_only=True)
class Artifact:
    """One compiled/exported form of a piece: a file inside the bundle, for a backend/target."""
    backend: str
    target: str
    file: str
    sha256: str
    size_bytes: int
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "target": self.target, "file": self.file,
                "sha256": self.sha256, "size_bytes": self.size_bytes,
                "options": copy.deepcopy(self.options)}

    @classmethod
    def from_file(cls, bundle_root: os.PathLike | str, file: str, *, backend: str,
                  target: str, options: Optional[dict] = None) -> "Artifact":
        """Describe ``bundle_root/file`` (must exist), computing its sha256 and size."""
        why = check_relpath(file)
        if why:
            raise UnsafePathError(os.path.join(os.fspath(bundle_root), str(file)), why,
                                  relpath=str(file), bundle=bundle_root)
        full = Path(bundle_root) / file
        return cls(backend=backend, target=target, file=file, sha256=sha256_file(full),
                   size_bytes=full.stat().st_size, options=dict(options or {}))

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "Artifact":
        d = v.obj(d, p, ("backend", "target", "file", "sha256", "size_bytes"), ("options",))
        pf = _key(p, "file")
        why = check_relpath(d["file"])
        if why:
            raise UnsafePathError(v.source, why, json_path=pf,
                                  relpath=d["file"] if isinstance(d["file"], str) else None)
        return cls(backend=v.enum(d["backend"], _key(p, "backend"), BACKENDS),
                   target=v.ident(d["target"], _key(p, "target"), "a target name"),
                   file=d["file"],
                   sha256=v.sha256(d["sha256"], _key(p, "sha256")),
                   size_bytes=v.int_(d["size_bytes"], _key(p, "size_bytes"), lo=0),
                   options=v.json_obj(d.get("options", {}), _key(p, "options")))


@dataclass(kw_only=True)
class Piece:
    """An exported graph piece. See docs/bundle.md for the kinds and how pieces chain."""
    id: str
    kind: str
    stage: int
    skip: Optional[bool]
    returns_logits: bool
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    macs: int
    params: int
    artifacts: list[Artifact] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"id": self.id, "kind": self.kind, "stage": self.stage, "skip": self.skip,
                "returns_logits": self.returns_logits,
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "macs": self.macs, "params": self.params,
                "artifacts": [a.to_dict() for a in self.artifacts]}

    def find_artifacts(self, backend: str, target: Optional[str] = None) -> list[Artifact]:
        return [a for a in self.artifacts
                if a.backend == backend and (target is None or a.target == target)]

    def add_artifact(self, artifact: Artifact, *, replace: bool = False) -> Artifact:
        """Attach ``artifact``; (backend, target) must be new unless ``replace``."""
        for i, a in enumerate(self.artifacts):
            if a.backend == artifact.backend and a.target == artifact.target:
                if not replace:
                    raise ValueError(f"piece {self.id!r} already has an artifact for "
                                     f"({artifact.backend!r}, {artifact.target!r})")
                self.artifacts[i] = artifact
                return artifact
        self.artifacts.append(artifact)
        return artifact

    @classmethod
    def _parse(cls, v: _V, d: object, p: str, stages: int) -> "Piece":
        d = v.obj(d, p, ("id", "kind", "stage", "skip", "returns_logits", "inputs", "outputs",
                         "macs", "params", "artifacts"))
        pid = v.ident(d["id"], _key(p, "id"), "a piece id")
        kind = v.enum(d["kind"], _key(p, "kind"), PIECE_KINDS)
        stage = v.int_(d["stage"], _key(p, "stage"), lo=0, hi=stages - 1)
        skip = None if d["skip"] is None else v.bool_(d["skip"], _key(p, "skip"))
        rl = v.bool_(d["returns_logits"], _key(p, "returns_logits"))
        if kind == "head" and not rl:
            v.fail(_key(p, "returns_logits"), "a 'head' piece must return logits")
        if kind == "stage" and skip is None:
            v.fail(_key(p, "skip"), "a 'stage' piece runs one stage variant: skip must be "
                                   "true or false")
        if kind == "skippable" and skip is True:
            v.fail(_key(p, "skip"), "a 'skippable' piece is the sub-path that is skipped; it "
                                   "cannot itself be a skip=true variant")
        tensors = {}
        for key in ("inputs", "outputs"):
            pk = _key(p, key)
            lst = [TensorSpec._parse(v, t, _key(pk, i))
                   for i, t in enumerate(v.list_(d[key], pk, min_len=1, max_len=64))]
            seen = set()
            for i, t in enumerate(lst):
                if t.name in seen:
                    v.fail(_key(_key(pk, i), "name"), f"duplicate tensor name {t.name!r}")
                seen.add(t.name)
            tensors[key] = lst
        if rl and not any(t.name == LOGITS for t in tensors["outputs"]):
            v.fail(_key(p, "outputs"), f"returns_logits is true but no output is named "
                                       f"{LOGITS!r}")
        pa = _key(p, "artifacts")
        arts = [Artifact._parse(v, a, _key(pa, i))
                for i, a in enumerate(v.list_(d["artifacts"], pa))]
        seen_bt = set()
        for i, a in enumerate(arts):
            if (a.backend, a.target) in seen_bt:
                v.fail(_key(pa, i), f"duplicate artifact for backend {a.backend!r} target "
                                    f"{a.target!r}")
            seen_bt.add((a.backend, a.target))
        return cls(id=pid, kind=kind, stage=stage, skip=skip, returns_logits=rl,
                   inputs=tensors["inputs"], outputs=tensors["outputs"],
                   macs=v.int_(d["macs"], _key(p, "macs"), lo=0),
                   params=v.int_(d["params"], _key(p, "params"), lo=0), artifacts=arts)


@dataclass(kw_only=True)
class Stopping:
    """Stopping rule chosen by calibration. All-empty (rule=None) before calibration."""
    rule: Optional[str] = None
    params: dict = field(default_factory=dict)
    val_accuracy: Optional[float] = None
    mean_latency_ms: Optional[float] = None
    created: Optional[str] = None

    def to_dict(self) -> dict:
        return {"rule": self.rule, "params": copy.deepcopy(self.params),
                "val_accuracy": self.val_accuracy, "mean_latency_ms": self.mean_latency_ms,
                "created": self.created}

    @property
    def calibrated(self) -> bool:
        return self.rule is not None

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "Stopping":
        if d is None:
            return cls()
        d = v.obj(d, p, ("rule",), ("params", "val_accuracy", "mean_latency_ms", "created"))
        rule = None if d["rule"] is None else v.ident(d["rule"], _key(p, "rule"), "a rule name")
        s = cls(rule=rule,
                params=v.json_obj(d.get("params", {}), _key(p, "params")),
                val_accuracy=v.opt_num(d.get("val_accuracy"), _key(p, "val_accuracy"),
                                       lo=0.0, hi=1.0),
                mean_latency_ms=v.opt_num(d.get("mean_latency_ms"), _key(p, "mean_latency_ms"),
                                          lo=0.0),
                created=v.opt_timestamp(d.get("created"), _key(p, "created")))
        if rule is None:
            for k in ("params", "val_accuracy", "mean_latency_ms", "created"):
                if getattr(s, k) not in (None, {}):
                    v.fail(_key(p, k), "must be empty/null while stopping.rule is null")
        return s


@dataclass(kw_only=True)
class LatencyEntry:
    """One latency row: for a single ``piece`` OR the cumulative time to reach ``exit`` under
    ``skip_config``, on ``device`` (profile name) with ``backend``/``target`` at ``batch``."""
    device: str
    backend: str
    target: str
    batch: int
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    kind: str
    created: str
    piece: Optional[str] = None
    exit: Optional[int] = None
    skip_config: Optional[str] = None
    fingerprint: Optional[dict] = None

    @property
    def group(self) -> tuple[str, str, int]:
        """(device, backend, batch): the unit that is measured or estimated as a whole."""
        return (self.device, self.backend, self.batch)

    @property
    def key(self) -> tuple:
        return (self.device, self.backend, self.target, self.batch, self.piece, self.exit,
                self.skip_config)

    def to_dict(self) -> dict:
        return {"device": self.device, "backend": self.backend, "target": self.target,
                "batch": self.batch, "piece": self.piece, "exit": self.exit,
                "skip_config": self.skip_config, "p50_ms": self.p50_ms, "p90_ms": self.p90_ms,
                "p95_ms": self.p95_ms, "p99_ms": self.p99_ms, "mean_ms": self.mean_ms,
                "kind": self.kind, "fingerprint": copy.deepcopy(self.fingerprint),
                "created": self.created}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "LatencyEntry":
        d = v.obj(d, p, ("device", "backend", "target", "batch", "p50_ms", "p90_ms", "p95_ms",
                         "p99_ms", "mean_ms", "kind", "created"),
                  ("piece", "exit", "skip_config", "fingerprint"))
        q = {k: v.num(d[k], _key(p, k), lo=0.0)
             for k in ("p50_ms", "p90_ms", "p95_ms", "p99_ms", "mean_ms")}
        for a, b in (("p50_ms", "p90_ms"), ("p90_ms", "p95_ms"), ("p95_ms", "p99_ms")):
            if q[a] > q[b] * (1 + 1e-9) + 1e-12:
                v.fail(_key(p, b), f"percentiles must be non-decreasing: {a}={q[a]} > {b}={q[b]}")
        kind = v.enum(d["kind"], _key(p, "kind"), LATENCY_KINDS)
        fp = d.get("fingerprint")
        if fp is None:
            if kind == "measured":
                v.fail(_key(p, "fingerprint"), "a measured entry needs a fingerprint object "
                                               "(what it was measured on)")
            fingerprint = None
        else:
            fingerprint = v.json_obj(fp, _key(p, "fingerprint"))
            if kind == "measured" and not fingerprint:
                v.fail(_key(p, "fingerprint"), "a measured entry needs a non-empty fingerprint")
        piece = d.get("piece")
        ex = d.get("exit")
        sc = d.get("skip_config")
        if piece is not None:
            piece = v.ident(piece, _key(p, "piece"), "a piece id")
            if ex is not None or sc is not None:
                v.fail(p, "give either 'piece' or ('exit' and 'skip_config'), not both")
        else:
            if ex is None or sc is None:
                v.fail(p, "give either 'piece' or both 'exit' and 'skip_config'")
            ex = v.int_(ex, _key(p, "exit"), lo=0)
            sc = v.str_(sc, _key(p, "skip_config"), max_len=MAX_STAGES)
        return cls(device=v.ident(d["device"], _key(p, "device"), "a device profile name"),
                   backend=v.enum(d["backend"], _key(p, "backend"), RUNTIME_BACKENDS),
                   target=v.ident(d["target"], _key(p, "target"), "a target name"),
                   batch=v.int_(d["batch"], _key(p, "batch"), lo=1, hi=1 << 20),
                   kind=kind, created=v.timestamp(d["created"], _key(p, "created")),
                   piece=piece, exit=ex, skip_config=sc, fingerprint=fingerprint, **q)


@dataclass(kw_only=True)
class Source:
    """Where the weights came from: checkpoint sha256 and a training-metrics summary."""
    checkpoint_sha256: Optional[str] = None
    checkpoint: Optional[str] = None
    metrics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"checkpoint_sha256": self.checkpoint_sha256, "checkpoint": self.checkpoint,
                "metrics": copy.deepcopy(self.metrics)}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "Source":
        d = v.obj(d, p, (), ("checkpoint_sha256", "checkpoint", "metrics"))
        cs = d.get("checkpoint_sha256")
        return cls(checkpoint_sha256=None if cs is None
                   else v.sha256(cs, _key(p, "checkpoint_sha256")),
                   checkpoint=v.opt_str(d.get("checkpoint"), _key(p, "checkpoint")),
                   metrics=v.json_obj(d.get("metrics", {}), _key(p, "metrics")))


_TOP_REQUIRED = ("schema_version", "model", "input", "class_names", "stages", "skip_configs",
                 "exits", "pieces", "execution", "stopping", "latency", "device", "created",
                 "tool_version", "source")
_TOP_OPTIONAL = ("annotations",)


@dataclass(kw_only=True)
class Manifest:
    """The whole manifest. Build with :func:`new_manifest`, read with :func:`load_manifest`.

    Mutable on purpose (export/ fills it incrementally); :meth:`validate` checks it,
    :func:`save_manifest` validates before writing.
    """
    model: ModelInfo
    input: InputSpec
    class_names: list[str]
    stages: int
    skip_configs: list[str]
    exits: list[ExitInfo]
    pieces: list[Piece]
    execution: dict[str, list[list[str]]]
    tool_version: str
    created: str
    stopping: Stopping = field(default_factory=Stopping)
    latency: list[LatencyEntry] = field(default_factory=list)
    device: Optional[str] = None
    source: Source = field(default_factory=Source)
    annotations: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # -- (de)serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain JSON-able dict (deep copy), keys in schema order."""
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "input": self.input.to_dict(),
            "class_names": list(self.class_names),
            "stages": self.stages,
            "skip_configs": list(self.skip_configs),
            "exits": [e.to_dict() for e in self.exits],
            "pieces": [p.to_dict() for p in self.pieces],
            "execution": {k: [list(seg) for seg in segs] for k, segs in self.execution.items()},
            "stopping": self.stopping.to_dict(),
            "latency": [e.to_dict() for e in self.latency],
            "device": self.device,
            "created": self.created,
            "tool_version": self.tool_version,
            "source": self.source.to_dict(),
            "annotations": copy.deepcopy(self.annotations),
        }

    def to_json(self, *, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = MANIFEST_NAME) -> "Manifest":
        return cls.from_dict(_loads(text, source), source=source)

    @classmethod
    def from_dict(cls, d: object, *, source: str = MANIFEST_NAME) -> "Manifest":
        """Validate every field of ``d`` and build a Manifest (deep copy; ``d`` is not kept).

        Raises :class:`ManifestError` (only) naming ``source`` and the JSON path.
        """
        try:
            return _parse_manifest(_V(os.fspath(source) if not isinstance(source, str)
                                      else source), d)
        except RecursionError:
            raise ManifestError(source, "", "structure nested too deeply") from None

    def validate(self, *, source: str = MANIFEST_NAME) -> None:
        """Raise :class:`ManifestError` if this (possibly hand-built) manifest is invalid."""
        try:
            d = self.to_dict()
        except (TypeError, AttributeError, ValueError) as e:
            raise ManifestError(source, "", f"malformed Manifest object: {e}") from e
        Manifest.from_dict(d, source=source)

    def copy(self) -> "Manifest":
        """Independent deep copy."""
        return copy.deepcopy(self)

    # -- queries ----------------------------------------------------------------------------

    def piece(self, piece_id: str) -> Piece:
        """The piece with this id (KeyError if none)."""
        for p in self.pieces:
            if p.id == piece_id:
                return p
        raise KeyError(f"no piece {piece_id!r} in manifest (pieces: "
                       f"{', '.join(p.id for p in self.pieces) or 'none'})")

    def segments(self, skip_config: str) -> list[list[Piece]]:
        """Pieces to run, per exit segment, under ``skip_config``."""
        if skip_config not in self.execution:
            raise KeyError(f"no execution plan for skip config {skip_config!r} "
                           f"(available: {', '.join(self.execution) or 'none'})")
        return [[self.piece(pid) for pid in seg] for seg in self.execution[skip_config]]

    def cumulative_macs(self, skip_config: str, exit: int) -> int:
        """Batch-1 MACs to reach (and evaluate) exit ``exit`` under ``skip_config``."""
        segs = self.segments(skip_config)
        if not 0 <= exit < len(segs):
            raise IndexError(f"exit {exit} out of range 0..{len(segs) - 1}")
        return sum(p.macs for seg in segs[: exit + 1] for p in seg)

    def artifact_files(self) -> list[Artifact]:
        """All artifacts, one per distinct file (first occurrence)."""
        seen: dict[str, Artifact] = {}
        for p in self.pieces:
            for a in p.artifacts:
                seen.setdefault(a.file, a)
        return list(seen.values())

    def available_targets(self) -> list[tuple[str, str]]:
        """(backend, target) pairs for which every piece used by ``execution`` has an artifact."""
        used = {pid for segs in self.execution.values() for seg in segs for pid in seg}
        pairs: Optional[set] = None
        for p in self.pieces:
            if p.id not in used:
                continue
            s = {(a.backend, a.target) for a in p.artifacts}
            pairs = s if pairs is None else pairs & s
        return sorted(pairs or ())

    # -- incremental building (export/) -----------------------------------------------------

    def add_piece(self, piece: Piece) -> Piece:
        """Append a piece; its id must be new (ValueError otherwise)."""
        if any(p.id == piece.id for p in self.pieces):
            raise ValueError(f"duplicate piece id {piece.id!r}")
        self.pieces.append(piece)
        return piece

    def add_artifact_file(self, bundle_root: os.PathLike | str, piece_id: str, file: str, *,
                          backend: str, target: str, options: Optional[dict] = None,
                          replace: bool = False) -> Artifact:
        """Hash ``bundle_root/file`` and attach it to ``piece_id`` as (backend, target)."""
        art = Artifact.from_file(bundle_root, file, backend=backend, target=target,
                                 options=options)
        return self.piece(piece_id).add_artifact(art, replace=replace)

    def set_execution(self, skip_config: str, segments: Iterable[Iterable[str]]) -> None:
        """Set the piece ids to run per segment (one list per exit) for ``skip_config``."""
        self.execution[skip_config] = [list(seg) for seg in segments]

    # -- latency table ------------------------------------------------------------------------

    def latency_group(self, device: str, backend: str, batch: int) -> list[LatencyEntry]:
        return [e for e in self.latency if e.group == (device, backend, batch)]

    def latency_kind(self, device: str, backend: str, batch: int) -> Optional[str]:
        """'measured', 'estimated' or None for the (device, backend, batch) group."""
        g = self.latency_group(device, backend, batch)
        return g[0].kind if g else None

    def find_latency(self, device: str, backend: str, batch: int = 1, *,
                     piece: Optional[str] = None, exit: Optional[int] = None,
                     skip_config: Optional[str] = None,
                     target: Optional[str] = None) -> Optional[LatencyEntry]:
        """The entry for a piece, or for (exit, skip_config); None if absent."""
        for e in self.latency:
            if (e.group == (device, backend, batch) and e.piece == piece and e.exit == exit
                    and e.skip_config == skip_config and (target is None or e.target == target)):
                return e
        return None

    def replace_latency(self, entries: Iterable[LatencyEntry], *,
                        allow_downgrade: bool = False) -> int:
        """Install ``entries``, replacing each (device, backend, batch) group they cover WHOLESALE.

        Groups are never mixed: every group in ``entries`` must be all-measured or
        all-estimated, and every old entry of that group is dropped. A measured group is not
        replaced by an estimated one unless ``allow_downgrade`` (ManifestError otherwise).
        Nothing is changed if an error is raised. Returns the number of entries removed.
        """
        new = list(entries)
        kinds: dict[tuple, str] = {}
        for e in new:
            k = kinds.setdefault(e.group, e.kind)
            if k != e.kind:
                raise ManifestError(MANIFEST_NAME, "latency",
                                    f"new entries for {e.group} mix 'measured' and 'estimated'")
        for g, k in kinds.items():
            if k == "estimated" and not allow_downgrade and self.latency_kind(*g) == "measured":
                raise ManifestError(MANIFEST_NAME, "latency",
                                    f"{g} is already measured; refusing to replace it by "
                                    "estimates (allow_downgrade=True to force)")
        keep = [e for e in self.latency if e.group not in kinds]
        removed = len(self.latency) - len(keep)
        self.latency = keep + new
        return removed


# ----------------------------------------------------------------------------------------
# top-level parsing & cross-references
# ----------------------------------------------------------------------------------------

def _parse_manifest(v: _V, d: object) -> Manifest:
    if not isinstance(d, dict):
        v.fail("", f"expected a JSON object at top level, got {_tname(d)}")
    # version first, so a newer manifest is refused with the upgrade message (not with
    # "unknown key" errors about fields we do not know yet).
    if "schema_version" not in d:
        v.fail("schema_version", "missing required field")
    sv = d["schema_version"]
    if isinstance(sv, bool) or not isinstance(sv, int):
        v.fail("schema_version", f"expected an integer, got {_tname(sv)}")
    if sv > SCHEMA_VERSION:
        v.fail("schema_version", f"{sv}: written by a newer version of the tool: upgrade "
                                 f"(this version reads schema_version <= {SCHEMA_VERSION})")
    if sv < 1:
        v.fail("schema_version", f"expected an integer >= 1, got {sv}")
    v.obj(d, "", _TOP_REQUIRED, _TOP_OPTIONAL)

    model = ModelInfo._parse(v, d["model"], "model")
    inp = InputSpec._parse(v, d["input"], "input")
    names = [v.str_(x, _key("class_names", i), max_len=256)
             for i, x in enumerate(v.list_(d["class_names"], "class_names"))]
    if len(names) != model.num_classes:
        v.fail("class_names", f"expected {model.num_classes} names (model.num_classes), "
                              f"got {len(names)}")

    S = v.int_(d["stages"], "stages", lo=1, hi=MAX_STAGES)
    configs = []
    seen_cfg = set()
    for i, c in enumerate(v.list_(d["skip_configs"], "skip_configs", min_len=1, max_len=1 << S)):
        pc = _key("skip_configs", i)
        if not isinstance(c, str) or len(c) != S or set(c) - {"T", "F"}:
            v.fail(pc, f"expected a string of {S} chars, each 'T' or 'F' (one per stage), "
                       f"got {_short(c)}")
        if c in seen_cfg:
            v.fail(pc, f"duplicate skip config {c!r}")
        seen_cfg.add(c)
        configs.append(c)

    exits = [ExitInfo._parse(v, e, _key("exits", i))
             for i, e in enumerate(v.list_(d["exits"], "exits"))]
    if len(exits) != S:
        v.fail("exits", f"expected {S} exits (one per stage), got {len(exits)}")
    for k, e in enumerate(exits):
        if e.index != k or e.stage != k:
            v.fail(_key("exits", k), f"exit {k} must have index {k} and follow stage {k}, "
                                     f"got index {e.index}, stage {e.stage}")

    pieces = [Piece._parse(v, p, _key("pieces", i), S)
              for i, p in enumerate(v.list_(d["pieces"], "pieces", min_len=1))]
    by_id: dict[str, Piece] = {}
    by_file: dict[str, tuple[str, Artifact]] = {}
    for i, p in enumerate(pieces):
        if p.id in by_id:
            v.fail(_key(_key("pieces", i), "id"), f"duplicate piece id {p.id!r}")
        by_id[p.id] = p
        for j, a in enumerate(p.artifacts):
            where = f"pieces[{i}].artifacts[{j}]"
            prev = by_file.get(a.file)
            if prev is not None and (prev[1].sha256 != a.sha256
                                     or prev[1].size_bytes != a.size_bytes):
                v.fail(where, f"file {a.file!r} is also listed at {prev[0]} with a different "
                              "sha256/size_bytes")
            by_file.setdefault(a.file, (where, a))

    execution = _parse_execution(v, d["execution"], configs, S, by_id, inp.name)
    stopping = Stopping._parse(v, d["stopping"], "stopping")

    latency = [LatencyEntry._parse(v, e, _key("latency", i))
               for i, e in enumerate(v.list_(d["latency"], "latency"))]
    group_kind: dict[tuple, tuple[int, str]] = {}
    keys = set()
    for i, e in enumerate(latency):
        pl = _key("latency", i)
        if e.piece is not None and e.piece not in by_id:
            v.fail(_key(pl, "piece"), f"piece {e.piece!r} is not defined in pieces")
        if e.skip_config is not None and e.skip_config not in seen_cfg:
            v.fail(_key(pl, "skip_config"), f"{e.skip_config!r} is not one of skip_configs")
        if e.exit is not None and e.exit >= S:
            v.fail(_key(pl, "exit"), f"exit {e.exit} out of range 0..{S - 1}")
        first = group_kind.setdefault(e.group, (i, e.kind))
        if first[1] != e.kind:
            v.fail(_key(pl, "kind"), f"{e.kind!r} mixed with {first[1]!r} (latency[{first[0]}]) "
                                     f"in group device={e.device!r} backend={e.backend!r} "
                                     f"batch={e.batch}: a group is all measured or all estimated")
        if e.key in keys:
            v.fail(pl, "duplicate latency entry (same device, backend, target, batch, "
                       "piece/exit/skip_config)")
        keys.add(e.key)

    device = d["device"]
    if device is not None:
        device = v.ident(device, "device", "a device profile name")
    return Manifest(
        schema_version=sv, model=model, input=inp, class_names=names, stages=S,
        skip_configs=configs, exits=exits, pieces=pieces, execution=execution,
        stopping=stopping, latency=latency, device=device,
        created=v.timestamp(d["created"], "created"),
        tool_version=v.str_(d["tool_version"], "tool_version", max_len=128),
        source=Source._parse(v, d["source"], "source"),
        annotations=v.json_obj(d.get("annotations", {}), "annotations"))


def _parse_execution(v: _V, d: object, configs: list[str], S: int,
                     by_id: dict[str, Piece], input_name: str) -> dict[str, list[list[str]]]:
    if not isinstance(d, dict):
        v.fail("execution", f"expected an object, got {_tname(d)}")
    out: dict[str, list[list[str]]] = {}
    for c in d:
        if not isinstance(c, str) or c not in configs:
            v.fail(_key("execution", c) if isinstance(c, str) else "execution",
                   f"skip config {_short(c)} is not one of skip_configs")
    for c in configs:
        pc = _key("execution", c)
        if c not in d:
            v.fail(pc, "missing execution plan for this skip config")
        segs = v.list_(d[c], pc)
        if len(segs) != S:
            v.fail(pc, f"expected {S} segments (one per exit), got {len(segs)}")
        used: set[str] = set()
        available = {input_name}  # tensor names produced so far in this plan
        plan = []
        for k, seg in enumerate(segs):
            pk = _key(pc, k)
            seg = v.list_(seg, pk, min_len=1, max_len=64)
            for j, pid in enumerate(seg):
                pj = _key(pk, j)
                if not isinstance(pid, str):
                    v.fail(pj, f"expected a piece id string, got {_tname(pid)}")
                if pid not in by_id:
                    v.fail(pj, f"piece {_short(pid)} is not defined in pieces")
                p = by_id[pid]
                if pid in used:
                    v.fail(pj, f"piece {pid!r} is used twice in this plan")
                used.add(pid)
                if p.stage != k:
                    v.fail(pj, f"piece {pid!r} belongs to stage {p.stage}, not to segment {k}")
                skipped = c[k] == "T"
                if p.skip is not None and p.skip != skipped:
                    v.fail(pj, f"piece {pid!r} has skip={str(p.skip).lower()} but config "
                               f"{c!r} {'skips' if skipped else 'runs'} stage {k}'s "
                               "skippable sub-path")
                if p.kind == "skippable" and skipped:
                    v.fail(pj, f"piece {pid!r} is the skippable sub-path of stage {k}, which "
                               f"config {c!r} skips")
                for t in p.inputs:
                    if t.name not in available:
                        v.fail(pj, f"piece {pid!r} reads tensor {t.name!r}, which neither the "
                                   f"model input ({input_name!r}) nor an earlier piece of this "
                                   f"plan provides (available: {', '.join(sorted(available))})")
                available.update(t.name for t in p.outputs)
                last = j == len(seg) - 1
                if last and not p.returns_logits:
                    v.fail(pj, f"the last piece of a segment must return logits; {pid!r} "
                               "does not")
                if not last and p.returns_logits:
                    v.fail(pj, f"only the last piece of a segment may return logits; {pid!r} "
                               "does")
            plan.append(list(seg))
        out[c] = plan
    return out


# ----------------------------------------------------------------------------------------
# builder and file I/O
# ----------------------------------------------------------------------------------------

def new_manifest(*, model_name: str, family: str, num_classes: int, params: int,
                 input_shape: Iterable[int], mean: Iterable[float], std: Iterable[float],
                 stages: int, tool_version: str, class_names: Optional[Iterable[str]] = None,
                 skip_configs: Optional[Iterable[str]] = None, device: Optional[str] = None,
                 source: Optional[Source] = None, created: Optional[str] = None,
                 input_dtype: str = "float32", raw: Optional[RawInputSpec] = None,
                 annotations: Optional[dict] = None) -> Manifest:
    """Start a manifest for export/ to fill in (pieces, artifacts, execution, latency...).

    Defaults: class names "0".."num_classes-1", all 2**stages skip configs, exit k after
    stage k, no stopping rule, empty latency table, ``created`` = now (UTC). The result is
    not valid until pieces and an execution plan for every skip config are added;
    ``validate()`` / ``save_manifest`` check it.
    """
    return Manifest(
        model=ModelInfo(name=model_name, family=family, num_classes=num_classes, params=params),
        input=InputSpec(shape=list(input_shape), mean=[float(x) for x in mean],
                        std=[float(x) for x in std], dtype=input_dtype,
                        raw=raw if raw is not None else RawInputSpec()),
        class_names=list(class_names) if class_names is not None
        else [str(i) for i in range(num_classes)],
        stages=stages,
        skip_configs=list(skip_configs) if skip_configs is not None else all_skip_configs(stages),
        exits=[ExitInfo(index=k, stage=k) for k in range(stages)],
        pieces=[], execution={}, tool_version=tool_version,
        created=created or utc_now_iso(), device=device,
        source=source if source is not None else Source(),
        annotations=dict(annotations or {}))


def _no_dup_pairs(source: str):
    def hook(pairs):
        out = {}
        for k, val in pairs:
            if k in out:
                raise ManifestError(source, "", f"duplicate key {k!r} in a JSON object")
            out[k] = val
        return out
    return hook


def _bad_constant(source: str):
    def hook(name):
        raise ManifestError(source, "", f"{name} is not valid JSON")
    return hook


def _loads(text: Union[str, bytes], source: str) -> object:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ManifestError(source, "", f"not valid UTF-8: {e}") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        return json.loads(text, object_pairs_hook=_no_dup_pairs(source),
                          parse_constant=_bad_constant(source))
    except json.JSONDecodeError as e:
        raise ManifestError(source, "", f"invalid JSON at line {e.lineno} column {e.colno}: "
                                        f"{e.msg}") from None
    except RecursionError:
        raise ManifestError(source, "", "JSON nested too deeply") from None


def load_manifest(path: os.PathLike | str) -> Manifest:
    """Read and validate a manifest file. Raises ManifestError naming ``path``."""
    src = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise ManifestError(src, "", f"cannot read manifest: {e.strerror or e}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(src, "", f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
    return Manifest.from_dict(_loads(data, src), source=src)


def save_manifest(manifest: Manifest, path: os.PathLike | str) -> Path:
    """Validate ``manifest`` and write it atomically as pretty JSON. Returns the path."""
    src = os.fspath(path)
    manifest.validate(source=src)
    atomic_write_json(path, manifest.to_dict(), indent=2)
    return Path(path)
