"""Bundle manifest: schema (dataclasses), strict validation, JSON (de)serialisation.

The manifest (``manifest.json`` at the root of a bundle directory) is the contract between
``export/`` (writes it) and ``runtime/`` (reads it). See docs/bundle.md for the schema
field by field and the versioning policy. Stdlib only.

Reading::

    m = load_manifest("bundle/manifest.json")        # -> Manifest, or ManifestError
    m = Manifest.from_dict(d, source="manifest.json") # every field validated

Every validation error names the file and the JSON path, e.g.
``manifest.json: pieces[2].artifacts[0].sha256: expected 64 hex chars, got 'abc'``.

Building: export/manifest_builder.py (``new_manifest``, ``add_piece``, ``add_artifact_file``,
``set_execution``), then :func:`save_manifest` (validates, then writes atomically).

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
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from .atomic import atomic_write_json
# Artifact backends (ARTIFACT_BACKENDS; "onnx" is the portable ONNX file) and the backends that
# execute them (BACKENDS): the one registry's, runtime/backends.
from .backends import ARTIFACT_BACKENDS, BACKENDS, backend_info
from .errors import ManifestError, UnsafePathError
from .validate import Validator, field_path as _key, short_repr as _short, type_name as _tname

__all__ = [
    "SCHEMA_VERSION",
    "MANIFEST_NAME",
    "PIECE_KINDS",
    "MERGED",
    "merged_piece_id",
    "TENSOR_DTYPES",
    "LATENCY_KINDS",
    "ModelInfo",
    "RawInputSpec",
    "PreprocessSpec",
    "InputSpec",
    "ExitInfo",
    "TensorSpec",
    "Artifact",
    "Piece",
    "Stopping",
    "Requirements",
    "DeploymentTarget",
    "Deployment",
    "LatencyEntry",
    "Source",
    "Manifest",
    "all_skip_configs",
    "load_manifest",
    "save_manifest",
    "sha256_file",
    "check_relpath",
    "utc_now_iso",
]

#: Current manifest schema version. Readers accept 1..SCHEMA_VERSION; newer is refused.
#: 3 added a piece's ``prefix`` (pieces specific to one skip path; a version-2 reader would
#: run them on any path).
SCHEMA_VERSION = 3
#: File name of the manifest at the root of a bundle directory.
MANIFEST_NAME = "manifest.json"
PIECE_KINDS = ("stage", "mandatory", "skippable", "head", "segment", "merged")
#: Kind of a piece that runs stages ``first_stage..stage`` (one variant each) plus exit head
#: ``stage`` as one artifact; never part of an execution plan (an alternative to a span of one).
MERGED = "merged"
TENSOR_DTYPES = ("float32", "float16", "bfloat16", "int8", "uint8", "int32", "int64", "bool")
INPUT_DTYPES = ("float32", "float16")
INPUT_LAYOUTS = ("NCHW",)
RAW_DTYPES = ("uint8",)
RAW_LAYOUTS = ("HWC",)
#: ``input.raw.preprocess`` values (runtime/preprocess.py implements them).
PREPROCESS_RESIZE = ("shorter_side",)
PREPROCESS_CROP = ("center",)
PREPROCESS_INTERPOLATION = ("bilinear",)
LATENCY_KINDS = ("measured", "estimated")
#: Output name a piece with returns_logits=True must have.
LOGITS = "logits"
#: Symbolic dimension allowed in tensor shapes (the dynamic batch dim); -1 means the same.
DYNAMIC_DIM = "N"
MAX_STAGES = 16
MAX_MANIFEST_BYTES = 64 * 1024 * 1024

_RESERVED_FILES = {MANIFEST_NAME}

_CC_RE = re.compile(r"\d{1,2}\.\d{1,2}")

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


class _V(Validator):
    """Validation context: raises ManifestError(source, json_path, reason)."""

    def __init__(self, source: str):
        super().__init__(source, ManifestError)


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
class PreprocessSpec:
    """How training turned an image of any size into the model's ``size`` x ``size``
    (``input.raw.preprocess``): the shorter side resized to ``size`` with ``interpolation``,
    then the ``crop`` square cut. ``runtime.preprocess.preprocess_image`` applies it."""
    size: int
    resize: str = "shorter_side"
    crop: str = "center"
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {"resize": self.resize, "size": self.size, "crop": self.crop,
                "interpolation": self.interpolation}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "PreprocessSpec":
        d = v.obj(d, p, ("resize", "size", "crop", "interpolation"))
        return cls(resize=v.enum(d["resize"], _key(p, "resize"), PREPROCESS_RESIZE),
                   size=v.int_(d["size"], _key(p, "size"), lo=1, hi=1 << 20),
                   crop=v.enum(d["crop"], _key(p, "crop"), PREPROCESS_CROP),
                   interpolation=v.enum(d["interpolation"], _key(p, "interpolation"),
                                        PREPROCESS_INTERPOLATION))


@dataclass(kw_only=True)
class RawInputSpec:
    """What the runtime accepts as *raw* input before normalisation (documentation + check).

    ``preprocess``: how training resized/cropped images of other sizes (None: the caller
    gives model-sized images)."""
    dtype: str = "uint8"
    layout: str = "HWC"
    note: str = DEFAULT_RAW_NOTE
    preprocess: Optional[PreprocessSpec] = None

    def to_dict(self) -> dict:
        d = {"dtype": self.dtype, "layout": self.layout, "note": self.note}
        if self.preprocess is not None:
            d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "RawInputSpec":
        d = v.obj(d, p, ("dtype", "layout"), ("note", "preprocess"))
        pre = d.get("preprocess")
        return cls(dtype=v.enum(d["dtype"], _key(p, "dtype"), RAW_DTYPES),
                   layout=v.enum(d["layout"], _key(p, "layout"), RAW_LAYOUTS),
                   note=v.str_(d.get("note", ""), _key(p, "note"), allow_empty=True),
                   preprocess=None if pre is None else
                   PreprocessSpec._parse(v, pre, _key(p, "preprocess")))


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
        raw = RawInputSpec._parse(v, d["raw"], _key(p, "raw"))
        if raw.preprocess is not None and shape[1:] != [raw.preprocess.size] * 2:
            v.fail(_key(_key(_key(p, "raw"), "preprocess"), "size"),
                   f"{raw.preprocess.size} makes {raw.preprocess.size}x{raw.preprocess.size} "
                   f"images, the model input is {shape[1]}x{shape[2]} (shape[1:])")
        return cls(name=v.str_(d["name"], _key(p, "name"), max_len=256),
                   shape=shape, mean=mean, std=std,
                   dtype=v.enum(d["dtype"], _key(p, "dtype"), INPUT_DTYPES),
                   layout=v.enum(d["layout"], _key(p, "layout"), INPUT_LAYOUTS),
                   raw=raw)


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
    def _parse(cls, v: _V, d: object, p: str) -> "Artifact":
        d = v.obj(d, p, ("backend", "target", "file", "sha256", "size_bytes"), ("options",))
        pf = _key(p, "file")
        why = check_relpath(d["file"])
        if why:
            raise UnsafePathError(v.source, why, json_path=pf,
                                  relpath=d["file"] if isinstance(d["file"], str) else None)
        return cls(backend=v.enum(d["backend"], _key(p, "backend"), ARTIFACT_BACKENDS),
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
    #: kind "merged" only: the span's first stage (``stage`` is its last) and its skip variant,
    #: one 'F'/'T' per stage first_stage..stage. None for every other kind (and not written).
    first_stage: Optional[int] = None
    variant: Optional[str] = None
    #: The skip variants ('F'/'T') of the stages before this piece (before ``first_stage`` for a
    #: merged piece) that it is specific to: its norm statistics were estimated on that path
    #: (``train/path_norms.py``). None: it serves every path (and is not written).
    prefix: Optional[str] = None

    def serves(self, path: str) -> bool:
        """Whether the piece may run on skip path ``path`` (variants of stages 0.. at least
        up to the piece's first stage)."""
        return self.prefix is None or path[:len(self.prefix)] == self.prefix

    def to_dict(self) -> dict:
        d = {"id": self.id, "kind": self.kind, "stage": self.stage}
        if self.first_stage is not None:
            d["first_stage"] = self.first_stage
        if self.variant is not None:
            d["variant"] = self.variant
        if self.prefix is not None:
            d["prefix"] = self.prefix
        d.update({"skip": self.skip, "returns_logits": self.returns_logits,
                  "inputs": [t.to_dict() for t in self.inputs],
                  "outputs": [t.to_dict() for t in self.outputs],
                  "macs": self.macs, "params": self.params,
                  "artifacts": [a.to_dict() for a in self.artifacts]})
        return d

    def find_artifacts(self, backend: str, target: Optional[str] = None) -> list[Artifact]:
        return [a for a in self.artifacts
                if a.backend == backend and (target is None or a.target == target)]

    @classmethod
    def _parse(cls, v: _V, d: object, p: str, stages: int) -> "Piece":
        d = v.obj(d, p, ("id", "kind", "stage", "skip", "returns_logits", "inputs", "outputs",
                         "macs", "params", "artifacts"), ("first_stage", "variant", "prefix"))
        pid = v.ident(d["id"], _key(p, "id"), "a piece id")
        kind = v.enum(d["kind"], _key(p, "kind"), PIECE_KINDS)
        stage = v.int_(d["stage"], _key(p, "stage"), lo=0, hi=stages - 1)
        skip = None if d["skip"] is None else v.bool_(d["skip"], _key(p, "skip"))
        rl = v.bool_(d["returns_logits"], _key(p, "returns_logits"))
        first_stage, variant = d.get("first_stage"), d.get("variant")
        if kind == MERGED:
            first_stage, variant = _parse_merged_span(v, d, p, pid, stage, skip, rl, stages)
        else:
            for k in ("first_stage", "variant"):
                if d.get(k) is not None:
                    v.fail(_key(p, k), f"only a {MERGED!r} piece has {k}; this piece's kind "
                                       f"is {kind!r}")
        prefix = d.get("prefix")
        if prefix is not None:
            start = stage if first_stage is None else first_stage
            if not isinstance(prefix, str) or len(prefix) != start or set(prefix) - {"T", "F"}:
                v.fail(_key(p, "prefix"), f"expected a string of {start} chars, each 'T' or 'F' "
                                          f"(the variants of stages 0..{start - 1}, before the "
                                          f"piece), got {_short(prefix)}")
            if start == 0:
                v.fail(_key(p, "prefix"), "a piece that starts at stage 0 has no stages before "
                                          "it: prefix must be absent")
        if kind == MERGED and pid != merged_piece_id(first_stage, stage, variant, prefix):
            v.fail(_key(p, "id"), f"a {MERGED!r} piece of stages {first_stage}..{stage} with "
                                  f"variant {variant!r} and prefix {prefix!r} must have id "
                                  f"{merged_piece_id(first_stage, stage, variant, prefix)!r}, "
                                  f"got {pid!r}")
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
        if kind == MERGED:
            _check_merged_outputs(v, p, first_stage, stage, stages, tensors)
        return cls(id=pid, kind=kind, stage=stage, skip=skip, returns_logits=rl,
                   inputs=tensors["inputs"], outputs=tensors["outputs"],
                   macs=v.int_(d["macs"], _key(p, "macs"), lo=0),
                   params=v.int_(d["params"], _key(p, "params"), lo=0), artifacts=arts,
                   first_stage=first_stage, variant=variant, prefix=prefix)


def merged_piece_id(first: int, last: int, variant: str, prefix: Optional[str] = None) -> str:
    """Id of the merged piece of stages ``first..last`` under ``variant``: 'stages0-2.FTF';
    one specific to the path ``prefix`` before it: 'stages1-2.TF.F'."""
    return f"stages{first}-{last}.{variant}" + (f".{prefix}" if prefix else "")


def _features_name(k: int) -> str:
    return f"features{k}"


def _parse_merged_span(v: _V, d: dict, p: str, pid: str, stage: int, skip: Optional[bool],
                       rl: bool, stages: int) -> tuple[int, str]:
    """first_stage, variant, skip, returns_logits and id of a 'merged' piece."""
    pf, pv = _key(p, "first_stage"), _key(p, "variant")
    if d.get("first_stage") is None:
        v.fail(pf, f"missing: a {MERGED!r} piece needs first_stage, the first stage of its span "
                   f"(its stage, {stage}, is the last)")
    first = v.int_(d["first_stage"], pf, lo=0)
    if first >= stage:
        v.fail(pf, f"{first} must be less than stage ({stage}, the span's last stage)")
    n = stage - first + 1
    var = d.get("variant")
    if var is None:
        v.fail(pv, f"missing: a {MERGED!r} piece needs variant, one 'F'/'T' per stage "
                   f"{first}..{stage}")
    if not isinstance(var, str) or len(var) != n or set(var) - {"T", "F"}:
        v.fail(pv, f"expected a string of {n} chars (stages {first}..{stage}), each 'T' or 'F', "
                   f"got {_short(var)}")
    if skip is not None:
        v.fail(_key(p, "skip"), f"a {MERGED!r} piece spans several stages: skip must be null "
                                "(variant says which stages skip)")
    if not rl:
        v.fail(_key(p, "returns_logits"), f"a {MERGED!r} piece ends with exit {stage}'s head: "
                                          "returns_logits must be true")
    return first, var


def _check_merged_outputs(v: _V, p: str, first: int, stage: int, stages: int,
                          tensors: dict[str, list[TensorSpec]]) -> None:
    """A merged piece reads one tensor (the span's input, checked against the model input's name
    later) and writes the last stage's features (unless it is the last stage) and the logits."""
    pi = _key(p, "inputs")
    if len(tensors["inputs"]) != 1:
        v.fail(pi, f"a {MERGED!r} piece has exactly one input, got {len(tensors['inputs'])}")
    name = tensors["inputs"][0].name
    if first > 0 and name != _features_name(first - 1):
        v.fail(_key(_key(pi, 0), "name"), f"a {MERGED!r} piece starting at stage {first} reads "
                                          f"{_features_name(first - 1)!r}, got {name!r}")
    want = ([_features_name(stage)] if stage < stages - 1 else []) + [LOGITS]
    got = [t.name for t in tensors["outputs"]]
    if sorted(got) != sorted(want):
        v.fail(_key(p, "outputs"), f"a {MERGED!r} piece ending at stage {stage} outputs exactly "
                                   f"{want}, got {got}")


@dataclass(kw_only=True)
class Stopping:
    """Stopping rule chosen by calibration. All-empty (rule=None) before calibration.

    ``skip_config``: the configuration the rule was calibrated for (the default one);
    ``skip_accuracy``: validation accuracy at full depth of every skip configuration (used to
    pick a configuration for a budget). Both schema v2; read from v1 annotations on load.
    """
    rule: Optional[str] = None
    params: dict = field(default_factory=dict)
    val_accuracy: Optional[float] = None
    mean_latency_ms: Optional[float] = None
    created: Optional[str] = None
    skip_config: Optional[str] = None
    skip_accuracy: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rule": self.rule, "params": copy.deepcopy(self.params),
                "val_accuracy": self.val_accuracy, "mean_latency_ms": self.mean_latency_ms,
                "created": self.created, "skip_config": self.skip_config,
                "skip_accuracy": dict(self.skip_accuracy)}

    @property
    def calibrated(self) -> bool:
        return self.rule is not None

    @classmethod
    def _parse(cls, v: _V, d: object, p: str, configs: list[str]) -> "Stopping":
        if d is None:
            return cls()
        d = v.obj(d, p, ("rule",), ("params", "val_accuracy", "mean_latency_ms", "created",
                                    "skip_config", "skip_accuracy"))
        rule = None if d["rule"] is None else v.ident(d["rule"], _key(p, "rule"), "a rule name")
        sc = d.get("skip_config")
        if sc is not None and sc not in configs:
            v.fail(_key(p, "skip_config"), f"{_short(sc)} is not one of skip_configs")
        pa = _key(p, "skip_accuracy")
        acc = v.json_obj(d.get("skip_accuracy", {}), pa)
        for cfg, a in acc.items():
            if cfg not in configs:
                v.fail(_key(pa, cfg), "not one of skip_configs")
            v.num(a, _key(pa, cfg), lo=0.0, hi=1.0)
        if acc and set(acc) != set(configs):
            v.fail(pa, f"expected an accuracy for every skip config ({len(configs)}), "
                       f"got {len(acc)}")
        s = cls(rule=rule,
                params=v.json_obj(d.get("params", {}), _key(p, "params")),
                val_accuracy=v.opt_num(d.get("val_accuracy"), _key(p, "val_accuracy"),
                                       lo=0.0, hi=1.0),
                mean_latency_ms=v.opt_num(d.get("mean_latency_ms"), _key(p, "mean_latency_ms"),
                                          lo=0.0),
                created=v.opt_timestamp(d.get("created"), _key(p, "created")),
                skip_config=sc, skip_accuracy={c: float(acc[c]) for c in configs if c in acc})
        if rule is None:
            for k in ("params", "val_accuracy", "mean_latency_ms", "created", "skip_config",
                      "skip_accuracy"):
                if getattr(s, k) not in (None, {}):
                    v.fail(_key(p, k), "must be empty/null while stopping.rule is null")
        return s


