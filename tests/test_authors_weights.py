"""The authors' checkpoint layout (github.com/wchkang/depth) maps onto ours with identical logits.

No network: for every family a small model's weights are written in the authors' layout
(``adn_to_authors``); the key set is checked against a list written here from their model code,
then loaded into a fresh model and compared in every skip configuration.
"""
from __future__ import annotations

import pytest
import torch

from family_pipeline import perturb
from train.models import all_skip_configs, create_model
from train.models.authors_weights import adn_to_authors, key_pairs, load_authors_state_dict

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
LN = ("weight", "bias")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _norm(prefix: str, fields=BN) -> set[str]:
    return {f"{prefix}.{f}" for f in fields}


def resnet50_keys() -> set[str]:
    """models/resnet.py: ResNet(Bottleneck, [3, 4, 6, 3]); *_skip norms on the first min(n-1, (n+1)//2) blocks."""
    keys = {"conv1.weight", *_norm("bn1"), "fc.weight", "fc.bias"}
    for s, n in enumerate((3, 4, 6, 3), start=1):
        for i in range(n):
            p = f"layer{s}.{i}"
            for j in (1, 2, 3):
                keys |= {f"{p}.conv{j}.weight", *_norm(f"{p}.bn{j}")}
                if i < min(n - 1, (n + 1) // 2):
                    keys |= _norm(f"{p}.bn{j}_skip")
            if i == 0:
                keys |= {f"{p}.downsample.0.weight", *_norm(f"{p}.downsample.1")}
    return keys


def mobilenetv2_keys() -> set[str]:
    """models/mobilenetv2.py: features = [stem, 7 rows (n >= 2 rows nested), head conv]; misc.py's
    SkippableConvNormActivation = conv_layer, norm, norm_skip (the latter unless skippable)."""
    def unit(p: str, skippable: bool) -> set[str]:
        return {f"{p}.conv_layer.weight", *_norm(f"{p}.norm"), *(() if skippable else _norm(f"{p}.norm_skip"))}

    keys = unit("features.0", False) | unit("features.8", False) | {"classifier.1.weight", "classifier.1.bias"}
    rows = ((1, 1), (6, 2), (6, 3), (6, 4), (6, 3), (6, 3), (6, 1))  # (t, n)
    for g, (t, n) in enumerate(rows, start=1):
        for i in range(n):
            p = f"features.{g}.{i}" if n >= 2 else f"features.{g}"
            skippable = n >= 2 and i >= (n + 1) // 2
            for u in range(2 if t == 1 else 3):
                keys |= unit(f"{p}.conv.{u}", skippable)
    return keys


def vit_keys(depth: int = 12) -> set[str]:
    """models/vision_transformer.py: torchvision ViT; ln_1_skip / ln_2_skip unless (i + 1) % 3 == 0."""
    keys = {"class_token", "conv_proj.weight", "conv_proj.bias", "encoder.pos_embedding", *_norm("encoder.ln", LN),
            "heads.head.weight", "heads.head.bias"}
    for i in range(depth):
        p = f"encoder.layers.encoder_layer_{i}"
        keys |= {*_norm(f"{p}.ln_1", LN), *_norm(f"{p}.ln_2", LN), f"{p}.self_attention.in_proj_weight",
                 f"{p}.self_attention.in_proj_bias", f"{p}.self_attention.out_proj.weight",
                 f"{p}.self_attention.out_proj.bias", *(f"{p}.mlp.{j}.{f}" for j in (0, 3) for f in LN)}
        if (i + 1) % 3:
            keys |= _norm(f"{p}.ln_1_skip", LN) | _norm(f"{p}.ln_2_skip", LN)
    return keys


def swin_keys(depths=(2, 2, 6, 2), base=(1, 1, 3, 1)) -> set[str]:
    """models/swin_transformer.py: pre.0 / pre.2, features alternate stage blocks (0, 2, 4, 6) and
    PatchMerging (1, 3, 5: norm, norm_skip, reduction); norm1_skip / norm2_skip on mandatory blocks."""
    keys = {"pre.0.weight", "pre.0.bias", *_norm("pre.2", LN), *_norm("norm", LN), "head.weight", "head.bias"}
    for k, (d, b) in enumerate(zip(depths, base)):
        if k:
            m = f"features.{2 * k - 1}"
            keys |= {*_norm(f"{m}.norm", LN), *_norm(f"{m}.norm_skip", LN), f"{m}.reduction.weight"}
        for i in range(d):
            p = f"features.{2 * k}.{i}"
            keys |= {*_norm(f"{p}.norm1", LN), *_norm(f"{p}.norm2", LN), f"{p}.attn.qkv.weight", f"{p}.attn.qkv.bias",
                     f"{p}.attn.proj.weight", f"{p}.attn.proj.bias", f"{p}.attn.relative_position_bias_table",
                     f"{p}.attn.relative_position_index", *(f"{p}.mlp.{j}.{f}" for j in (0, 3) for f in LN)}
            if i < b:
                keys |= _norm(f"{p}.norm1_skip", LN) | _norm(f"{p}.norm2_skip", LN)
    return keys


# family -> (model name, kwargs of a small instance, img size, the authors' keys)
CASES = {
    "resnet50": ("resnet50_adn", {}, 32, resnet50_keys),
    "mobilenetv2": ("mobilenetv2_adn", {"width_mult": 0.5}, 32, mobilenetv2_keys),
    "vit_b16": ("vit_b16_adn", {"embed_dim": 48, "num_heads": 3, "patch_size": 8}, 32, vit_keys),
    "swin_t": ("swin_t_adn", {"embed_dim": 24, "num_heads": (1, 2, 2, 4), "patch_size": 2, "window_size": 2}, 32,
               swin_keys),
}


@pytest.mark.parametrize("family", list(CASES))
def test_authors_layout_loads_with_identical_logits_in_every_skip_config(family):
    name, kwargs, size, expected_keys = CASES[family]
    torch.manual_seed(0)
    theirs = perturb(create_model(name, num_classes=11, img_size=size, **kwargs)).eval()
    if family == "resnet50":  # their downsample norm is shared by both paths: make our twin that norm
        with torch.no_grad():
            for k in range(4):
                ds = theirs.stage(k)[0].downsample[1]
                ds.twin.load_state_dict({k: v for k, v in ds.state_dict().items() if not k.startswith("twin.")})
    sd = adn_to_authors(theirs)
    assert set(sd) == expected_keys()

    model = create_model(name, num_classes=11, img_size=size, **kwargs)
    report = load_authors_state_dict(model, sd)
    assert not report.missing and not report.unexpected and not report.skipped
    assert report.fresh and all(k.startswith("exits.") for k in report.fresh)
    assert len(report.twins) == (20 if family == "resnet50" else 0)  # 4 downsample norms x 5 tensors
    model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        for cfg in all_skip_configs(model.num_stages):
            torch.testing.assert_close(model(x, cfg)[-1], theirs(x, cfg)[-1], rtol=0, atol=0)


def test_wrappers_class_count_and_strictness():
    model = create_model("mobilenetv2_adn", num_classes=11, img_size=32, width_mult=0.5)
    sd = adn_to_authors(model)
    wrapped = {"model_ema": {"n_averaged": torch.tensor(3), **{f"module.{k}": v for k, v in sd.items()}}}
    assert not load_authors_state_dict(create_model("mobilenetv2_adn", num_classes=11, img_size=32, width_mult=0.5),
                                       wrapped).missing
    fine_tune = create_model("mobilenetv2_adn", num_classes=5, img_size=32, width_mult=0.5)
    assert load_authors_state_dict(fine_tune, sd).skipped == ["classifier.1.weight", "classifier.1.bias"]
    broken = dict(sd)
    del broken["features.2.0.conv.1.norm_skip.running_var"]
    with pytest.raises(ValueError, match="features.2.conv.1.1.twin.running_var"):
        load_authors_state_dict(create_model("mobilenetv2_adn", num_classes=11, img_size=32, width_mult=0.5), broken)
    bad = dict(sd, **{"features.0.conv_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape mismatch"):
        load_authors_state_dict(create_model("mobilenetv2_adn", num_classes=11, img_size=32, width_mult=0.5), bad)


def test_layouts_the_authors_cannot_express_are_refused():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="groups of 2 or 3"):
            key_pairs(create_model("vit_tiny_adn", depth=16))  # 4 blocks per stage: theirs 3+1, ours 2+2
        with pytest.raises(ValueError, match="pads instead"):
            key_pairs(create_model("swin_t_adn_cifar", img_size=32))  # last map 2 px < window 4
    with pytest.raises(TypeError):
        key_pairs(torch.nn.Linear(2, 2))
