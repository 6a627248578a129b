"""Real training steps: loss goes down on real data, resume is exact, checkpoints are safe."""
from __future__ import annotations

import json

import pytest
import torch

from train.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from train.config import TrainConfig, build_config
from train.evaluate import evaluate_configs
from train.trainer import Trainer


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="resnet20_adn", data="digits", epochs=2, batch_size=64, eval_batch_size=512,
                lr=3e-3, warmup_epochs=0.2, out=str(tmp_path / "run"), threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_steps_on_fashion_mnist_lower_the_loss(tmp_path):
    cfg = _cfg(tmp_path, data="fashion-mnist", epochs=1, batch_size=64, max_steps=30, lr=3e-3,
               warmup_epochs=0, depth_lambda=0.1)
    trainer = Trainer(cfg, log=lambda _m: None)
    images, labels = trainer.data.train.get_batch(torch.arange(256))
    x = trainer._prepare(images, 0)

    def loss_on_fixed_batch() -> float:
        trainer.step_module.eval()
        with torch.no_grad():
            s, b, inc, _ = trainer.step_module(x)
            return float(trainer.loss_fn(s, b, labels, inc)[0])

    before = loss_on_fixed_batch()
    stats = trainer.train_epoch()  # stops after max_steps
    after = loss_on_fixed_batch()
    assert trainer.global_step == 30
    assert after < before - 0.2, (before, after)
    for key in ("loss", "ce_super", "kl_base", "l_depth", "expected_exit", "train_acc"):
        assert key in stats and stats[key] == stats[key], key  # present and not NaN


@pytest.mark.parametrize("mixed_subnets", [0, 2])
def test_resume_reproduces_uninterrupted_run(tmp_path, mixed_subnets):
    straight = Trainer(_cfg(tmp_path / "a", mixed_subnets=mixed_subnets), log=lambda _m: None)
    straight.fit()
    # Same run, killed mid-way through the second epoch (max_steps), then resumed.
    steps_per_epoch = straight.steps_per_epoch
    interrupted = Trainer(_cfg(tmp_path / "b", max_steps=steps_per_epoch + 3, mixed_subnets=mixed_subnets),
                          log=lambda _m: None)
    interrupted.fit()
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["step_in_epoch"] == 3
    resumed = Trainer(_cfg(tmp_path / "b", mixed_subnets=mixed_subnets), log=lambda _m: None)
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed.global_step == straight.global_step == 2 * steps_per_epoch


def test_final_checkpoint_rebuilds_model_and_eval(tmp_path):
    trainer = Trainer(_cfg(tmp_path, epochs=1, ema=True), log=lambda _m: None)
    summary = trainer.fit()
    model, state = model_from_checkpoint(tmp_path / "run" / "model.pt")
    assert state["dataset"]["class_names"] == [str(i) for i in range(10)]
    assert set(summary["test"]) == {"FFF", "FFT", "FTF", "FTT", "TFF", "TFT", "TTF", "TTT"}
    x = torch.randn(2, 1, 8, 8)
    assert len(model(x)) == 3
    assert (tmp_path / "run" / "exits.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["test"] == summary["test"]
    # The rebuilt (EMA) model reproduces the recorded test accuracy of every exit.
    again = evaluate_configs(model, trainer.data.test, trainer.data.mean, trainer.data.std,
                             [(False,) * 3, (True,) * 3])
    assert again["FFF"]["accuracy_per_exit"] == summary["test"]["FFF"]["accuracy_per_exit"]
    assert again["TTT"]["accuracy_per_exit"] == summary["test"]["TTT"]["accuracy_per_exit"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss", "ce_super", "kl_base", "val_super", "val_base", "train_acc", "lr"):
        assert key in record, key
    assert len(record["val_super"]) == len(record["val_base"]) == model.num_stages


def test_checkpoint_refuses_garbage_and_pickles(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(bad)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": 1, "x": Evil()}, evil)
    with pytest.raises(ValueError, match="evil.pt"):
        load_checkpoint(evil)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"v": torch.ones(2)}, path)
    import train.checkpoint as ck

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "atomic_write_bytes", boom)
    with pytest.raises(OSError):
        save_checkpoint({"v": torch.zeros(2)}, path)
    assert torch.equal(load_checkpoint(path)["v"], torch.ones(2))


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="alpha"):
        TrainConfig(alpha=1.5)
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochz = 3\n")
    with pytest.raises(ValueError, match="epochz"):
        build_config(f)
    f.write_text("[train]\nepochs = 3\nlr = 0.2\n")
    cfg = build_config(f, lr=0.3, model=None)
    assert (cfg.epochs, cfg.lr) == (3, 0.3)


def test_depth_loss_switch_and_lambda_zero(tmp_path):
    """depth_loss = false drops L_depth; lambda = 0 keeps its stopping-weighted cross-entropy
    (without the cost); the new options reach the loss."""
    from train.trainer import Trainer

    common = dict(data="synthetic:chans=1,size=28", epochs=1, max_steps=1, batch_size=16,
                  warmup_epochs=0, out=str(tmp_path / "r"))
    assert Trainer(TrainConfig(depth_loss=False, **common)).loss_fn.depth is None
    fn = Trainer(TrainConfig(depth_lambda=0.0, distill_from="final", depth_on="super+base",
                             **common)).loss_fn
    assert fn.depth is not None and fn.depth.lam == 0.0
    assert (fn.distill_from, fn.depth_on) == ("final", "super+base")
    with pytest.raises(ValueError, match="depth_on"):
        TrainConfig(depth_on="base")