@dataclass(kw_only=True)
class Requirements:
    """What a (backend, target)'s artifacts need from the machine that runs them. None / empty:
    no requirement. ``arch`` is a normalised architecture (runtime.host.ARCH_ALIASES)."""
    arch: Optional[str] = None
    isa: list[str] = field(default_factory=list)
    gpu: bool = False
    gpu_compute_capability: Optional[str] = None
    tensorrt_major: Optional[int] = None

    def to_dict(self) -> dict:
        return {"arch": self.arch, "isa": list(self.isa), "gpu": self.gpu,
                "gpu_compute_capability": self.gpu_compute_capability,
                "tensorrt_major": self.tensorrt_major}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "Requirements":
        d = v.obj(d, p, (), ("arch", "isa", "gpu", "gpu_compute_capability", "tensorrt_major"))
        cc = d.get("gpu_compute_capability")
        if cc is not None and not (isinstance(cc, str) and _CC_RE.fullmatch(cc)):
            v.fail(_key(p, "gpu_compute_capability"), f"expected 'major.minor' like '8.7', "
                                                      f"got {_short(cc)}")
        tm = d.get("tensorrt_major")
        return cls(arch=v.opt_str(d.get("arch"), _key(p, "arch"), max_len=32),
                   isa=[v.str_(x, _key(_key(p, "isa"), i), max_len=64)
                        for i, x in enumerate(v.list_(d.get("isa", []), _key(p, "isa")))],
                   gpu=v.bool_(d.get("gpu", False), _key(p, "gpu")) or cc is not None,
                   gpu_compute_capability=cc,
                   tensorrt_major=None if tm is None else v.int_(tm, _key(p, "tensorrt_major"),
                                                                 lo=1))


