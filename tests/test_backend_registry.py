"""One backend registry: every backend is one runtime module and one export module with the
same interface, and no other table of backends or architecture names exists in the code."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from runtime.backends import ARTIFACT_BACKENDS, BACKENDS, PORTABLE, REGISTRY, backend_info
from runtime.host import ARCH_ALIASES, machine_arch, normalize_arch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "export", "devices", "pipeline", "train")
RUNTIME_API = ("open_runner", "why_unusable")
EXPORT_API = ("check_profile", "target_name", "compile_piece", "deployment", "can_verify_here")


def _sources():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("name", BACKENDS)
def test_each_backend_has_both_modules_with_the_interface(name):
    info = REGISTRY[name]
    runtime_mod = importlib.import_module(info.runtime_module)
    export_mod = importlib.import_module(info.export_module)
    for fn in RUNTIME_API:
        assert callable(getattr(runtime_mod, fn, None)), (info.runtime_module, fn)
    for fn in EXPORT_API:
        assert callable(getattr(export_mod, fn, None)), (info.export_module, fn)
    assert info.runner_options, name


def test_portable_onnx_runs_with_onnxruntime():
    assert ARTIFACT_BACKENDS == (PORTABLE, *BACKENDS)
    assert backend_info(PORTABLE) is REGISTRY["onnxruntime"]
    with pytest.raises(KeyError, match="unknown backend 'cuda'"):
        backend_info("cuda")


def test_no_second_table_of_backends_or_architectures():
    """Module-level ``*BACKENDS = (...)`` tuples and architecture alias tables exist only in
    the registry and runtime/host.py; everything else imports them."""
    tables, aliases = [], []
    for path in _sources():
        tree = ast.parse(path.read_text(), str(path))
        rel = path.relative_to(ROOT).as_posix()
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
                if any(n.endswith("BACKENDS") for n in names) and isinstance(
                        node.value, (ast.Tuple, ast.List, ast.Set)):
                    tables.append(rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict) and any(
                    isinstance(k, ast.Constant) and k.value == "arm64" for k in node.keys):
                aliases.append(rel)
    assert tables == ["runtime/backends/__init__.py"], tables
    assert aliases == ["runtime/host.py"], aliases


def test_backend_tables_keep_the_registry_names():
    """No module imports one of the registry's tables under another table's name (``from
    runtime.backends import ARTIFACT_BACKENDS as BACKENDS`` made ``BACKENDS`` mean two tuples)."""
    renamed = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                renamed += [f"{path.relative_to(ROOT).as_posix()}: {a.name} as {a.asname}"
                            for a in node.names if a.name.endswith("BACKENDS")
                            and a.asname not in (None, a.name)]
    assert renamed == [], renamed


def test_architecture_names():
    assert machine_arch() in ("x86_64", "aarch64", "arm", *ARCH_ALIASES.values())
    assert [normalize_arch(n) for n in ("AMD64", "arm64", "aarch64", "armv8l", "armv7l",
                                        "aarch64_be", "riscv64")] == \
        ["x86_64", "aarch64", "aarch64", "arm", "arm", "aarch64_be", "riscv64"]
