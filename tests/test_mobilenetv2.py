"""MobileNetV2-ADN: the authors' split and twin placement, MACs, torchvision weights, export, training."""
from __future__ import annotations

import pytest
import torch

from family_pipeline import calibrate_and_profile, export_compile_run, perturb, tvm_matches_onnxruntime
from train.models import all_skip_configs, create_model, load_torchvision_state_dict, macs_per_exit, piece_macs


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_split_and_twin_placement_follow_the_authors():
    with torch.device("meta"):
        model = create_model("mobilenetv2_adn", num_classes=1000)
    assert model.num_stages == 5 and model.splits == [(1, 1), (2, 1), (2, 2), (2, 1), (2, 1)]
    # features: stem 0, c16 1, c24 2-3, c32 4-6, c64 7-10, c96 11-13, c160 14-16, c320 17, head conv 18
    assert model.stage_ranges == [(0, 3, 4), (4, 6, 7), (7, 9, 11), (11, 13, 14), (14, 16, 17)]
    assert model.tail == (17, 19)
    keys = set(model.state_dict())
    for twin in ("features.0.1", "features.1.conv.0.1", "features.1.conv.2", "features.2.conv.3",
                 "features.8.conv.1.1", "features.17.conv.3", "features.18.1"):
        assert f"{twin}.twin.weight" in keys, twin
    for plain in ("features.3.conv.0.1", "features.9.conv.1.1", "features.10.conv.3", "features.16.conv.1.1"):
        assert f"{plain}.weight" in keys and f"{plain}.twin.weight" not in keys, plain
    # torchvision's mobilenet_v2 has 3,504,872 parameters: ours are those plus twins and exit heads
    base = sum(p.numel() for n, p in model.named_parameters() if ".twin." not in n and not n.startswith("exits."))
    assert base == 3_504_872


def test_stem_and_tail_norms_follow_first_and_last_stage():
    model = create_model("mobilenetv2_adn_cifar", in_chans=1, img_size=28, width_mult=0.5).eval()
    perturb(model)
    x = torch.randn(2, 1, 28, 28)
    for norm, stage in ((model.features[0][1], 0), (model.features[1].conv[2], 0),
                        (model.features[17].conv[3], 4), (model.features[18][1], 4)):
        with torch.no_grad():
            before = {c: model(x, c)[-1] for c in all_skip_configs(5)}
            norm.twin.weight.mul_(1.5)
            for c, ref in before.items():
                assert torch.equal(model(x, c)[-1], ref) != c[stage], (stage, c)


def test_macs_at_224():
    model = create_model("mobilenetv2_adn", num_classes=1000)
    pieces = piece_macs(model, 224)
    assert pieces["stem"] == 0  # the stem runs in stage 0's mandatory path (its norms switch)
    full, base = macs_per_exit(model, "FFFFF", pieces=pieces)[-1], macs_per_exit(model, "TTTTT", pieces=pieces)[-1]
    assert abs(full - 300.8e6) < 0.2e6  # torchvision's MobileNetV2 (0.30 GFLOPS in its docs)
    assert abs(base - 205.3e6) < 0.2e6
    # the authors print 0.32 / 0.22 (their counter also counts what FlopCounterMode leaves out); the
    # ratio of base to super net agrees within 2 %
    assert abs(base / full - 0.22 / 0.32) < 0.02


def _torchvision_keys(model) -> set[str]:
    """torchvision mobilenet_v2's state-dict keys, written from its layout (independent of our mapping)."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"features.0.0.weight", *(f"features.0.1.{b}" for b in bn), "features.18.0.weight",
            *(f"features.18.1.{b}" for b in bn), "classifier.1.weight", "classifier.1.bias"}
    for i in range(1, 18):
        units = 2 if i == 1 else 3  # t = 1: dw, pw-linear; else expand, dw, pw-linear
        for u in range(units - 1):
            keys |= {f"features.{i}.conv.{u}.0.weight", *(f"features.{i}.conv.{u}.1.{b}" for b in bn)}
        keys |= {f"features.{i}.conv.{units - 1}.weight", *(f"features.{i}.conv.{units}.{b}" for b in bn)}
    return keys


def test_torchvision_weights_load_with_identical_logits():
    torch.manual_seed(0)
    ref = perturb(create_model("mobilenetv2_adn", num_classes=1000, img_size=64)).eval()
    sd = {k: v for k, v in ref.state_dict().items() if ".twin." not in k and not k.startswith("exits.")}
    assert set(sd) == _torchvision_keys(ref)  # the torchvision layout, by construction
    model = create_model("mobilenetv2_adn", num_classes=1000, img_size=64)
    report = load_torchvision_state_dict(model, sd)
    assert not report.missing and not report.unexpected and len(report.twins) == 34  # 1 + 2 + 3 + 4 * 6 + 3 + 1
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, "FFFFF")[-1], ref(x, "FFFFF")[-1], rtol=0, atol=0)
    # every twin starts as its norm: the skip configs are the pretrained net with the blocks removed
    assert torch.equal(model.features[18][1].twin.running_var, ref.features[18][1].running_var)
    fine_tune = create_model("mobilenetv2_adn", num_classes=10, img_size=64)
    assert load_torchvision_state_dict(fine_tune, sd).skipped == ["classifier.1.weight", "classifier.1.bias"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_compile_run(tmp_path_factory.mktemp("mobilenetv2_adn_cifar"), "mobilenetv2_adn_cifar", "synthetic:chans=1,size=28", width_mult=0.5)


def test_export_onnxruntime_and_runtime_every_config(exported):
    assert exported["parity"]["max_logits_diff_chained"] <= 1e-4
    assert exported["max_diff"] <= 1e-4


def test_tvm_compiles_a_piece(exported, tmp_path):
    pytest.importorskip("tvm")
    assert tvm_matches_onnxruntime(exported, tmp_path) <= 1e-4


@pytest.mark.slow
def test_calibrate_and_profile(exported):
    calibrate_and_profile(exported["host"])


@pytest.mark.slow
def test_trains_on_fashion_mnist(tmp_path):
    from train.config import TrainConfig
    from train.trainer import Trainer

    cfg = TrainConfig(model="mobilenetv2_adn_cifar", model_kwargs={"width_mult": 0.5}, data="fashion-mnist",
                      epochs=1, batch_size=64, eval_batch_size=512, max_steps=25, lr=3e-3, warmup_epochs=0,
                      out=str(tmp_path / "run"), threads=1)
    trainer = Trainer(cfg, log=lambda _m: None)
    images, labels = trainer.data.train.get_batch(torch.arange(256))
    x = trainer._prepare(images, 0)

    def loss_on_fixed_batch() -> float:
        # batch statistics: 25 steps are too few for BN running averages (momentum 0.1) to settle
        trainer.step_module.train()
        with torch.no_grad():
            s, b, inc, _ = trainer.step_module(x)
            return float(trainer.loss_fn(s, b, labels, inc)[0])

    before = loss_on_fixed_batch()
    stats = trainer.train_epoch()
    after = loss_on_fixed_batch()
    assert trainer.global_step == 25
    assert after < before - 0.2, (before, after)
    assert stats["loss"] == stats["loss"]
