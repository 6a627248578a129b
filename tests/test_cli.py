"""The `pipeline` command line: help, models, train errors, and 2-process DDP training."""
from __future__ import annotations

import json
import subprocess

from click.testing import CliRunner

from pipeline.cli import cli


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "models"):
        assert command in result.output


def test_models_table_and_show_json():
    result = invoke("models")
    assert result.exit_code == 0
    for name in ("resnet20_adn", "resnet32_adn", "resnet56_adn", "resnet18_adn", "resnet34_adn",
                 "resnet50_adn", "vit_tiny_adn", "vit_b16_adn"):
        assert name in result.output
    result = invoke("models", "show", "resnet20_adn", "--input-size", "28", "--in-chans", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert {"name", "params", "stages", "skip_configs"} <= set(summary)
    assert summary["stages"] == 3 and len(summary["skip_configs"]) == 8
    first = summary["skip_configs"][0]
    assert first["skip"] == [False, False, False] and len(first["macs_per_exit"]) == 3
    text = invoke("models", "show", "resnet20_adn", "--input-size", "28", "--in-chans", "1")
    assert "TTT" in text.output and text.exit_code == 0


def test_bad_arguments_give_one_clear_line(tmp_path, python, pipeline_env):
    cases = [
        (["train", "--model", "resnet999", "--data", "digits"], "resnet999"),
        (["train", "--data", "fashion-mnist", "--data-root", str(tmp_path / "nowhere")], "nowhere"),
        (["models", "show", "nosuchmodel"], "nosuchmodel"),
        (["train", "--config", str(tmp_path / "missing.toml")], "missing.toml"),
    ]
    for args, needle in cases:
        proc = subprocess.run([python, "-m", "pipeline", *args, "--out", str(tmp_path / "o")]
                              if args[0] == "train" else [python, "-m", "pipeline", *args],
                              capture_output=True, text=True, env=pipeline_env, timeout=120)
        assert proc.returncode != 0, args
        assert "Traceback" not in proc.stderr, proc.stderr
        assert needle in proc.stderr, (args, proc.stderr)
        assert proc.stderr.strip().startswith("Error:"), proc.stderr


def test_two_process_ddp_training(tmp_path, python, pipeline_env):
    out = tmp_path / "ddp"
    proc = subprocess.run([python, "-m", "pipeline", "train", "--nproc", "2", "--model", "resnet20_adn",
                           "--data", "digits", "--epochs", "1", "--batch-size", "32", "--out", str(out)],
                          capture_output=True, text=True, env=pipeline_env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["world_size"] == 2
    assert (out / "model.pt").is_file()
    assert "Test accuracy of every exit" in proc.stdout
