"""Find, merge, detect and validate device profiles.

Profiles come from, in lookup order:

1. an explicit path (``load_profile("./my-board.toml")``, ``--profile PATH``);
2. user profile directories: ``user_dirs`` if given, else ``$PIPELINE_PROFILE_DIR``
   (``os.pathsep``-separated), else ``~/.config/adaptive-depth/profiles``; every
   ``*.toml`` there is a profile, and a user profile with a shipped profile's name
   replaces it;
3. the profiles shipped in ``devices/profiles/``.

Names are matched first, then aliases.  A profile may ``extends = "NAME-or-PATH"``
another; tables are deep-merged (the child wins), ``[[backends]]`` entries are merged by
backend name and the child's list gives the order, and ``aliases`` are not inherited.

Load-time detection (``detect = "host"`` / ``detect = "nvidia-gpu"``) fills fields the
file leaves out; see ``x86-host.toml`` and ``nvidia-gpu.toml``.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as _toml  # type: ignore[no-redef]

from . import host as _host
from runtime.validate import type_name

from .profile import Profile, ProfileError, ProfileNotFoundError, validate_profile

__all__ = [
    "DEFAULT_USER_DIR",
    "ENV_PROFILE_DIR",
    "list_profiles",
    "load_profile",
    "profile_index",
    "shipped_profile_dir",
    "user_profile_dirs",
]

ENV_PROFILE_DIR = "PIPELINE_PROFILE_DIR"
DEFAULT_USER_DIR = "~/.config/adaptive-depth/profiles"
_SHIPPED = Path(__file__).resolve().parent / "profiles"

_CC_ALIASES = re.compile(r"^(?:sm_?)?(\d+)(?:\.(\d+))?([a-z]?)$")
_GPU_ARCH_BY_CC = {
    "7.0": "volta",
    "7.2": "volta",
    "7.5": "turing",
    "8.0": "ampere",
    "8.6": "ampere",
    "8.7": "ampere",
    "8.9": "ada",
    "9.0": "hopper",
    "10.0": "blackwell",
    "10.3": "blackwell",
    "12.0": "blackwell",
}


def shipped_profile_dir() -> Path:
    return _SHIPPED


def user_profile_dirs(user_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> list[Path]:
    """Directories searched for user profiles (existing ones only)."""
    if user_dirs is None:
        env = os.environ.get(ENV_PROFILE_DIR)
        raw: list[str | os.PathLike] = (
            [p for p in env.split(os.pathsep) if p] if env else [DEFAULT_USER_DIR]
        )
    elif isinstance(user_dirs, (str, os.PathLike)):
        raw = [user_dirs]
    else:
        raw = list(user_dirs)
    out = []
    for p in raw:
        path = Path(p).expanduser()
        if path.is_dir():
            out.append(path.resolve())
    return out


# ------------------------------------------------------------------------ TOML files

_cache: dict[Path, tuple[float, int, dict]] = {}


def _read_toml(path: Path) -> dict:
    try:
        st = path.stat()
    except OSError as e:
        raise ProfileError(None, None, f"{e.strerror or e}", file=path) from None
    hit = _cache.get(path)
    if hit and hit[0] == st.st_mtime and hit[1] == st.st_size:
        return copy.deepcopy(hit[2])
    try:
        with open(path, "rb") as f:
            data = _toml.load(f)
    except _toml.TOMLDecodeError as e:
        raise ProfileError(None, None, f"invalid TOML: {e}", file=path) from None
    except OSError as e:
        raise ProfileError(None, None, f"{e.strerror or e}", file=path) from None
    _cache[path] = (st.st_mtime, st.st_size, data)
    return copy.deepcopy(data)


@dataclass(frozen=True)
class _Entry:
    name: str
    aliases: tuple[str, ...]
    path: Path
    builtin: bool


def _entries(user_dirs: Any) -> list[_Entry]:
    """All profile files, user directories first, then shipped."""
    out: list[_Entry] = []
    dirs = [(d, False) for d in user_profile_dirs(user_dirs)] + [(_SHIPPED, True)]
    for directory, builtin in dirs:
        for path in sorted(directory.glob("*.toml")):
            data = _read_toml(path)
            name = data.get("name")
            if not isinstance(name, str):
                name = path.stem
            aliases = data.get("aliases") if isinstance(data.get("aliases"), list) else []
            out.append(_Entry(name.lower(), tuple(str(a).lower() for a in aliases), path, builtin))
    return out


def profile_index(user_dirs: Any = None) -> dict[str, tuple[str, ...]]:
    """``{name: aliases}`` of every visible profile, without validating them."""
    index: dict[str, tuple[str, ...]] = {}
    for e in _entries(user_dirs):
        index.setdefault(e.name, e.aliases)
    return dict(sorted(index.items()))


def _find(key: str, user_dirs: Any, exclude: Iterable[Path] = ()) -> _Entry | None:
    key = key.lower()
    entries = [e for e in _entries(user_dirs) if e.path not in set(exclude)]
    for e in entries:
        if e.name == key:
            return e
    for e in entries:
        if key in e.aliases:
            return e
    return None


def _not_found(what: str, user_dirs: Any) -> ProfileNotFoundError:
    index = profile_index(user_dirs)
    names = ", ".join(index)
    aliases = ", ".join(f"{a} -> {n}" for n, al in index.items() for a in al)
    return ProfileNotFoundError(
        f"unknown device profile '{what}'; available: {names} (aliases: {aliases})", index
    )


def _is_path(s: str) -> bool:
    return s.endswith(".toml") or "/" in s or os.sep in s


# ------------------------------------------------------------------------- loading


def load_profile(
    name_or_path: str | os.PathLike,
    user_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    compute_capability: str | None = None,
) -> Profile:
    """Load and validate one profile by name, alias or path.

    ``"nvidia-gpu:sm_86"`` (or ``"nvidia-gpu:8.6"``) and ``compute_capability="8.6"``
    choose the GPU generation of a ``detect = "nvidia-gpu"`` profile.
    Raises :class:`ProfileNotFoundError` (unknown name; the message lists what exists)
    or :class:`ProfileError` (naming the bad field).
    """
    spec = os.fspath(name_or_path).strip()
    if not spec:
        raise _not_found(spec, user_dirs)
    param = None
    if _is_path(spec) or Path(spec).suffix == ".toml":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ProfileNotFoundError(f"profile file '{spec}' not found")
        path = path.resolve()
    else:
        if ":" in spec:
            spec, param = spec.split(":", 1)
        entry = _find(spec, user_dirs)
        if entry is None:
            raise _not_found(spec, user_dirs)
        path = entry.path
    if param is not None and compute_capability is not None and param != compute_capability:
        raise ProfileError(spec, None, f"compute capability given twice ({param!r} and {compute_capability!r})",
                           file=_source(path))
    raw = _resolve(path, user_dirs, chain=())
    raw = _detect(raw, path, compute_capability if compute_capability is not None else param)
    return validate_profile(raw, source=_source(path))


def list_profiles(
    user_dirs: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> list[Profile]:
    """Every visible profile (user profiles shadow shipped ones of the same name), by name.

    Raises :class:`ProfileError` if any profile is invalid or two profiles claim the
    same alias.
    """
    seen: dict[str, Profile] = {}
    for e in _entries(user_dirs):
        if e.name in seen:
            continue
        seen[e.name] = load_profile(str(e.path), user_dirs)
    owners: dict[str, str] = {}
    for p in seen.values():
        for key in (p.name, *p.aliases):
            if key in owners and owners[key] != p.name:
                raise ProfileError(p.name, "aliases", f"'{key}' is already used by profile '{owners[key]}'",
                                   file=p.source)
            owners[key] = p.name
    return [seen[n] for n in sorted(seen)]


def _source(path: Path) -> str:
    try:
        return f"builtin:{path.relative_to(_SHIPPED).as_posix()}"
    except ValueError:
        return str(path)


def _resolve(path: Path, user_dirs: Any, chain: tuple[Path, ...]) -> dict:
    """Read ``path`` and apply its ``extends`` chain (deep merge, child wins)."""
    if path in chain:
        loop = " -> ".join(p.name for p in (*chain, path))
        raise ProfileError(_label(path), "extends", f"circular extends: {loop}", file=_source(path))
    raw = _read_toml(path)
    base_ref = raw.get("extends")
    if base_ref is None:
        return raw
    label = raw.get("name") if isinstance(raw.get("name"), str) else path.stem
    src = _source(path)
    if not isinstance(base_ref, str):
        raise ProfileError(label, "extends", f"expected a string, got {type_name(base_ref)}", file=src)
    if _is_path(base_ref):
        base_path = Path(base_ref).expanduser()
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        if not base_path.is_file():
            raise ProfileError(label, "extends", f"profile file '{base_ref}' not found", file=src)
        base_path = base_path.resolve()
    else:
        entry = _find(base_ref, user_dirs, exclude=(*chain, path))
        if entry is None:
            names = ", ".join(profile_index(user_dirs))
            raise ProfileError(label, "extends", f"unknown profile '{base_ref}' (available: {names})", file=src)
        base_path = entry.path
    base = _resolve(base_path, user_dirs, (*chain, path))
    base.pop("aliases", None)  # aliases belong to the base profile only
    base.pop("extends", None)
    merged = _merge(base, raw)
    merged["extends"] = base_ref
    return merged


def _label(path: Path) -> str:
    return path.stem


def _merge(base: Any, over: Any, path: str = "") -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v, f"{path}.{k}" if path else k) if k in base else copy.deepcopy(v)
        return out
    if path == "backends" and isinstance(base, list) and isinstance(over, list):
        by_name = {b.get("name"): b for b in base if isinstance(b, dict)}
        return [
            _merge(by_name[b["name"]], b, "backend") if isinstance(b, dict) and b.get("name") in by_name else copy.deepcopy(b)
            for b in over
        ]
    return copy.deepcopy(over)


# ------------------------------------------------------------------------ detection


def _detect(raw: dict, path: Path, compute_capability: str | None) -> dict:
    mode = raw.pop("detect", None)
    label = raw.get("name") if isinstance(raw.get("name"), str) else path.stem
    src = _source(path)
    if compute_capability is not None and mode != "nvidia-gpu":
        raise ProfileError(
            label, None, "a compute capability can only be chosen for a profile with detect = 'nvidia-gpu'",
            file=src,
        )
    if mode is None:
        for key in ("gpu_variants", "default_compute_capability"):
            if key in raw:
                raise ProfileError(label, key, "only valid with detect = 'nvidia-gpu'", file=src)
        return raw
    if mode == "host":
        return _detect_host(raw)
    if mode == "nvidia-gpu":
        return _detect_nvidia(raw, label, compute_capability, src)
    raise ProfileError(label, "detect", f"expected one of 'host', 'nvidia-gpu', got {mode!r}", file=src)


def _table(raw: dict, key: str) -> dict:
    value = raw.get(key)
    if value is None:
        value = raw[key] = {}
    return value if isinstance(value, dict) else {}


def _detect_host(raw: dict) -> dict:
    info = _host.cpu_info()
    isa = _host.isa_flags()
    filled: list[str] = []

    def fill(table: dict, key: str, value: Any, path: str) -> None:
        if key not in table and value is not None:
            table[key] = value
            filled.append(path)

    fill(raw, "arch", _host.machine_arch(), "arch")
    hw = _table(raw, "hardware")
    fill(hw, "cpu_model", info["cpu_model"], "hardware.cpu_model")
    fill(hw, "cpu_core_type", info["cpu_core_type"], "hardware.cpu_core_type")
    fill(hw, "cpu_cores", info["cpu_cores"], "hardware.cpu_cores")
    fill(hw, "cpu_max_ghz", info["cpu_max_ghz"], "hardware.cpu_max_ghz")
    fill(hw, "isa", list(isa), "hardware.isa")
    fill(hw, "memory_gb", _host.memory_gb(), "hardware.memory_gb")
    peak = _table(raw, "peak")
    fill(peak, "cpu_fp32_gflops", _host.peak_cpu_gflops(info, isa), "peak.cpu_fp32_gflops")
    target = _host.llvm_target(info, isa)
    backends = raw.get("backends") if isinstance(raw.get("backends"), list) else []
    for i, b in enumerate(backends):
        if not isinstance(b, dict):
            continue
        opts = b.get("options")
        if not isinstance(opts, dict):
            continue
        if b.get("name") == "tvm" and isinstance(opts.get("target"), dict):
            t = opts["target"]
            if t.get("kind", "llvm") == "llvm":
                for key in ("mtriple", "mcpu", "mattr", "num-cores"):
                    fill(t, key, target.get(key), f"backends[{i}].options.target.{key}")
        if b.get("name") == "onnxruntime":
            fill(opts, "intra_op_threads", info["usable_cores"], f"backends[{i}].options.intra_op_threads")
    raw["detected"] = {
        "by": "host",
        "filled": filled,
        "usable_cores": info["usable_cores"],
        "x86_64_level": _host.x86_64_level() if _host.machine_arch() == "x86_64" else None,
    }
    return raw


def _parse_cc(value: str) -> tuple[str, str] | None:
    """'sm_86' / '8.6' / '86' / 'sm_90a' -> ('8.6', '') / ('9.0', 'a')."""
    m = _CC_ALIASES.match(value.strip().lower())
    if not m:
        return None
    major, minor, suffix = m.group(1), m.group(2), m.group(3)
    if minor is None:  # "86" / "sm_86" / "sm_100": last digit is the minor version
        if len(major) < 2:
            return None
        major, minor = major[:-1], major[-1]
    return f"{int(major)}.{int(minor)}", suffix


def _cc_key(cc: str) -> tuple[int, int]:
    major, minor = cc.split(".")
    return int(major), int(minor)


def _detect_nvidia(raw: dict, label: str, requested: str | None, src: str | None = None) -> dict:
    variants = raw.pop("gpu_variants", {}) or {}
    if not isinstance(variants, dict):
        raise ProfileError(label, "gpu_variants", f"expected a table, got {type_name(variants)}", file=src)
    by_cc: dict[str, tuple[str, dict]] = {}
    for key, table in variants.items():
        parsed = _parse_cc(key)
        if parsed is None or not key.startswith("sm_"):
            raise ProfileError(label, f"gpu_variants.{key}", "variant keys must look like 'sm_86'", file=src)
        if not isinstance(table, dict):
            raise ProfileError(label, f"gpu_variants.{key}", f"expected a table, got {type_name(table)}",
                               file=src)
        extra = set(table) - {"hardware", "peak", "software"}
        if extra:
            raise ProfileError(label, f"gpu_variants.{key}.{sorted(extra)[0]}",
                               "unknown key (allowed: hardware, peak, software)", file=src)
        by_cc[parsed[0]] = (key, table)

    gpus = [g for g in _host.nvidia_gpus() if g.get("compute_capability")] if requested is None else []
    if requested is not None:
        source, text = "requested", requested
    elif gpus:
        source, text = "nvidia-smi", gpus[0]["compute_capability"]
    else:
        source = "default"
        text = raw.pop("default_compute_capability", None)
        if text is None:
            text = (raw.get("hardware") or {}).get("gpu_compute_capability")
        if not isinstance(text, str):
            raise ProfileError(label, "default_compute_capability", "missing required field (detect = 'nvidia-gpu')",
                               file=src)
    raw.pop("default_compute_capability", None)
    parsed = _parse_cc(text)
    if parsed is None:
        field = "default_compute_capability" if source == "default" else None
        raise ProfileError(
            label, field, f"invalid compute capability {text!r} (expected e.g. '8.6', '86' or 'sm_86')",
            file=src if field else None,
        )
    cc, suffix = parsed
    detected: dict[str, Any] = {"by": "nvidia-gpu", "compute_capability": cc, "source": source}

    if by_cc:
        if cc in by_cc:
            chosen = cc
        else:
            lower = [k for k in by_cc if _cc_key(k) <= _cc_key(cc)]
            chosen = max(lower, key=_cc_key) if lower else min(by_cc, key=_cc_key)
        key, table = by_cc[chosen]
        detected["variant"] = key
        if chosen != cc:
            detected["peak_from"] = key
            detected["note"] = f"no variant for sm_{cc.replace('.', '')}; peak numbers borrowed from {key}"
        raw = _merge(raw, table)
        if chosen != cc:
            # Only the peak numbers are borrowed; the variant's GPU details are not ours.
            hw = _table(raw, "hardware")
            for k in ("gpu_cuda_cores", "gpu_tensor_cores", "gpu_memory_gb"):
                hw.pop(k, None)
            hw["gpu_name"] = f"NVIDIA sm_{cc.replace('.', '')} GPU (peak numbers of {hw.get('gpu_name') or key})"
    hw = _table(raw, "hardware")
    hw["gpu_compute_capability"] = cc
    hw["gpu_arch"] = _GPU_ARCH_BY_CC.get(cc, hw.get("gpu_arch"))
    if source == "nvidia-smi":
        hw["gpu_name"] = gpus[0]["name"]
        if gpus[0].get("memory_gb"):
            hw["gpu_memory_gb"] = gpus[0]["memory_gb"]
        detected["gpu_name"] = gpus[0]["name"]
    sm = "sm_" + cc.replace(".", "") + suffix
    for b in raw.get("backends") or []:
        if isinstance(b, dict) and b.get("name") == "tvm":
            t = (b.get("options") or {}).get("target")
            if isinstance(t, dict) and t.get("kind") == "cuda":
                t["arch"] = sm
    raw["detected"] = detected
    return raw
