"""Hardening: every `pipeline` command given a missing file, a wrong device name or an unknown
model prints one clear `Error:` line on stderr and exits non-zero, without a traceback.

All cases run as real subprocesses (`python -m pipeline ...`), two at a time, once per module;
each parametrized test then checks its own case. click's usage errors (exit 2) print a
"Usage:" / "Try ... --help" hint around their single "Error:" line, which is allowed; nothing
else may appear on stderr except "note:" lines.
"""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from test_runtime import build_bundles

ROOT = Path(__file__).resolve().parents[1]
# case id -> (argv with {placeholders}, text the Error line must contain)
CASES: dict[str, tuple[list[str], str]] = {
    # train
    "train-missing-config": (["train", "--config", "{tmp}/missing.toml", "--out", "{tmp}/t"],
                             "missing.toml"),
    "train-unknown-model": (["train", "--model", "nosuch_adn", "--data", "digits",
                             "--out", "{tmp}/t"], "nosuch_adn"),
    # models
    "models-show-unknown-model": (["models", "show", "nosuch_adn"], "nosuch_adn"),
    # export
    "export-missing-checkpoint": (["export", "--checkpoint", "{tmp}/missing.pt",
                                   "--out", "{tmp}/e"], "missing.pt"),
    "export-unknown-model": (["export", "--checkpoint", "{unknown_ckpt}", "--out", "{tmp}/e"],
                             "nosuch_adn"),
    "export-garbage-checkpoint": (["export", "--checkpoint", "{garbage}", "--out", "{tmp}/e"],
                                  "garbage.pt"),
    # compile
    "compile-missing-bundle": (["compile", "--bundle", "{tmp}/nobundle", "--device", "x86-host"],
                               "nobundle"),
    "compile-unknown-device": (["compile", "--bundle", "{portable}", "--device", "nosuch-board",
                                "--out", "{tmp}/c"], "nosuch-board"),
    # engines
    "engines-missing-bundle": (["engines", "--bundle", "{tmp}/nobundle"], "nobundle"),
    # profile
    "profile-missing-bundle": (["profile", "--bundle", "{tmp}/nobundle"], "nobundle"),
    "profile-unknown-device": (["profile", "--bundle", "{host}", "--device", "nosuch-board",
                                "--quick", "--no-write", "--no-plot"], "nosuch-board"),
    "profile-estimate-unknown-device": (["profile", "--bundle", "{host}", "--estimate-only",
                                         "--device", "nosuch-board", "--no-write", "--no-plot"],
                                        "nosuch-board"),
    # calibrate
    "calibrate-missing-bundle": (["calibrate", "--bundle", "{tmp}/nobundle", "--max-drop", "1"],
                                 "nobundle"),
    "calibrate-unknown-device": (["calibrate", "--bundle", "{host_copy}", "--max-drop", "1",
                                  "--device", "nosuch-board", "--limit", "20"], "nosuch-board"),
    # predict
    "predict-missing-bundle": (["predict", "--bundle", "{tmp}/nobundle", "{npy}"], "nobundle"),
    "predict-missing-input": (["predict", "--bundle", "{host}", "{tmp}/missing.png"],
                              "missing.png"),
    "predict-unknown-device": (["predict", "--bundle", "{host}", "{npy}", "--device",
                                "nosuch-board"], "nosuch-board"),
    "predict-corrupt-bundle": (["predict", "--bundle", "{corrupt}", "{npy}"], "stage1.full.onnx"),
    # run
    "run-missing-bundle": (["run", "--bundle", "{tmp}/nobundle"], "nobundle"),
    "run-unknown-device": (["run", "--bundle", "{host}", "--device", "nosuch-board", "--limit",
                            "5"], "nosuch-board"),
    "run-missing-data-root": (["run", "--bundle", "{host}", "--data", "mnist", "--data-root",
                               "{tmp}/nowhere"], "nowhere"),  # see MULTILINE
    # devices
    "devices-show-unknown-device": (["devices", "show", "nosuch-board"], "nosuch-board"),
    "devices-show-missing-profile-file": (["devices", "show", "--profile",
                                           "{tmp}/missing.toml"], "missing.toml"),
    "devices-estimate-unknown-device": (["devices", "estimate", "nosuch-board", "--macs", "1",
                                         "--bytes", "1"], "nosuch-board"),
    # benchmark, inspect, doctor
    "benchmark-missing-bundle": (["benchmark", "--bundle", "{tmp}/nobundle"], "nobundle"),
    "inspect-missing-bundle": (["inspect", "{tmp}/nobundle"], "nobundle"),
    "doctor-missing-bundle": (["doctor", "{tmp}/nobundle"], "nobundle"),
    # build
    "build-missing-checkpoint": (["build", "--checkpoint", "{tmp}/missing.pt",
                                  "--out", "{tmp}/b"], "missing.pt"),
    "build-missing-config": (["build", "--config", "{tmp}/missing.toml", "--out", "{tmp}/b"],
                             "missing.toml"),
    "build-unknown-device": (["build", "--device", "nosuch-board", "--out", "{tmp}/b"],
                             "nosuch-board"),
    "build-unknown-model": (["build", "--model", "nosuch_adn", "--data", "digits",
                             "--out", "{tmp}/b"], "nosuch_adn"),
}
# A data set that is not found gets a multi-line message: the Error line names the data set,
# the following lines list where it looked and how to install it.
MULTILINE = {"run-missing-data-root": "mnist: IDX files not found"}
XFAIL: dict = {}  # case id -> pytest.mark.xfail(strict=True, ...) for a reported bug
COMMANDS = {"train", "models", "export", "compile", "engines", "profile", "calibrate", "predict",
            "run", "devices", "benchmark", "inspect", "doctor", "build"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, pipeline_env_module) -> dict[str, subprocess.CompletedProcess]:
    import shutil

    import torch

    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "bundles").mkdir()
    portable, host = build_bundles(tmp / "bundles")
    host_copy = tmp / "host-copy"  # calibrate would write into it if it ever succeeded
    shutil.copytree(host, host_copy)
    corrupt = tmp / "corrupt"
    shutil.copytree(host, corrupt)
    f = corrupt / "onnxruntime" / "x86_64-cpu" / "stage1.full.onnx"
    f.write_bytes(f.read_bytes()[:-1] + b"X")
    np.save(tmp / "x.npy", np.zeros((28, 28), np.uint8))
    torch.save({"format": 1, "model_name": "nosuch_adn", "model_config": {}, "model": {},
                "dataset": {}, "config": {}}, tmp / "unknown.pt")
    (tmp / "garbage.pt").write_bytes(b"this is not a checkpoint")
    subs = {"tmp": str(tmp), "portable": str(portable), "host": str(host),
            "host_copy": str(host_copy), "corrupt": str(corrupt), "npy": str(tmp / "x.npy"),
            "unknown_ckpt": str(tmp / "unknown.pt"), "garbage": str(tmp / "garbage.pt")}

    def run(case: str) -> subprocess.CompletedProcess:
        argv = [a.format(**subs) for a in CASES[case][0]]
        return subprocess.run([sys.executable, "-m", "pipeline", *argv], capture_output=True,
                              text=True, env=pipeline_env_module, cwd=ROOT, timeout=180)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CASES, pool.map(run, CASES)))


