"""Frozen-backbone training: start from loaded weights, train only the exit heads (and the last
stage); frozen parameters and norm statistics stay put, the optimizer sees only what trains,
resume is exact."""
from __future__ import annotations

import pickle

import pytest
import torch

from runtime.errors import ConfigError
from train.checkpoint import (CheckpointError, load_checkpoint, load_init_weights,
                              part_parameter_names)
from train.config import TrainConfig
from train.models import create_model
from train.trainer import Trainer


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(model="resnet20_adn", data="digits", epochs=1, batch_size=64, eval_batch_size=512,
                lr=3e-3, warmup_epochs=0.2, out=str(tmp_path / "run"), threads=1, bf16=False)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(cfg: TrainConfig) -> Trainer:
    return Trainer(cfg, log=lambda _m: None)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A briefly trained resnet20_adn checkpoint (model.pt) on digits."""
    tmp = tmp_path_factory.mktemp("pre")
    trainer = _quiet(_cfg(tmp, max_steps=8))
    trainer.fit()
    return tmp / "run" / "model.pt"


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainable_values_are_checked():
    with pytest.raises(ConfigError, match="trainable"):
        TrainConfig(trainable="heads")
    assert TrainConfig().trainable == "all" and TrainConfig().init_weights is None


def test_parts_are_found_through_the_cut_points():
    model = create_model("resnet20_adn", in_chans=1, img_size=8)
    heads = part_parameter_names(model, ("heads",))
    assert heads == {n for n, _ in model.named_parameters() if n.startswith(("exits.", "fc."))}
    last = part_parameter_names(model, ("last_stage",))
    assert last == {n for n, _ in model.named_parameters() if n.startswith("layer3.")}  # twins included
    assert any(".twin." in n for n in last)


def test_exits_only_freezes_backbone_weights_and_norm_statistics(tmp_path, pretrained):
    trainer = _quiet(_cfg(tmp_path, trainable="exits", init_weights=str(pretrained), max_steps=6))
    loaded = load_checkpoint(pretrained)["model"]
    before = _snapshot(trainer.model)
    for key, value in loaded.items():  # started from the loaded weights
        assert torch.equal(before[key], value), key
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in trainer.model.named_parameters() if n.startswith(("exits.", "fc."))}
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    model_ids = {id(p): n for n, p in trainer.model.named_parameters()}
    assert {model_ids[i] for i in in_optimizer if i in model_ids} == trainable
    trainer.train_epoch()
    assert trainer.global_step == 6
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("exits.", "fc.")) for k in changed), sorted(changed)
    # Frozen BatchNorms (main and twin) stayed in eval mode: running statistics unchanged.
    assert torch.equal(before["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert torch.equal(before["layer1.0.bn1.twin.running_var"], after["layer1.0.bn1.twin.running_var"])
    assert torch.equal(before["bn1.num_batches_tracked"], after["bn1.num_batches_tracked"])
    # The heads' own BatchNorm trains.
    assert not torch.equal(before["exits.0.conv.1.running_mean"], after["exits.0.conv.1.running_mean"])
    assert not trainer.model.layer2.training and trainer.model.exits[0].training


def test_exits_plus_last_stage_trains_the_last_stage_too(tmp_path, pretrained):
    trainer = _quiet(_cfg(tmp_path, trainable="exits+last", init_weights=str(pretrained), max_steps=4))
    before = _snapshot(trainer.model)
    trainer.train_epoch()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("layer3.") for k in changed)
    assert all(k.startswith(("exits.", "fc.", "layer3.")) for k in changed), sorted(changed)


def test_frozen_run_resumes_exactly(tmp_path, pretrained):
    kw = dict(trainable="exits", init_weights=str(pretrained), epochs=2)
    straight = _quiet(_cfg(tmp_path / "a", **kw))
    straight.fit()
    spe = straight.steps_per_epoch
    _quiet(_cfg(tmp_path / "b", max_steps=spe + 3, **kw)).fit()
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["step_in_epoch"] == 3
    resumed = _quiet(_cfg(tmp_path / "b", **kw))
    resumed.fit(resume=True)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The final checkpoint rebuilds, and a changed `trainable` refuses to resume.
    with pytest.raises(Exception, match="trainable"):
        _quiet(_cfg(tmp_path / "b", trainable="all", init_weights=str(pretrained), epochs=2)).resume()


def test_init_weights_from_a_plain_state_dict_with_another_class_count(tmp_path):
    src = create_model("resnet20_adn", num_classes=5, in_chans=1, img_size=8)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "sd.pth")
    model = create_model("resnet20_adn", num_classes=10, in_chans=1, img_size=8)
    fresh_fc = model.fc.weight.detach().clone()
    report = load_init_weights(model, tmp_path / "sd.pth")
    assert "exit-head tensors left fresh" in report
    assert torch.equal(model.layer2[0].conv1.weight, src.layer2[0].conv1.weight)
    assert torch.equal(model.fc.weight, fresh_fc)


def test_init_weights_refuses_mismatches_and_pickles(tmp_path):
    other = create_model("resnet32_adn", in_chans=1, img_size=8)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    model = create_model("resnet20_adn", in_chans=1, img_size=8)
    with pytest.raises(CheckpointError, match="other.pth"):
        load_init_weights(model, tmp_path / "other.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(CheckpointError, match="weights_only"):
        load_init_weights(model, tmp_path / "evil.pth")
    with pytest.raises(FileNotFoundError):
        load_init_weights(model, tmp_path / "missing.pth")


def test_init_weights_in_torchvision_format(tmp_path):
    """A torchvision-format ResNet state dict (no twins, no intermediate exits) goes through the
    torchvision loader: twins copied, intermediate exits fresh."""
    src = create_model("resnet18_adn", num_classes=10, img_size=32)
    tv = {k: v for k, v in src.state_dict().items() if ".twin." not in k and not k.startswith("exits.")}
    torch.save(tv, tmp_path / "tv.pth")
    model = create_model("resnet18_adn", num_classes=10, img_size=32)
    report = load_init_weights(model, tmp_path / "tv.pth")
    assert report.startswith("torchvision-format weights")
    assert torch.equal(model.layer1[0].bn1.twin.weight, src.layer1[0].bn1.weight)
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_composed_user_model_trains_exits_only(tmp_path, monkeypatch):
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "frozenusernet.py").write_text(
        "from torch import nn\nfrom train.models.compose import compose_adn\n\n"
        "def block(i, o, s=1):\n"
        "    return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())\n\n"
        "def factory(num_classes=10, in_chans=3, img_size=None):\n"
        "    return compose_adn(block(in_chans, 8), [(block(8, 8), block(8, 8)), (block(8, 16, 2), block(16, 16))],\n"
        "                       num_classes=num_classes, in_chans=in_chans, img_size=img_size or 8)\n")
    monkeypatch.syspath_prepend(str(folder))
    trainer = _quiet(_cfg(tmp_path, model="frozenusernet:factory", trainable="exits", max_steps=3))
    before = _snapshot(trainer.model)
    trainer.train_epoch()
    after = trainer.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("exits.") for k in changed), sorted(changed)