def test_mixed_configs_are_drawn_reproducibly():
    from train.trainer import draw_mixed_configs, mixed_skip_configs

    configs = mixed_skip_configs(3)
    assert len(configs) == 6 and all(any(c) and not all(c) for c in configs)
    assert mixed_skip_configs(1) == []
    drawn = [draw_mixed_configs(configs, 2, seed=0, step=step) for step in range(200)]
    assert all(len(set(d)) == 2 and set(d) <= set(configs) for d in drawn)
    assert drawn == [draw_mixed_configs(configs, 2, seed=0, step=step) for step in range(200)]
    assert drawn != [draw_mixed_configs(configs, 2, seed=1, step=step) for step in range(200)]
    assert {c for d in drawn for c in d} == set(configs)
    assert sorted(draw_mixed_configs(configs, 9, seed=0, step=0)) == sorted(configs)


def test_mixed_subnets_config_and_training_step(tmp_path):
    """``mixed_subnets`` is checked, and one real step with it trains the drawn sub-networks:
    ``kl_mixed`` is reported and the step moves the weights differently from a step without."""
    with pytest.raises(ValueError, match="mixed_subnets"):
        TrainConfig(mixed_subnets=-1)
    with pytest.raises(ValueError, match="mixed_subnets.*self_distill"):
        TrainConfig(mixed_subnets=1, self_distill=False)
    common = dict(data="fashion-mnist", epochs=1, max_steps=1, batch_size=32, warmup_epochs=0, threads=1)
    steps = {}
    for mixed in (0, 1):
        torch.manual_seed(0)
        trainer = Trainer(_cfg(tmp_path / str(mixed), mixed_subnets=mixed, **common), log=lambda _m: None)
        steps[mixed] = (trainer, trainer.train_epoch())
    (plain, plain_stats), (mixed, mixed_stats) = steps[0], steps[1]
    assert "kl_mixed" not in plain_stats and mixed_stats["kl_mixed"] > 0
    assert mixed_stats["loss"] > plain_stats["loss"]
    a, b = plain.model.state_dict(), mixed.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # unset, one mixed sub-network per step where it can be distilled and the trunk trains
    assert TrainConfig().mixed_subnets is None
    quiet = dict(log=lambda _m: None)
    assert Trainer(_cfg(tmp_path / "auto", **common), **quiet).mixed_subnets == 1
    assert Trainer(_cfg(tmp_path / "nokd", self_distill=False, **common), **quiet).mixed_subnets == 0
    assert Trainer(_cfg(tmp_path / "heads", trainable="exits", **common), **quiet).mixed_subnets == 0


@pytest.mark.parametrize("name", ["resnet20_adn", "vit_tiny_adn"])
def test_adn_step_gradients_reach_every_parameter(name):
    from train.losses import ADNLoss, DepthLoss
    from train.models import create_model
    from train.trainer import ADNStep

    torch.manual_seed(0)
    # Zero-initialised residual gammas would (correctly) zero the first step's gradients upstream.
    extra = {"zero_init_residual": False} if name.startswith("resnet") else {}
    model = create_model(name, num_classes=10, in_chans=1, img_size=28, **extra)
    depth = DepthLoss([0.4, 0.3, 0.3] if model.num_stages == 3 else [0.25] * 4, lam=0.1,
                      halting="learned", beta=0.1)
    loss_fn = ADNLoss(model.num_stages, label_smoothing=0.1, depth=depth)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    super_logits, base_logits, increments, _ = ADNStep(model, self_distill=True)(x)
    loss, terms = loss_fn(super_logits, base_logits, y, increments)
    assert torch.isfinite(loss) and all(v == v for v in terms.values())
    loss.backward()
    params = dict(model.named_parameters()) | {f"loss.{k}": p for k, p in loss_fn.named_parameters()}
    no_grad = [k for k, p in params.items() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not no_grad, no_grad


@pytest.mark.parametrize("env, capped", [
    ({"ATEN_CPU_CAPABILITY": "avx2"}, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, True),
    ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, False),
])
def test_bf16_auto_follows_the_isa_cap(env, capped):
    """bf16 "auto" is off where torch's kernels are capped below native bf16 (as on an
    AVX2-only CPU), whatever /proc/cpuinfo lists."""
    import os
    import subprocess
    import sys

    code = ("import torch; from train.precision import _capped_below_avx512 as c; "
            "print(int(c()))")
    base = {k: v for k, v in os.environ.items()
            if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, check=True,
                         capture_output=True, text=True).stdout.strip()
    if not capped and subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
            env=base, capture_output=True, text=True).stdout.strip() in ("AVX2", "DEFAULT"):
        capped = True  # this CPU itself has no AVX-512: torch's capability says so
    assert out == str(int(capped))