@pytest.fixture(scope="module")
def pipeline_env_module() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_every_command_is_covered():
    assert {argv[0] for argv, _ in CASES.values()} == COMMANDS
    from pipeline.cli import cli

    assert set(cli.commands) == COMMANDS, sorted(cli.commands)


@pytest.mark.parametrize("case", [pytest.param(c, marks=XFAIL[c]) if c in XFAIL else c
                                  for c in CASES])
def test_bad_input_gives_one_clear_error_line(outcomes, case):
    proc = outcomes[case]
    needle = CASES[case][1]
    err = proc.stderr
    assert proc.returncode != 0, f"exit 0\nstdout: {proc.stdout[-500:]}\nstderr: {err[-500:]}"
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1, err
    if case in MULTILINE:
        assert MULTILINE[case] in errors[0] and needle in err, err
        return
    assert needle in errors[0], (needle, errors[0])
    others = [ln for ln in lines if not ln.startswith(("Error:", "Usage:", "Try '", "note:"))]
    if proc.returncode == 2:  # click usage error
        assert lines[0].startswith("Usage:"), err
    assert not others, f"extra stderr lines: {others}"


# ------------------------------------------------------------------------------------------------
# config values of the wrong type, programming errors, --debug
# ------------------------------------------------------------------------------------------------