@dataclass(kw_only=True)
class DeploymentTarget:
    """One (backend, target) the bundle can run with: what it needs and its runner options."""
    backend: str
    target: str
    requires: Requirements = field(default_factory=Requirements)
    runner_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "target": self.target,
                "requires": self.requires.to_dict(),
                "runner_options": copy.deepcopy(self.runner_options)}

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "DeploymentTarget":
        d = v.obj(d, p, ("backend", "target"), ("requires", "runner_options"))
        backend = v.enum(d["backend"], _key(p, "backend"), ARTIFACT_BACKENDS)
        po = _key(p, "runner_options")
        opts = v.json_obj(d.get("runner_options", {}), po)
        known = backend_info(backend).runner_options
        for k in opts:
            if k not in known:
                v.fail(_key(po, k), f"unknown {backend_info(backend).name} runner option "
                                    f"(known: {', '.join(sorted(known))})")
        if opts.get("provider_options") is not None:  # onnxruntime: per execution provider
            from .backends.provider_options import check as check_provider_options

            check_provider_options(v, opts["provider_options"], _key(po, "provider_options"))
        return cls(backend=backend, target=v.ident(d["target"], _key(p, "target"), "a target"),
                   requires=Requirements._parse(v, d.get("requires", {}), _key(p, "requires")),
                   runner_options=opts)


