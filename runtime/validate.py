"""One validation helper for every structured input: manifest, device profiles, rule
parameters, build and train configs.

A :class:`Validator` checks values field by field and raises one error that names the file and
the field (``recipe.toml: train.epochs: expected an integer, got string``). The error type is
the caller's: :class:`runtime.errors.ConfigError` by default, ``ManifestError`` for manifests.

    v = Validator("recipe.toml")
    epochs = v.int_(table.get("epochs"), "train.epochs", lo=1)

Stdlib only.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from typing import Any, Callable, Iterable, NoReturn, Optional, Union

from .errors import ConfigError

__all__ = ["Validator", "type_name", "short_repr", "field_path", "ID_RE"]

JSONValue = Union[None, bool, int, float, str, list, dict]
_MAX_JSON_DEPTH = 32
_MAX_STR = 4096
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+\-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def type_name(v: object) -> str:
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


def short_repr(v: object, n: int = 60) -> str:
    try:
        r = repr(v)
    except Exception:  # pragma: no cover - exotic objects
        r = f"<{type(v).__name__}>"
    return r if len(r) <= n else r[: n - 3] + "..."


def field_path(parent: str, key: object) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    k = str(key)
    if _IDENT_RE.fullmatch(k):
        return f"{parent}.{k}" if parent else k
    return f"{parent}[{json.dumps(k, ensure_ascii=True)}]"


class Validator:
    """Field-by-field checks; each failure raises ``error(source, path, reason)``."""

    def __init__(self, source: str, error: Callable[[str, str, str], Exception] = ConfigError):
        self.source = source
        self.error = error

    def fail(self, path: str, reason: str) -> NoReturn:
        raise self.error(self.source, path, reason)

    def obj(self, v: object, path: str, required: Iterable[str],
            optional: Iterable[str] = ()) -> dict:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {type_name(v)}")
        required = tuple(required)
        allowed = set(required) | set(optional)
        for k in v:
            if not isinstance(k, str):
                self.fail(path, f"object key {short_repr(k)} is not a string")
            if k not in allowed:
                self.fail(field_path(path, k), f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in required:
            if k not in v:
                self.fail(field_path(path, k), "missing required field")
        return v

    def str_(self, v: object, path: str, *, pattern: Optional[re.Pattern] = None,
             what: str = "", allow_empty: bool = False, max_len: int = _MAX_STR) -> str:
        if not isinstance(v, str):
            self.fail(path, f"expected a string, got {type_name(v)}")
        if not v and not allow_empty:
            self.fail(path, "must not be empty")
        if len(v) > max_len:
            self.fail(path, f"string longer than {max_len} chars")
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            self.fail(path, "string is not valid UTF-8 (lone surrogate)")
        if pattern is not None and not pattern.fullmatch(v):
            self.fail(path, f"expected {what or 'pattern ' + pattern.pattern}, got {short_repr(v)}")
        return v

    def opt_str(self, v: object, path: str, **kw) -> Optional[str]:
        return None if v is None else self.str_(v, path, **kw)

    def enum(self, v: object, path: str, choices: Iterable[str]) -> str:
        choices = tuple(choices)
        if not isinstance(v, str) or v not in choices:
            self.fail(path, f"expected one of {', '.join(repr(c) for c in choices)}, "
                            f"got {short_repr(v)}")
        return v

    def int_(self, v: object, path: str, *, lo: Optional[int] = None,
             hi: Optional[int] = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(path, f"expected an integer, got {type_name(v)}")
        if lo is not None and v < lo:
            self.fail(path, f"expected an integer >= {lo}, got {short_repr(v)}")
        if hi is not None and v > hi:
            self.fail(path, f"expected an integer <= {hi}, got {short_repr(v)}")
        return int(v)

    def num(self, v: object, path: str, *, lo: Optional[float] = None,
            hi: Optional[float] = None, lo_open: bool = False, hi_open: bool = False) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(path, f"expected a number, got {type_name(v)}")
        try:
            f = float(v)
        except OverflowError:
            self.fail(path, "number out of range")
        if not math.isfinite(f):
            self.fail(path, f"expected a finite number, got {short_repr(v)}")
        if lo is not None and (f <= lo if lo_open else f < lo):
            self.fail(path, f"expected a number {'>' if lo_open else '>='} {lo}, got {short_repr(v)}")
        if hi is not None and (f >= hi if hi_open else f > hi):
            self.fail(path, f"expected a number {'<' if hi_open else '<='} {hi}, got {short_repr(v)}")
        return f

    def opt_num(self, v: object, path: str, **kw) -> Optional[float]:
        return None if v is None else self.num(v, path, **kw)

    def opt_int(self, v: object, path: str, **kw) -> Optional[int]:
        return None if v is None else self.int_(v, path, **kw)

    def bool_(self, v: object, path: str) -> bool:
        if not isinstance(v, bool):
            self.fail(path, f"expected true or false, got {type_name(v)}")
        return v

    def list_(self, v: object, path: str, *, min_len: int = 0,
              max_len: Optional[int] = None) -> list:
        if not isinstance(v, list):
            self.fail(path, f"expected an array, got {type_name(v)}")
        if len(v) < min_len:
            self.fail(path, f"expected at least {min_len} item(s), got {len(v)}")
        if max_len is not None and len(v) > max_len:
            self.fail(path, f"expected at most {max_len} item(s), got {len(v)}")
        return v

    def list_of(self, v: object, path: str, item: Callable[[object, str], Any], *,
                min_len: int = 0, max_len: Optional[int] = None) -> list:
        """An array whose every item passes ``item(value, path)`` (e.g. ``self.int_``,
        ``lambda x, p: self.num(x, p, lo=0)``); returns the list of checked items."""
        self.list_(v, path, min_len=min_len, max_len=max_len)
        return [item(x, field_path(path, i)) for i, x in enumerate(v)]  # type: ignore[arg-type]

    def keys(self, v: object, path: str, allowed: Iterable[str]) -> dict:
        """An object whose keys are all in ``allowed`` (none required): ``obj(v, path, (), allowed)``."""
        return self.obj(v, path, (), allowed)

    def check(self, ok: object, path: str, reason: str) -> None:
        """Fail with ``reason`` at ``path`` unless ``ok``: for rules across fields."""
        if not ok:
            self.fail(path, reason)

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
            return [self.json_value(x, field_path(path, i), _depth + 1) for i, x in enumerate(v)]
        if isinstance(v, dict):
            out = {}
            for k, x in v.items():
                if not isinstance(k, str):
                    self.fail(path, f"object key {short_repr(k)} is not a string")
                self.str_(k, path, allow_empty=True)
                out[k] = self.json_value(x, field_path(path, k), _depth + 1)
            return out
        self.fail(path, f"not a JSON value: {type_name(v)}")

    def json_obj(self, v: object, path: str) -> dict:
        if not isinstance(v, dict):
            self.fail(path, f"expected an object, got {type_name(v)}")
        return self.json_value(v, path)  # type: ignore[return-value]

    def timestamp(self, v: object, path: str) -> str:
        s = self.str_(v, path, max_len=64)
        try:
            t = _dt.datetime.fromisoformat(s)
        except (ValueError, TypeError, OverflowError):
            self.fail(path, f"expected an ISO 8601 time like '2025-01-31T12:00:00+00:00', "
                            f"got {short_repr(s)}")
        if t.tzinfo is None or t.utcoffset() is None:
            self.fail(path, f"ISO time must carry a timezone offset (e.g. +00:00), got {short_repr(s)}")
        return s

    def opt_timestamp(self, v: object, path: str) -> Optional[str]:
        return None if v is None else self.timestamp(v, path)

    def sha256(self, v: object, path: str) -> str:
        if not isinstance(v, str) or not _HEX64_RE.fullmatch(v):
            self.fail(path, f"expected 64 hex chars (lowercase sha256), got {short_repr(v)}")
        return v

    def ident(self, v: object, path: str, what: str = "an id") -> str:
        return self.str_(v, path, pattern=ID_RE,
                         what=f"{what} ([A-Za-z0-9][A-Za-z0-9_.+-]*, <= 128 chars)")
