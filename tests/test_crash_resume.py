"""Hardening: processes killed with SIGKILL.

* `pipeline train` killed (twice) after checkpoints appear resumes with `--resume` and ends with
  exactly the weights of an uninterrupted run (train/trainer.py resume is exact).
* `pipeline build` killed during export/compile leaves no half-written bundle, and the next
  build completes.

Real subprocesses, tiny runs (digits, 8x8, 2 epochs of 20 steps).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN = ["train", "--model", "resnet20_adn", "--data", "digits", "--epochs", "2",
         "--batch-size", "64", "--threads", "1", "--seed", "3"]


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_until(proc: subprocess.Popen, cond, what: str, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)  # only the process this test started
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _weights(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _run(args: list[str], env: dict, log: Path) -> None:
    proc = _start(args, env, log)
    rc = proc.wait(timeout=300)
    assert rc == 0, log.read_text()[-3000:]


def test_sigkilled_training_resumes_to_the_uninterrupted_weights(tmp_path, pipeline_env):
    import torch

    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train]\nsave_every_steps = 3\n")  # the CLI has no --save-every flag
    args = TRAIN + ["--config", str(recipe)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    log = tmp_path / "killed.log"

    ref = _start(args + ["--out", str(straight)], pipeline_env, tmp_path / "straight.log")
    # kill 1: as soon as the first mid-epoch checkpoint exists (step 3 of 20)
    proc = _start(args + ["--out", str(killed)], pipeline_env, log)
    ckpt = killed / "checkpoint.pt"
    _wait_until(proc, ckpt.exists, "the first checkpoint")
    _kill(proc)
    first = _weights(ckpt)  # a complete, loadable checkpoint despite the kill
    assert 3 <= first["global_step"] < 40 and not (killed / "model.pt").exists()
    # kill 2: after resuming, once epoch 1 has been recorded
    proc = _start(args + ["--out", str(killed), "--resume"], pipeline_env, log)
    _wait_until(proc, lambda: (killed / "metrics.jsonl").exists(), "the epoch-1 record")
    _kill(proc)
    second = _weights(ckpt)
    assert second["global_step"] >= first["global_step"] and not (killed / "model.pt").exists()
    # resume to the end
    _run(args + ["--out", str(killed), "--resume"], pipeline_env, log)
    assert ref.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    a, b = _weights(straight / "model.pt"), _weights(killed / "model.pt")
    assert a["global_step"] == b["global_step"] == 40
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert a["eval"]["full_depth_accuracy"] == b["eval"]["full_depth_accuracy"]
    assert "resumed" in log.read_text()


def test_resume_from_a_checkpoint_taken_at_the_last_step_of_an_epoch(tmp_path):
    import torch

    from train.checkpoint import load_checkpoint
    from train.config import TrainConfig
    from train.trainer import Trainer

    def cfg(out):
        return TrainConfig(model="resnet20_adn", data="digits", epochs=2, batch_size=64,
                           eval_batch_size=512, lr=0.05, optimizer="sgd", warmup_epochs=0.2, threads=1,
                           save_every_steps=4, out=str(out))

    class Killed(Exception):
        pass

    def killed_in_validation():
        raise Killed  # stands in for SIGKILL during the epoch-end validation

    t = Trainer(cfg(tmp_path / "k"), log=lambda _m: None)
    t.validate = killed_in_validation
    with pytest.raises(Killed):
        t.fit()
    state = load_checkpoint(tmp_path / "k" / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (0, t.steps_per_epoch)
    resumed = Trainer(cfg(tmp_path / "k"), log=lambda _m: None)
    resumed.fit(resume=True)
    straight = Trainer(cfg(tmp_path / "s"), log=lambda _m: None)
    straight.fit()
    for name, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[name]), name


# ---------------------------------------------------------------------------------------------
# pipeline build killed mid-way
# ---------------------------------------------------------------------------------------------

# Small, fast build settings (the build itself is pipeline/build.py; docs/build.md).
TINY_BUILD = """
[build]
archive = true
threads = 1
[export]
parity_samples = 4
[profile]
mode = "quick"
[calibrate]
limit = 100
[evaluate]
limit = 60
measure_limit = 20
warmup = 2
rules = ["max_prob"]
max_drops = [0.5]
"""


def _tmp_entries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def _check_no_partial_bundle(root: Path) -> None:
    """After a kill: nothing half-written where a finished build puts things."""
    assert not (root / "bundle").exists(), "a bundle directory appeared before the package stage"
    assert not list(root.glob("*.tar.gz")), list(root.glob("*.tar.gz"))
    state = json.loads((root / ".build-state.json").read_text())  # complete JSON (atomic)
    for name, rec in state.get("stages", {}).items():
        assert rec.get("input_hash") and "outputs" in rec, (name, rec)
    # anything else at the top level is a complete stage output or a temp entry the next
    # build removes
    allowed = {"build.toml", ".build-state.json", "work", "train"}
    for p in root.iterdir():
        assert p.name in allowed or ".tmp-" in p.name, p


@pytest.mark.skipif(not (ROOT / "pipeline" / "build.py").is_file(), reason="no pipeline build")
def test_sigkilled_build_leaves_no_partial_bundle_and_the_next_build_completes(tmp_path,
                                                                              pipeline_env):
    from train.config import TrainConfig
    from train.trainer import Trainer

    ckpt_dir = tmp_path / "ckpt"
    Trainer(TrainConfig(model="resnet20_adn", data="digits", epochs=1, batch_size=64,
                        max_steps=2, threads=1, warmup_epochs=0, out=str(ckpt_dir)),
            log=lambda _m: None).fit()
    (tmp_path / "tiny.toml").write_text(TINY_BUILD)
    args = ["build", "--device", "x86-host", "--checkpoint", str(ckpt_dir / "model.pt"),
            "--out", str(tmp_path / "out"), "--config", str(tmp_path / "tiny.toml")]
    root = tmp_path / "out" / "x86-host"
    log = tmp_path / "build.log"

    def logged(text: str):
        return lambda: log.is_file() and text in log.read_text()

    # kill 1: during export, once the first ONNX piece is written
    proc = _start(args, pipeline_env, log)
    _wait_until(proc, logged("export  stage0.full"), "the export stage")
    _kill(proc)
    _check_no_partial_bundle(root)
    assert _tmp_entries(root / "work"), "expected the export's temp directory (killed mid-way)"
    assert "export" not in json.loads((root / ".build-state.json").read_text())["stages"]

    # kill 2: the next build, during the profile stage (export and compile done)
    log.write_text("")
    proc = _start(args, pipeline_env, log)
    _wait_until(proc, logged("[4/8] profile"), "the profile stage", timeout=240)
    _kill(proc)
    _check_no_partial_bundle(root)
    done = json.loads((root / ".build-state.json").read_text())["stages"]
    assert {"export", "compile"} <= set(done) and "profile" not in done, sorted(done)

    # the third build completes, reusing what the killed ones finished
    log.write_text("")
    _run(args, pipeline_env, log)
    text = log.read_text()
    assert "[2/8] export: reused" in text and "[3/8] compile: reused" in text, text[-3000:]
    assert _tmp_entries(root) == [], _tmp_entries(root)

    from runtime import AdaptiveModel
    from runtime.archive import unpack_bundle
    from runtime.bundle import Bundle

    b = Bundle.open(root / "bundle")
    assert b.unlisted_files() == [] and b.manifest.stopping.rule
    AdaptiveModel.load(root / "bundle", runner_options={"intra_op_threads": 1})
    arc = next(root.glob("*.tar.gz"))
    out = unpack_bundle(arc, tmp_path / "deployed" / "b")
    assert Bundle.open(out).manifest == b.manifest
    assert (root / "report.json").is_file() and (root / "report.md").is_file()
