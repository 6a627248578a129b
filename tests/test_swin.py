"""Swin-T-ADN: the authors' split, twin norms (patch merging included), MACs, torchvision weights, export."""
from __future__ import annotations

import re

import pytest
import torch

from family_pipeline import calibrate_and_profile, export_compile_run, perturb, tvm_matches_onnxruntime
from train.models import all_skip_configs, create_model, load_torchvision_state_dict, macs_per_exit, piece_macs

NARROW = {"embed_dim": 24, "num_heads": (1, 2, 2, 4)}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_split_and_twin_placement_follow_the_authors():
    with torch.device("meta"):
        model = create_model("swin_t_adn", num_classes=1000)
    assert model.num_stages == 4 and model.splits == [(1, 1), (1, 1), (3, 3), (1, 1)]
    keys = set(model.state_dict())
    for twin in ("layers.0.blocks.0.norm1", "layers.1.downsample.norm", "layers.2.blocks.2.norm2",
                 "layers.3.downsample.norm", "layers.3.blocks.0.norm2"):
        assert f"{twin}.twin.weight" in keys, twin
    for plain in ("patch_embed.norm", "layers.0.blocks.1.norm1", "layers.2.blocks.3.norm1", "norm"):
        assert f"{plain}.weight" in keys and f"{plain}.twin.weight" not in keys, plain
    # torchvision's swin_t has 28,288,354 parameters: ours are those plus twins and exit heads
    base = sum(p.numel() for n, p in model.named_parameters() if ".twin." not in n and not n.startswith("exits."))
    assert base == 28_288_354
    shifts = [(b.attn.window, b.attn.shift) for stage in model.layers for b in stage.blocks]
    assert shifts == [(7, 0), (7, 3)] * 5 + [(7, 0), (7, 0)]  # 7x7 last map: no shift, as torchvision


def test_patch_merging_norm_follows_the_stage_it_feeds():
    model = create_model("swin_t_adn_cifar", in_chans=1, img_size=28, **NARROW).eval()
    perturb(model)
    x = torch.randn(2, 1, 28, 28)
    for k in (1, 2, 3):
        with torch.no_grad():
            before = {c: model(x, c)[-1] for c in all_skip_configs(4)}
            model.layers[k].downsample.norm.twin.weight.mul_(1.5)
            for c, ref in before.items():
                assert torch.equal(model(x, c)[-1], ref) != c[k], (k, c)


def test_small_input_windows_and_size_check():
    w28 = [(b.attn.window, b.attn.shift) for s in create_model("swin_t_adn_cifar", img_size=28).layers for b in s.blocks]
    assert w28[:4] == [(7, 0), (7, 3), (7, 0), (7, 0)] and w28[-1] == (2, 0)  # maps 14, 7, 4, 2
    model = create_model("swin_t_adn_cifar", img_size=32, **NARROW)
    assert model.model_config()["window_size"] == 4  # maps 16, 8, 4, 2
    with pytest.raises(ValueError, match="built for 32px"):
        model(torch.zeros(1, 3, 28, 28))


def test_macs_at_224_match_the_authors():
    model = create_model("swin_t_adn", num_classes=1000)
    pieces = piece_macs(model, 224)
    published = {"FFFF": 4.49, "TFFF": 4.11, "TTFF": 3.75, "TTTT": 2.34}  # their README, GFLOPs column
    for skip, gmacs in published.items():
        measured = macs_per_exit(model, skip, pieces=pieces)[-1] / 1e9
        assert abs(measured - gmacs) < 0.006, (skip, measured)


def _to_torchvision(key: str) -> str | None:
    """Our key -> torchvision swin_t's, written from torchvision's layout (the inverse of our loader)."""
    key = key.replace("patch_embed.proj.", "features.0.0.").replace("patch_embed.norm.", "features.0.2.")
    m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", key)
    if m:
        return f"features.{2 * int(m[1])}.{m[2]}"
    m = re.match(r"^layers\.(\d+)\.blocks\.(.*)$", key)
    if m:
        return f"features.{2 * int(m[1]) + 1}.{m[2]}".replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
    return key


def test_torchvision_weights_load_with_identical_logits():
    torch.manual_seed(0)
    ref = perturb(create_model("swin_t_adn_cifar", num_classes=1000, img_size=32, **NARROW)).eval()
    sd = {_to_torchvision(k): v for k, v in ref.state_dict().items() if ".twin." not in k and not k.startswith("exits.")}
    for name, buf in ref.named_buffers():  # torchvision stores the derived index
        if name.endswith("relative_position_index"):
            sd[_to_torchvision(name)] = buf
    assert {"features.0.0.weight", "features.0.2.bias", "features.2.reduction.weight", "features.7.1.mlp.3.bias",
            "features.5.5.attn.relative_position_bias_table", "features.1.0.attn.relative_position_index",
            "norm.weight", "head.bias"} <= set(sd)
    model = create_model("swin_t_adn_cifar", num_classes=1000, img_size=32, **NARROW)
    report = load_torchvision_state_dict(model, sd)
    assert not report.missing and not report.unexpected and len(report.twins) == 2 * 6 + 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x, "FFFF")[-1], ref(x, "FFFF")[-1], rtol=0, atol=0)
    assert load_torchvision_state_dict(create_model("swin_t_adn_cifar", img_size=32, **NARROW), sd).skipped == \
        ["head.weight", "head.bias"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_compile_run(tmp_path_factory.mktemp("swin_t_adn_cifar"), "swin_t_adn_cifar", "synthetic:chans=1,size=28", **NARROW)


def test_export_onnxruntime_and_runtime_every_config(exported):
    assert exported["parity"]["max_logits_diff_chained"] <= 1e-4
    assert exported["max_diff"] <= 1e-4


def test_tvm_compiles_a_piece(exported, tmp_path):
    pytest.importorskip("tvm")
    assert tvm_matches_onnxruntime(exported, tmp_path) <= 1e-4


@pytest.mark.slow
def test_calibrate_and_profile(exported):
    calibrate_and_profile(exported["host"])
