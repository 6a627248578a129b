"""Shared test set-up: deterministic, thread-limited torch (2-core machines)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:  # runtime-only environments
        yield
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture
def pipeline_env() -> dict[str, str]:
    """Environment for running `python -m pipeline` in a subprocess from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def python() -> str:
    return sys.executable


# The full suite loads TVM's runtime, torch, onnxruntime and many ONNX Runtime / TVM sessions into
# one process; on this machine CPython's teardown of those native libraries segfaults *after* every
# test has run and the summary is printed (exit 139 with all tests passed). Leave with pytest's own
# status before the interpreter tears them down. Tests themselves are unaffected.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _EXIT_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