@dataclass(kw_only=True)
class Deployment:
    """The device profile resolved at compile time: the only thing the runtime needs of it.

    ``backend_order``: backends tried first to last (the portable ONNX is always the last
    resort); ``targets``: every (backend, target) the bundle ships, the portable one included.
    """
    profile: str
    backend_order: list[str]
    targets: list[DeploymentTarget] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"profile": self.profile, "backend_order": list(self.backend_order),
                "targets": [t.to_dict() for t in self.targets]}

    def target(self, backend: str, target: str) -> Optional[DeploymentTarget]:
        for t in self.targets:
            if t.backend == backend and t.target == target:
                return t
        return None

    @classmethod
    def _parse(cls, v: _V, d: object, p: str) -> "Deployment":
        d = v.obj(d, p, ("profile", "backend_order", "targets"))
        pb = _key(p, "backend_order")
        order = [v.enum(b, _key(pb, i), BACKENDS)
                 for i, b in enumerate(v.list_(d["backend_order"], pb))]
        if len(set(order)) != len(order):
            v.fail(pb, "a backend is listed twice")
        pt = _key(p, "targets")
        targets = [DeploymentTarget._parse(v, t, _key(pt, i))
                   for i, t in enumerate(v.list_(d["targets"], pt))]
        seen = set()
        for i, t in enumerate(targets):
            if (t.backend, t.target) in seen:
                v.fail(_key(pt, i), f"duplicate target {t.backend}/{t.target}")
            seen.add((t.backend, t.target))
        return cls(profile=v.ident(d["profile"], _key(p, "profile"), "a device profile name"),
                   backend_order=order, targets=targets)


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
                   backend=v.enum(d["backend"], _key(p, "backend"), BACKENDS),
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
_TOP_OPTIONAL = ("annotations", "deployment")