def _pipeline(*argv: object, env: dict[str, str], code: str | None = None,
              debug_env: str | None = None) -> subprocess.CompletedProcess:
    """``python -m pipeline ARGV`` (or ``python -c CODE ARGV``) from the repository root."""
    env = dict(env)
    env.pop("PIPELINE_DEBUG", None)
    if debug_env is not None:
        env["PIPELINE_DEBUG"] = debug_env
    head = ["-m", "pipeline"] if code is None else ["-c", code]
    return subprocess.run([sys.executable, *head, *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=180)


def _the_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error (exit 1, no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def test_config_value_of_wrong_type_names_file_and_field(tmp_path, pipeline_env_module):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[train]\nepochs = "6"\n')
    line = _the_error_line(_pipeline("train", "--config", recipe, "--out", tmp_path / "t",
                                     env=pipeline_env_module))
    assert line == f"Error: {recipe}: train.epochs: expected an integer, got string"
    assert not (tmp_path / "t").exists()


def test_build_config_refuses_a_float_count_and_an_unknown_key(tmp_path, pipeline_env_module):
    cfg = tmp_path / "build.toml"
    cfg.write_text("[train]\nbatch_size = 12.5\n")
    line = _the_error_line(_pipeline("build", "--config", cfg, "--out", tmp_path / "b",
                                     "--dry-run", env=pipeline_env_module))
    assert line == f"Error: {cfg}: train.batch_size: expected an integer, got number"
    cfg.write_text("[evaluate]\nlimt = 5\n")
    line = _the_error_line(_pipeline("build", "--config", cfg, "--out", tmp_path / "b",
                                     "--dry-run", env=pipeline_env_module))
    assert line.startswith(f"Error: {cfg}: evaluate.limt: unknown key (allowed: ")
    assert "limit" in line and "measure_limit" in line
    assert not (tmp_path / "b").exists()


def test_profile_of_wrong_type_names_file_and_field(tmp_path, pipeline_env_module):
    profile = tmp_path / "my-board.toml"
    profile.write_text('name = "my-board"\narch = "aarch64"\nlatency_budget_ms = 40.0\n'
                       '[hardware]\ncpu_model = "A76"\ncpu_cores = "4"\nmemory_gb = 4\n'
                       '[peak]\ncpu_fp32_gflops = 100.0\nmemory_bandwidth_gbs = 10.0\n'
                       '[[backends]]\nname = "onnxruntime"\n')
    env = {**pipeline_env_module, "PIPELINE_PROFILE_DIR": str(tmp_path / "none")}
    line = _the_error_line(_pipeline("devices", "show", profile, env=env))
    assert line == f"Error: {profile.resolve()}: hardware.cpu_cores: expected an integer, got string"


# A bug inside a command: train.config.build_config raises KeyError('cfg').
_BUG = """
import sys
import train.config

def build_config(*args, **kwargs):
    raise KeyError("cfg")

train.config.build_config = build_config
from pipeline.cli import main
main()
"""


def test_a_programming_error_keeps_its_traceback(tmp_path, pipeline_env_module):
    proc = _pipeline("train", "--out", tmp_path / "t", code=_BUG, env=pipeline_env_module)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.rstrip().endswith("KeyError: 'cfg'"), proc.stderr[-2000:]
    assert not [ln for ln in proc.stderr.splitlines() if ln.startswith("Error:")], proc.stderr


def test_a_programming_error_in_a_sub_group_keeps_its_traceback(monkeypatch):
    """In-process (click's CliRunner): the exception reaches the caller unchanged, also through
    the nested `models` and `devices` groups."""
    from click.testing import CliRunner

    import devices.registry
    import train.models
    from pipeline.cli import cli

    def bug(*args, **kwargs):
        raise KeyError("cfg")

    monkeypatch.setattr(train.models, "model_summary", bug)
    monkeypatch.setattr(devices.registry, "list_profiles", bug)
    monkeypatch.setattr("pipeline.devices_cli.list_profiles", bug)
    for argv in (["models", "show", "resnet20_adn"], ["devices"]):
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 1 and isinstance(result.exception, KeyError), argv
        assert "Error:" not in result.output, (argv, result.output)


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, pipeline_env_module):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[train]\nepochs = "6"\n')
    argv = ("train", "--config", recipe, "--out", tmp_path / "t")
    needle = f"ConfigError: {recipe}: train.epochs: expected an integer, got string"
    for proc in (_pipeline("--debug", *argv, env=pipeline_env_module),
                 _pipeline(*argv, env=pipeline_env_module, debug_env="1")):
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.rstrip().endswith(needle), proc.stderr[-2000:]
    # PIPELINE_DEBUG=0 is off
    line = _the_error_line(_pipeline(*argv, env=pipeline_env_module, debug_env="0"))
    assert line == f"Error: {recipe}: train.epochs: expected an integer, got string"
