"""One validation helper (runtime.validate.Validator) for train/build configs, device profiles and
rule parameters: every field is type-checked and an error is a ConfigError (a PipelineError and a
ValueError) whose message names the file and the field. Plus the error hierarchy the CLI relies on
(pipeline.errors.is_user_error)."""
from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest

from runtime.errors import ConfigError, PipelineError
from runtime.validate import Validator


def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def _config_error(fn, *args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        fn(*args, **kw)
    err = ei.value
    assert isinstance(err, PipelineError) and isinstance(err, ValueError)
    assert "\n" not in str(err)
    return err


# ---------------------------------------------------------------------------------- Validator

def test_validator_types_and_ranges():
    v = Validator("recipe.toml")
    assert v.int_(3, "train.epochs", lo=1) == 3
    for bad, got in [("6", "string"), (12.5, "number"), (True, "boolean"), (None, "null")]:
        err = _config_error(v.int_, bad, "train.epochs")
        assert str(err) == f"recipe.toml: train.epochs: expected an integer, got {got}"
        assert (err.file, err.field) == ("recipe.toml", "train.epochs")
    assert "expected a number < 1, got 1" in str(_config_error(v.num, 1, "x", hi=1, hi_open=True))
    assert "expected a number <= 1, got 1.5" in str(_config_error(v.num, 1.5, "x", hi=1))
    assert v.num(0.999, "x", lo=0, lo_open=True, hi=1, hi_open=True) == 0.999
    assert v.opt_int(None, "x") is None and v.opt_int(2, "x", lo=1) == 2
    assert v.list_of([1, 2], "b", v.int_) == [1, 2]
    assert str(_config_error(v.list_of, [1, "2"], "b", v.int_)) == \
        "recipe.toml: b[1]: expected an integer, got string"
    assert v.keys({"a": 1}, "t", ["a", "b"]) == {"a": 1}
    assert str(_config_error(v.keys, {"c": 1}, "t", ["a", "b"])) == \
        "recipe.toml: t.c: unknown key (allowed: a, b)"
    v.check(True, "x", "never")
    assert str(_config_error(v.check, False, "x", "why")) == "recipe.toml: x: why"


def test_config_error_pickles():
    err = ConfigError("a.toml", "train.lr", "expected a number, got string")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ConfigError and str(again) == str(err) and again.field == "train.lr"


# -------------------------------------------------------------------------------- train config

def test_train_config_file_is_type_checked(tmp_path):
    from train.config import build_config

    f = tmp_path / "recipe.toml"
    cases = {
        'epochs = "6"': "train.epochs: expected an integer, got string",
        "batch_size = 12.5": "train.batch_size: expected an integer, got number",
        "lr = true": "train.lr: expected a number, got boolean",
        'augment = "yes"': "train.augment: expected true or false, got string",
        "model = 3": "train.model: expected a string, got integer",
        'optimizer = "adam"': "train.optimizer: expected one of 'sgd', 'adamw', got 'adam'",
        "epochs = 0": "train.epochs: expected an integer >= 1, got 0",
        "val_fraction = 1.0": "train.val_fraction: expected a number < 1, got 1.0",
        'exit_weights = [1.0, "x"]': "train.exit_weights[1]: expected a number, got string",
        'bf16 = "on"': "train.bf16: expected true, false or \"auto\", got 'on'",
    }
    for line, expected in cases.items():
        f.write_text(f"[train]\n{line}\n")
        err = _config_error(build_config, f)
        assert str(err) == f"{f}: {expected}", line
        assert err.file == str(f)


def test_train_config_unknown_key_lists_the_allowed_ones(tmp_path):
    from train.config import build_config

    f = _write(tmp_path / "recipe.toml", "[train]\nepochz = 3\n")
    msg = str(_config_error(build_config, f))
    assert msg.startswith(f"{f}: train.epochz: unknown key (allowed: ")
    assert "epochs" in msg and "batch_size" in msg
    # a file without a [train] table: its top-level keys are the options
    g = _write(tmp_path / "flat.yaml", "epochs: six\n")
    pytest.importorskip("yaml")
    assert str(_config_error(build_config, g)) == f"{g}: epochs: expected an integer, got string"


def test_train_config_options_override_the_file(tmp_path):
    from train.config import TrainConfig, build_config

    f = _write(tmp_path / "recipe.toml", "[train]\nepochs = 2\nwarmup_epochs = 3\n")
    # the file alone is inconsistent, an option fixes it
    assert build_config(f, warmup_epochs=0.5).warmup_epochs == 0.5
    assert "train.warmup_epochs: expected a number < epochs (2), got 3" in str(
        _config_error(build_config, f))
    assert str(_config_error(TrainConfig, epochs=0)) == \
        "train config: epochs: expected an integer >= 1, got 0"
    assert str(_config_error(build_config, None, lr=-1.0)) == \
        "command-line options: lr: expected a number > 0, got -1.0"


def test_train_config_bad_file_format(tmp_path):
    from train.config import build_config

    f = _write(tmp_path / "recipe.toml", "[train\n")
    assert "invalid TOML" in str(_config_error(build_config, f))
    j = _write(tmp_path / "recipe.json", "[1, 2]")
    assert str(_config_error(build_config, j)).startswith(f"{j}: top level must be a table")
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        build_config(tmp_path / "missing.toml")


# -------------------------------------------------------------------------------- build config

def test_build_config_file_is_type_checked(tmp_path):
    from pipeline.build_config import build_config

    f = tmp_path / "build.toml"
    cases = {
        '[evaluate]\nlimit = "5"': "evaluate.limit: expected an integer, got string",
        "[evaluate]\nbatch_size = 12.5": "evaluate.batch_size: expected an integer, got number",
        '[train]\nepochs = "6"': "train.epochs: expected an integer, got string",
        "[calibrate]\nmax_dorp = 1.0": "calibrate.max_dorp: unknown key (allowed: epsilon, limit, "
                                      "max_drop, mean_budget_ms, risk_delta, rule, skip_config)",
        '[calibrate]\nrule = "nope"': "calibrate.rule: expected one of 'max_prob', 'entropy', "
                                     "'patience', 'lookahead', 'full', 'router', got 'nope'",
        "[calibrate]\nepsilon = 0.7": "calibrate.epsilon: expected a number <= 0.5, got 0.7",
        '[build]\nprecision = "int4"': "build.precision: expected one of 'auto', 'fp32', 'int8', "
                                       "got 'int4'",
        '[export]\nexit_norms = "mixed"': "export.exit_norms: expected one of 'per-path', "
                                          "'per-variant', 'shared', got 'mixed'",
        '[export]\ngranularity = "split"': "export.exit_norms: 'per-path' needs granularity "
                                           "'stage' (got 'split')",
        "[profile]\nbatches = [2, 4]": "profile.batches: must include 1",
        '[build]\nbackends = ["onnxruntime", "x"]': "build.backends[1]: unknown backend 'x'",
        "[build]\narchive = 1": "build.archive: expected true or false, got integer",
        "[acceptance]\nbudget_percentile = 101": "acceptance.budget_percentile: expected a number "
                                                 "<= 100, got 101",
        "[calibrat]\nx = 1": "calibrat: unknown key (allowed: acceptance, build, calibrate, "
                             "evaluate, export, profile, train)",
        "build = 3": "build: expected an object, got integer",
    }
    for text, expected in cases.items():
        f.write_text(text + "\n")
        err = _config_error(build_config, f)
        assert str(err).startswith(f"{f}: {expected}"), (text, str(err))


def test_build_config_overrides_and_round_trip(tmp_path):
    from pipeline.build_config import build_config

    f = _write(tmp_path / "build.toml", """
        [build]
        backends = "onnxruntime, tvm"
        [profile]
        batches = [4, 1, 4]
        [train]
        epochs = 2
        warmup_epochs = 3
    """)
    cfg = build_config(f, {"train.warmup_epochs": 0.5})
    assert cfg.build.backends == ["onnxruntime", "tvm"] and cfg.profile.batches == [1, 4]
    (tmp_path / "again.toml").write_text(cfg.to_toml())
    assert build_config(tmp_path / "again.toml") == cfg
    # the file alone is inconsistent (warmup_epochs >= epochs): named once the options are in
    assert str(_config_error(build_config, f)) == \
        f"{f}: train.warmup_epochs: expected a number < epochs (2), got 3"
    err = _config_error(build_config, f, {"train.warmup_epochs": 0.5, "evaluate.limit": -1})
    assert str(err) == f"{f} with command-line options: evaluate.limit: expected an integer " \
                       ">= 0, got -1"
    assert str(_config_error(build_config, None, {"calibrate.max_drop": -2.0})) == \
        "command-line options: calibrate.max_drop: expected a number >= 0, got -2.0"


# ---------------------------------------------------------------------------- device profiles

PROFILE = """
    schema_version = 1
    name = "my-board"
    arch = "aarch64"
    latency_budget_ms = 40.0

    [hardware]
    cpu_model = "Arm Cortex-A76"
    cpu_cores = 4
    memory_gb = 4

    [peak]
    cpu_fp32_gflops = 100.0
    memory_bandwidth_gbs = 10.0

    [[backends]]
    name = "onnxruntime"
"""


@pytest.fixture
def profile_dir(tmp_path, monkeypatch):
    empty = tmp_path / "no-user-profiles"
    empty.mkdir()
    monkeypatch.setenv("PIPELINE_PROFILE_DIR", str(empty))
    return tmp_path


def test_profile_wrong_type_names_file_and_field(profile_dir):
    from devices.profile import ProfileError
    from devices.registry import load_profile

    good = _write(profile_dir / "my-board.toml", PROFILE)
    assert load_profile(str(good)).hardware.cpu_cores == 4
    cases = {
        ("cpu_cores = 4", 'cpu_cores = "4"'): "hardware.cpu_cores: expected an integer, got string",
        ("memory_gb = 4", 'memory_gb = "4 GB"'): "hardware.memory_gb: expected a number, got string",
        ("latency_budget_ms = 40.0", "latency_budget_ms = 0"):
            "latency_budget_ms: expected a number > 0, got 0",
        ("cpu_cores = 4", "cpu_cores = 4\ncores = 4"): "hardware.cores: unknown key (allowed: ",
    }
    for (old, new), expected in cases.items():
        bad = _write(profile_dir / "bad.toml", PROFILE.replace(old, new))
        with pytest.raises(ProfileError) as ei:
            load_profile(str(bad))
        err = ei.value
        assert isinstance(err, ConfigError) and isinstance(err, PipelineError)
        assert str(err).startswith(f"{bad.resolve()}: {expected}"), str(err)
        assert err.file == str(bad.resolve()) and err.profile == "my-board"
        again = pickle.loads(pickle.dumps(err))
        assert type(again) is ProfileError and str(again) == str(err)


def test_profile_not_found_is_a_lookup_and_config_error(profile_dir):
    from devices.profile import ProfileNotFoundError
    from devices.registry import load_profile

    with pytest.raises(ProfileNotFoundError) as ei:
        load_profile("no-such-board")
    err = ei.value
    assert isinstance(err, LookupError) and isinstance(err, PipelineError)
    assert str(err).startswith("unknown device profile 'no-such-board'; available: ")
    assert pickle.loads(pickle.dumps(err)).available == err.available


# ----------------------------------------------------------------------------- rule parameters

@pytest.mark.parametrize("name,params,expected", [
    ("max_prob", {"thresholds": 1.5},
     "stopping rule 'max_prob': params['thresholds']: expected a number <= 1, got 1.5"),
    ("patience", {"patience": 2.5},
     "stopping rule 'patience': params['patience']: expected an integer, got number"),
    ("patience", {"patience": "2"},
     "stopping rule 'patience': params['patience']: expected an integer, got string"),
    ("max_prob", [0.9], "stopping rule 'max_prob': params: expected a JSON object, got array"),
    ("max_prob", {"thresholds": 0.9, "x": 1},
     "stopping rule 'max_prob': params: unknown parameter 'x' (allowed: thresholds)"),
    ("nope", {}, "stopping rule: name: unknown stopping rule 'nope'"),
])
def test_rule_parameters_are_config_errors(name, params, expected):
    from runtime.rules import make_rule

    assert str(_config_error(make_rule, name, params)).startswith(expected)


def test_rule_parameters_accept_numpy_numbers():
    import numpy as np

    from runtime.rules import make_rule

    rule = make_rule("patience", {"patience": np.int64(3), "min_confidence": np.float32(0.5)})
    assert rule.params() == {"patience": 3, "min_confidence": 0.5}


# ------------------------------------------------------------------------- the error hierarchy

def test_domain_errors_are_pipeline_errors(tmp_path):
    from train.checkpoint import CheckpointError, load_checkpoint
    from train.data import CIFARFormatError, DataError, DataNotFoundError, IDXFormatError, load_dataset

    assert IDXFormatError is DataError and CIFARFormatError is DataError
    assert issubclass(DataError, PipelineError) and issubclass(DataError, ValueError)
    assert issubclass(DataNotFoundError, DataError) and issubclass(DataNotFoundError, FileNotFoundError)
    with pytest.raises(DataError, match="unknown dataset 'nosuch'"):
        load_dataset("nosuch")
    with pytest.raises(DataError, match="bad synthetic option 'classes=x'"):
        load_dataset("synthetic:classes=x")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    assert issubclass(CheckpointError, PipelineError) and issubclass(CheckpointError, ValueError)


def test_is_user_error():
    from pipeline.errors import is_user_error

    assert is_user_error(ConfigError("a.toml", "x", "bad"))
    assert is_user_error(FileNotFoundError(2, "No such file", "x.toml"))
    assert is_user_error(IsADirectoryError(21, "Is a directory", "x"))
    assert is_user_error(PermissionError(13, "Permission denied", "x"))
    for exc in (KeyError("cfg"), LookupError("x"), IndexError(0), TypeError("x"),
                AttributeError("x"), RuntimeError("x"), OSError(28, "No space left on device")):
        assert not is_user_error(exc), exc
    try:
        raise ValueError("a bug")  # a plain ValueError from anywhere but a listed raise site
    except ValueError as exc:
        assert not is_user_error(exc)