@dataclass(kw_only=True)
class Manifest:
    """The whole manifest. Build with export.manifest_builder, read with :func:`load_manifest`.

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
    deployment: Optional[Deployment] = None
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
            "deployment": None if self.deployment is None else self.deployment.to_dict(),
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

    def merged_piece(self, first: int, last: int, variant: str,
                     prefix: Optional[str] = None) -> Optional[Piece]:
        """The 'merged' piece running stages ``first..last`` under ``variant`` (one 'F'/'T'
        per stage) plus exit head ``last`` on the path ``prefix`` (variants of stages
        0..first-1; None: any path), or None if the bundle has none."""
        for p in self.pieces:
            if (p.kind == MERGED and p.first_stage == first and p.stage == last
                    and p.variant == variant and (prefix is None or p.serves(prefix))):
                return p
        return None

    def span_configs(self, first: int, last: int, variant: str,
                     prefix: Optional[str] = None) -> list[str]:
        """Per stage k of ``first..last``, a skip config whose segment k runs on the path
        ``prefix + variant`` (``prefix``: the variants of stages 0..first-1; None: any path):
        one that follows the path up to stage k, else one whose letter k is the variant's and
        whose segment-k pieces serve every path. Raises KeyError when there is none."""
        out = []
        for k in range(first, last + 1):
            if prefix is None:
                cfg = next((c for c in self.skip_configs
                            if c[first:k + 1] == variant[:k - first + 1]), None)
            else:
                want = (prefix + variant)[:k + 1]
                cfg = next((c for c in self.skip_configs if c[:k + 1] == want), None) or next(
                    (c for c in self.skip_configs if c[k] == want[k]
                     and all(p.serves(want) for p in self.segments(c)[k])), None)
            if cfg is None:
                raise KeyError(f"no skip config runs stage {k} as {variant[k - first]!r} on the "
                               f"path {(prefix or '') + variant!r} (skip configs: "
                               f"{', '.join(self.skip_configs)})")
            out.append(cfg)
        return out

    @property
    def per_path(self) -> bool:
        """Whether some piece is specific to a skip path (``Piece.prefix``)."""
        return any(p.prefix is not None for p in self.pieces)

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

    for i, p in enumerate(pieces):
        if p.kind != MERGED:
            continue
        pp = _key("pieces", i)
        if p.first_stage == 0 and p.inputs[0].name != inp.name:
            v.fail(_key(_key(_key(pp, "inputs"), 0), "name"),
                   f"a {MERGED!r} piece starting at stage 0 reads the model input "
                   f"{inp.name!r} (input.name), got {p.inputs[0].name!r}")
        if not any(c[p.first_stage:p.stage + 1] == p.variant for c in configs):
            v.fail(_key(pp, "variant"), f"{p.variant!r} for stages {p.first_stage}..{p.stage} "
                                        "matches no skip config of skip_configs")

    execution = _parse_execution(v, d["execution"], configs, S, by_id, inp.name)
    stopping = Stopping._parse(v, d["stopping"], "stopping", configs)

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
    manifest = Manifest(
        schema_version=sv, model=model, input=inp, class_names=names, stages=S,
        skip_configs=configs, exits=exits, pieces=pieces, execution=execution,
        stopping=stopping, latency=latency, device=device,
        created=v.timestamp(d["created"], "created"),
        tool_version=v.str_(d["tool_version"], "tool_version", max_len=128),
        source=Source._parse(v, d["source"], "source"),
        annotations=v.json_obj(d.get("annotations", {}), "annotations"),
        deployment=None if d.get("deployment") is None
        else Deployment._parse(v, d["deployment"], "deployment"))
    _check_deployment(v, manifest)
    if sv < 3:
        for i, piece in enumerate(pieces):
            if piece.prefix is not None:
                v.fail(_key(_key("pieces", i), "prefix"), f"schema_version {sv} has no piece "
                       "prefix (pieces specific to a skip path need schema_version 3)")
    if sv < 2:
        from .manifest_v1 import upgrade_v1
        upgrade_v1(manifest)
    return manifest


def _check_deployment(v: _V, m: Manifest) -> None:
    """Every deployment target names artifacts the bundle ships."""
    if m.deployment is None:
        return
    have = set(m.available_targets())
    for i, t in enumerate(m.deployment.targets):
        if (t.backend, t.target) not in have:
            v.fail(f"deployment.targets[{i}]", f"no {t.backend} artifacts for target "
                                               f"{t.target!r} cover the execution plan")


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
                if p.kind == MERGED:
                    v.fail(pj, f"piece {pid!r} is a {MERGED!r} piece: merged pieces are "
                               "alternatives to spans of a plan and never appear in one")
                if pid in used:
                    v.fail(pj, f"piece {pid!r} is used twice in this plan")
                used.add(pid)
                if p.stage != k:
                    v.fail(pj, f"piece {pid!r} belongs to stage {p.stage}, not to segment {k}")
                if not p.serves(c):
                    v.fail(pj, f"piece {pid!r} is specific to the path {p.prefix!r} before "
                               f"stage {k}; config {c!r} reaches stage {k} through "
                               f"{c[:k]!r}")
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
